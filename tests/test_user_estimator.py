"""User estimators (issue 3, item 5): the worked example of docs/estimators.md.

The docs' python code blocks are executed as they stand (in order, one namespace),
which registers ``score_const``; the tests then register the same class under the
name ``my_est`` (a subclass, so the docs' registration keeps its name) and check it
is listed by ``storch_nb.estimators()``, runs in ``story.compare``, in the ``%%storch``
magic of a real IPython shell, and gives unbiased gradients (first and second order).
Registrations are undone after each test, so no other test sees them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_within

import storch_nb as sn
from storch_nb.estimators.base import _ALIASES, _REGISTRY

DOCS = Path(__file__).resolve().parents[1] / "docs" / "estimators.md"
TOY = "t = param(0.3)\nb ~ Bernoulli(logits=t)\ncost (b - 0.45)**2\n"
CATEGORICAL = (
    "theta = param(torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2]))\nk ~ Categorical(logits=theta)\ncost (k - 2.0)**2\n"
)


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _snapshot():
    return dict(_REGISTRY), dict(_ALIASES)


def _restore(snapshot) -> None:
    registry, aliases = snapshot
    _REGISTRY.clear()
    _REGISTRY.update(registry)
    _ALIASES.clear()
    _ALIASES.update(aliases)


@pytest.fixture(scope="module")
def docs_ns():
    """Execute every python block of docs/estimators.md in one namespace (once per module;
    the registrations are undone at the end of the module)."""
    snapshot = _snapshot()
    ns: dict = {"__name__": "docs_estimators"}
    for block in python_blocks(DOCS.read_text()):
        exec(compile(block, str(DOCS), "exec"), ns)  # noqa: S102
    yield ns
    _restore(snapshot)


@pytest.fixture
def my_est(docs_ns):
    """The docs' class, registered under the name ``my_est`` for one test."""
    snapshot = _snapshot()
    cls = sn.register_estimator("my_est")(type("MyEst", (docs_ns["ConstantBaselineScore"],), {}))
    assert cls.name == "my_est" and docs_ns["ConstantBaselineScore"].name == "score_const"
    yield cls
    _restore(snapshot)


def test_docs_code_blocks_run(docs_ns):
    """Every python block of the docs runs; the worked example registers `score_const`,
    a subclass of storch_nb.Estimator, and the blocks' results are what the text says."""
    assert len(python_blocks(DOCS.read_text())) >= 3
    cls = docs_ns["ConstantBaselineScore"]
    assert issubclass(cls, sn.Estimator)
    assert '@storch_nb.register_estimator("score_const")' in DOCS.read_text()
    assert "score_const" in sn.estimators()
    assert docs_ns["res"].estimators == {"b": "score_const(value=0.26)"}
    assert docs_ns["per_site"].run(samples=8, seed=0).estimators == {"b": "score_const(value=0.26)"}
    rows = {r["estimator"]: r for r in docs_ns["cmp"].table}
    assert set(rows) == {"score", "score_const(value=0.26)", "rloo"}
    # "score_const's variance is a small fraction of plain score's"
    assert rows["score_const(value=0.26)"]["variance"] < 0.1 * rows["score"]["variance"]


def test_registered_name_is_listed(my_est):
    names = sn.estimators()
    assert "my_est" in names and "score_const" in names
    assert names == sorted(names)


def test_options_are_checked(my_est):
    story = sn.Story(TOY)
    with pytest.raises(sn.EstimatorError, match="no option"):
        story.run(samples=4, estimator="my_est(c=1)")
    with pytest.raises(sn.EstimatorError, match="value must be a number"):
        story.run(samples=4, estimator="my_est(value='x')")
    res = story.run(samples=4, estimator="my_est(value=0.5)", seed=0)
    assert res.estimators == {"b": "my_est(value=0.5)"}


@pytest.mark.parametrize("value", [0.0, 0.26, 5.0])
def test_unbiased(my_est, value):
    """Mean over 4000 runs within 4 SE of exact(), for any constant (including a bad one)."""
    story = sn.Story(TOY)
    truth = story.exact(dtype="float64").grads["t"]
    res = story.run(samples=8, runs=4000, estimator=f"my_est(value={value})", seed=1, dtype="float64")
    g = res.grads["t"]
    assert_within(g.mean(), truth, g.std() / math.sqrt(4000), what=f"my_est(value={value})")


def test_unbiased_on_categorical_and_per_site(my_est):
    """A five-outcome Categorical, the estimator given by `using` on the site."""
    text = CATEGORICAL.replace("logits=theta)", "logits=theta) using my_est(value=1.9)")
    story = sn.Story(text)
    truth = story.exact(dtype="float64").grads["theta"]
    res = story.run(samples=8, runs=3000, seed=2, dtype="float64")
    assert res.estimators == {"k": "my_est(value=1.9)"}
    g = res.grads["theta"]
    assert_within(g.mean(0), truth, g.std(0) / math.sqrt(3000), what="my_est on Categorical")


