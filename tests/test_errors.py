"""Every error class on bad input: the right class, a 1-based ``lineno`` within the
story text, the offending line and a caret in ``_render_traceback_()``, and a hint."""

from __future__ import annotations

import pytest
import torch
from conftest import SEED_STORY, bernoulli_text

import storch_nb as sn


def _rendered(exc: sn.StoryError, line: str) -> list[str]:
    """Check the rendering shows `line` followed by a caret line; return the lines."""
    lines = exc._render_traceback_()
    assert isinstance(lines, list) and all(isinstance(s, str) for s in lines)
    assert lines[0].startswith(type(exc).__name__)
    shown = [i for i, s in enumerate(lines) if s.strip() == line.strip() and s.strip()]
    assert shown, f"story line {line!r} not shown in {lines}"
    caret = lines[shown[0] + 1]
    assert caret.strip() == "^", lines
    assert "Traceback" not in "\n".join(lines)
    return lines


def _caret_col(exc: sn.StoryError, line: str) -> int:
    """Column in the user's line that the caret points at."""
    lines = exc._render_traceback_()
    i = next(i for i, s in enumerate(lines) if s.strip() == line.strip() and s.strip())
    shown, caret = lines[i], lines[i + 1]
    offset = len(shown) - len(shown.lstrip()) - (len(line) - len(line.lstrip()))
    return caret.index("^") - offset


def test_hierarchy():
    for cls in (sn.StorySyntaxError, sn.StoryNameError, sn.EstimatorError):
        assert issubclass(cls, sn.StoryError)
    assert issubclass(sn.StoryError, Exception)


# ------------------------------------------------------------------ syntax


@pytest.mark.parametrize(
    "text, lineno, needle",
    [
        ("a = param(1.0)\nb = a +* 2\ncost b\n", 2, "b = a +* 2"),
        ("a = param(1.0)\ne ~\ncost e\n", 2, "e ~"),
        ("a = param(1.0)\ne ~ Normal(a, 1) using 3 +\ncost e\n", 2, "e ~ Normal(a, 1) using 3 +"),
        ("a = param(1.0)\ne ~ Normal(a, 1) using\ncost e\n", 2, "e ~ Normal(a, 1) using"),
        ("a = param(1.0)\nb = a\x00\ncost b\n", 2, None),
        ("a = param(1.0)\n3 ~ Normal(a, 1)\ncost a\n", 2, "3 ~ Normal(a, 1)"),
        ("a = param(1.0)\nb, c = a, a\ncost b\n", 2, "b, c = a, a"),
        ("a = param(1.0)\nif a:\n    b = a\ncost a\n", 2, "if a:"),
        ("a = param(1.0)\nfor i in [1, 2]:\n    b = a\ncost a\n", 2, "for i in [1, 2]:"),
        ("a = param(1.0)\n  b = a\ncost b\n", 2, "  b = a"),
    ],
    ids=[
        "operator",
        "tilde-no-dist",
        "bad-using",
        "empty-using",
        "nul",
        "tilde-lhs",
        "tuple",
        "if",
        "for-list",
        "indent",
    ],
)
def test_syntax_errors(text, lineno, needle):
    with pytest.raises(sn.StorySyntaxError) as info:
        sn.Story(text)
    exc = info.value
    assert exc.lineno == lineno
    assert exc.hint
    if needle is not None:
        _rendered(exc, needle)


def test_missing_cost():
    with pytest.raises(sn.StorySyntaxError, match="no cost"):
        sn.Story("a = param(1.0)\nb = a * 2\n")
    with pytest.raises(sn.StorySyntaxError, match="cost"):
        sn.Story("a = param(1.0)\ncost\n")


@pytest.mark.parametrize(
    "text, lineno",
    [
        ("a = param(1.0)\nb = (a * 2\ncost b\n", 2),
        ("a = param(1.0)\ne ~ Normal(a, 1) using score(baseline=\ncost e\n", 2),
        ("a = param(1.0)\ncost (a * [2\n", 2),
    ],
    ids=["paren", "using", "last-line"],
)
def test_unclosed_bracket_points_at_its_line(text, lineno):
    """Like Python's "'(' was never closed", the error names the line that opens the bracket."""
    with pytest.raises(sn.StorySyntaxError) as info:
        sn.Story(text)
    exc = info.value
    assert "never closed" in exc.message
    assert exc.lineno == lineno
    _rendered(exc, text.splitlines()[lineno - 1])


def test_nul_byte():
    with pytest.raises(sn.StorySyntaxError, match="NUL") as info:
        sn.Story("a = param(1.0)\nb = a\x00\ncost b\n")
    assert info.value.lineno == 2
    assert info.value.col == 5


def test_not_text():
    with pytest.raises(sn.StorySyntaxError):
        sn.Story(b"cost 1")  # type: ignore[arg-type]


def test_syntax_caret_column():
    line = "b = a +* 2"
    with pytest.raises(sn.StorySyntaxError) as info:
        sn.Story(f"a = param(1.0)\n{line}\ncost b\n")
    assert _caret_col(info.value, line) == line.index("*")


# ------------------------------------------------------------------- names


def test_unknown_name_with_suggestion():
    text = "alpha = param(1.0)\nb = alpah * 2\ncost b\n"
    story = sn.Story(text)  # names are resolved when the story runs
    with pytest.raises(sn.StoryNameError) as info:
        story.run(samples=4)
    exc = info.value
    assert exc.lineno == 2
    assert "alpah" in exc.message
    assert "did you mean" in exc.hint and "alpha" in exc.hint
    _rendered(exc, "b = alpah * 2")
    assert _caret_col(exc, "b = alpah * 2") == 4


def test_unknown_name_suggests_namespace_names():
    story = sn.Story("e ~ Normal(mu_vec, 1)\ncost e.sum()\n")
    with pytest.raises(sn.StoryNameError) as info:
        story.run(samples=4, namespace={"mu_vector": torch.zeros(2)})
    assert info.value.lineno == 1
    assert "mu_vector" in info.value.hint


def test_unknown_name_in_cost_and_in_loop():
    with pytest.raises(sn.StoryNameError) as info:
        sn.Story("a = param(1.0)\ne ~ Normal(a, 1)\ncost e * wieght\n").run(samples=4, namespace={"weight": 2.0})
    assert info.value.lineno == 3 and "weight" in info.value.hint
    with pytest.raises(sn.StoryNameError) as info:
        sn.Story("a = param(1.0)\nfor i in range(N):\n    cost a\n").run(samples=4)
    assert info.value.lineno == 2


def test_name_error_in_exact_and_surrogate():
    story = sn.Story("t = param(0.0)\nb ~ Bernoulli(logits=t + offst)\ncost b\n")
    for call in (story.exact, lambda: story.surrogate(samples=4)):
        with pytest.raises(sn.StoryNameError) as info:
            call()
        assert info.value.lineno == 2


# -------------------------------------------------------------- estimators


def test_pathwise_on_bernoulli():
    text = bernoulli_text(0.0, 0.45, using="pathwise")
    with pytest.raises(sn.EstimatorError) as info:
        sn.Story(text).run(samples=4)
    exc = info.value
    assert exc.lineno == 2
    assert "`b`" in exc.message and "Bernoulli" in exc.message
    assert "score" in exc.hint and "enumerate" in exc.hint
    _rendered(exc, text.splitlines()[1])
    # the same through estimator= (no `using`)
    with pytest.raises(sn.EstimatorError) as info:
        sn.Story(bernoulli_text(0.0, 0.45)).run(samples=4, estimator="reparam")
    assert info.value.lineno == 2 and "`b`" in info.value.message
    # and per site through a mapping
    with pytest.raises(sn.EstimatorError) as info:
        sn.Story(bernoulli_text(0.0, 0.45)).run(samples=4, estimator={"b": "pathwise"})
    assert info.value.lineno == 2


def test_enumerate_on_continuous_site():
    with pytest.raises(sn.EstimatorError) as info:
        sn.Story("m = param(0.0)\nx ~ Normal(m, 1) using enumerate\ncost x\n").run(samples=4)
    assert info.value.lineno == 2 and "`x`" in info.value.message


@pytest.mark.parametrize("spec", ["scroe", "score(baseline='bogus')", "score(foo=1)", "score(n=0)", "auto(n=2)",
                                  "score(decay=1.5)", "score(baseline=[1][0])", "3 +"])  # fmt: skip
def test_bad_estimator_option_in_api(spec):
    with pytest.raises(sn.EstimatorError):
        sn.Story(SEED_STORY).run(samples=4, estimator=spec)


def test_unknown_estimator_suggests():
    with pytest.raises(sn.EstimatorError) as info:
        sn.Story(SEED_STORY).run(samples=4, estimator="scroe")
    assert "score" in info.value.hint
    text = bernoulli_text(0.0, 0.45, using="rlooo")
    with pytest.raises(sn.EstimatorError) as info:
        sn.Story(text).run(samples=4)
    assert info.value.lineno == 2 and "rloo" in info.value.hint
    _rendered(info.value, text.splitlines()[1])
    assert _caret_col(info.value, text.splitlines()[1]) == text.splitlines()[1].index("using")