def test_constant_baseline_identity_same_draws(my_est):
    """Same seed, same draws: grad(my_est(value=c)) = grad(score) - c * mean_i (b_i - p),
    with mean_i b_i read off the score run's cost: cost = p0^2 + mean(b) (1 - 2 p0)."""
    story = sn.Story(TOY)
    score = story.run(samples=50, estimator="score", seed=13, dtype="float64")
    mine = story.run(samples=50, estimator="my_est(value=0.7)", seed=13, dtype="float64")
    p, p0 = 1 / (1 + math.exp(-0.3)), 0.45
    mean_b = (score.cost - p0**2) / (1 - 2 * p0)
    assert mine.grads["t"].item() == pytest.approx(score.grads["t"].item() - 0.7 * (mean_b - p), abs=1e-10)


def test_second_derivative_unbiased(my_est):
    """scored = True + baseline(): the DiCE surrogate with the baseline term, so the second
    derivative averaged over 150 seeds is the exact one (enumerate) within 4 SE."""
    story = sn.Story(TOY)

    def d2(estimator, samples, seed):
        loss = story.surrogate(samples=samples, estimator=estimator, seed=seed, dtype="float64")
        t = story.params["t"]
        (g,) = torch.autograd.grad(loss, t, create_graph=True)
        (h,) = torch.autograd.grad(g, t)
        return h

    truth = d2("enumerate", 1, 0)
    hs = torch.stack([d2("my_est(value=0.26)", 1000, s) for s in range(150)])
    assert_within(hs.mean(), truth, hs.std() / math.sqrt(len(hs)), what="my_est d2/dt2")


def test_in_compare(my_est):
    """compare runs the user estimator next to the built-ins: unbiased, and with a
    baseline near E[f] = 0.26 far less variance than plain score."""
    story = sn.Story(TOY)
    cmp = story.compare(["score", "my_est(value=0.26)", "my_est"], samples=8, runs=2000, seed=0)
    rows = {r["estimator"]: r for r in cmp.table}
    assert set(rows) == {"score", "my_est(value=0.26)", "my_est"}
    assert cmp.results["my_est(value=0.26)"].estimators == {"b": "my_est(value=0.26)"}
    for name, r in rows.items():
        assert abs(r["bias"]) < 4 * r["std"] / math.sqrt(2000), name
    assert rows["my_est(value=0.26)"]["variance"] < 0.1 * rows["score"]["variance"]
    # my_est with its default value 0 is plain score on the same draws
    assert rows["my_est"]["mean"] == pytest.approx(rows["score"]["mean"], abs=1e-7)


@pytest.fixture
def shell():
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    cfg = Config()
    cfg.HistoryAccessor.enabled = False
    ip = InteractiveShell.instance(config=cfg)
    ip.run_line_magic("load_ext", "storch_nb")
    yield ip
    ip.run_line_magic("unload_ext", "storch_nb")
    for name in ("r", "c"):
        ip.user_ns.pop(name, None)


def test_in_the_magic(my_est, shell):
    """%%storch --estimator my_est in a real InteractiveShell: the result pushed with
    --out names the estimator, and its gradient (1000 samples) is within 4 SE of exact;
    --compare lists it too."""
    from IPython.utils.capture import capture_output

    cell = "t = param(0.3)\nb ~ Bernoulli(logits=t)\ncost (b - 0.45)**2\n"
    with capture_output() as cap:
        shell.run_cell_magic("storch", "--estimator my_est --samples 1000 --seed 0 --out r", cell)
    r = shell.user_ns["r"]
    assert r.estimators == {"b": "my_est"}
    assert "my_est" in "".join(o.data.get("text/plain", "") for o in cap.outputs)
    truth = sn.Story(cell).exact().grads["t"]
    with capture_output():
        shell.run_cell_magic("storch", "--estimator my_est(value=0.26) --samples 100 --runs 2000 --seed 0 --out r",
                             cell)  # fmt: skip
    r = shell.user_ns["r"]
    assert r.estimators == {"b": "my_est(value=0.26)"}
    assert_within(r.mean_grads()["t"], truth, r.stderr["t"], atol=1e-6, what="magic my_est")
    with capture_output():
        shell.run_cell_magic("storch", "--compare score,my_est --samples 8 --runs 500 --seed 0 --out c", cell)
    assert {row["estimator"] for row in shell.user_ns["c"].table} == {"score", "my_est"}