def test_bad_option_in_using():
    text = bernoulli_text(0.0, 0.45, using="score(basline='rloo')")
    with pytest.raises(sn.EstimatorError) as info:
        sn.Story(text).run(samples=4)
    assert info.value.lineno == 2
    assert "basline" in info.value.message and "baseline" in info.value.hint


def test_bad_estimator_type():
    with pytest.raises(sn.EstimatorError):
        sn.Story(SEED_STORY).run(samples=4, estimator=3)  # type: ignore[arg-type]
    with pytest.raises(sn.EstimatorError):
        sn.Story(SEED_STORY).run(samples=4, estimator={"e": 3})  # type: ignore[dict-item]


@pytest.mark.parametrize("how", ["using", "option"])
def test_rloo_with_one_sample(how):
    """rloo needs two particles: with samples=1 and no n the error names the site's line."""
    if how == "using":
        story, kw = sn.Story(bernoulli_text(0.0, 0.45, using="rloo")), {}
    else:
        story, kw = sn.Story(bernoulli_text(0.0, 0.45)), {"estimator": "rloo"}
    with pytest.raises(sn.EstimatorError) as info:
        story.run(samples=1, **kw)
    assert "2 samples" in info.value.message or "two" in info.value.message
    assert "n=" in info.value.hint
    assert info.value.lineno == 2
    # with the plate option it works
    sn.Story(bernoulli_text(0.0, 0.45, using="rloo(n=2)")).run(samples=1, seed=0)


# ------------------------------------------------------------------- exact


def test_exact_on_continuous_story():
    with pytest.raises(sn.StoryError) as info:
        sn.Story(SEED_STORY).exact()
    exc = info.value
    assert exc.lineno == 5  # e ~ Normal(c + b, 1)
    assert "finite" in exc.message
    _rendered(exc, "e ~ Normal(c + b, 1)")


def test_exact_over_budget_says_the_count():
    story = sn.Story("t = param(torch.zeros(30))\nb ~ Bernoulli(logits=t)\ncost b.sum()\n")
    with pytest.raises(sn.StoryError, match="1,073,741,824"):
        story.exact()
    small = sn.Story("t = param(torch.zeros(3))\nb ~ Bernoulli(logits=t)\ncost b.sum()\n")
    assert small.exact().grads["t"].tolist() == pytest.approx([0.25] * 3)  # b.sum() is one number per draw
    with pytest.raises(sn.StoryError, match="8"):
        small.exact(max_outcomes=4)


# -------------------------------------------------------------- run-time


def test_step_failure_names_line():
    text = "m = param(torch.zeros(3))\nx ~ Normal(m, 1)\ny = x @ torch.ones(4)\ncost y\n"
    with pytest.raises(sn.StoryError) as info:
        sn.Story(text).run(samples=4)
    assert info.value.lineno == 3
    _rendered(info.value, "y = x @ torch.ones(4)")


def test_bad_distribution_arguments():
    with pytest.raises(sn.StoryError) as info:
        sn.Story("m = param(0.0)\nx ~ Normal(m, -1.0)\ncost x\n").run(samples=4)
    assert info.value.lineno == 2
    with pytest.raises(sn.StoryError) as info:
        sn.Story("m = param(0.0)\nx ~ notadist\ncost x + m\n").run(samples=4, namespace={"notadist": 3})
    assert info.value.lineno == 2


def test_line_offset_for_notebook():
    with pytest.raises(sn.StoryNameError) as info:
        sn.Story("a = param(1.0)\ncost a * zz\n").run(samples=2)
    exc = info.value
    assert "line 2" in exc._render_traceback_()[0]
    exc.line_offset = 1  # the %%storch line
    assert "line 3" in exc._render_traceback_()[0]
    assert exc.lineno == 2


def test_estimator_mapping_names_unknown_site():
    with pytest.raises(sn.EstimatorError) as info:
        sn.Story(SEED_STORY).run(samples=4, estimator={"z": "score"})
    assert "'z'" in info.value.message and "e" in info.value.hint
    # a loop site may be named by its variable or its node name
    story = sn.Story("w = param(0.3)\nfor t in range(2):\n    a ~ Bernoulli(logits=w)\n    cost a\n")
    assert story.run(samples=4, seed=0, estimator={"a": "score"}).estimators == {"a[0]": "score", "a[1]": "score"}
    res = story.run(samples=4, seed=0, estimator={"a[1]": "score", "a": "rloo"})
    assert res.estimators == {"a[0]": "rloo", "a[1]": "score"}
