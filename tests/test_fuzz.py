"""Issue 6, item 2: fuzzing the parser and the engine with hypothesis.

Generated story texts -- token soup (random sequences of story tokens) and
mutated valid stories (characters and lines deleted, duplicated, swapped,
tokens inserted) -- go through ``Story(text)`` and ``Story(text).run(...)``.
Only two outcomes are allowed: a result, or a ``StoryError`` whose line number
lies inside the text and whose rendering works. Anything else fails the test
with the input that caused it.

Needs ``hypothesis`` (in the ``test`` extra). Reproducible in CI: ``derandomize=True`` (the examples are a function of the
test, not of the clock), no example database, bounded example counts, no
deadline (the first run of a story compiles its plan). The whole file takes
well under a minute.

Exclusions, on purpose: the soup has no ``**`` and only small numbers, and the
runs skip texts with integer literals above 64. ``3**3**3**3`` hangs plain
Python (CPython's big-int power does not check for signals), and a loop of
many thousand iterations is a known, separately tested defect
(``test_bad_stories.py::...loop-a-billion-times``); the fuzzer looks for
crashes, not for those.
"""

from __future__ import annotations

import re
import signal
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

import storch_nb as sn

RUN_SECONDS = 10.0  # watchdog per example: a run of 4 samples takes milliseconds

COMMON = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
}
PARSE = settings(max_examples=300, **COMMON)
RUN = settings(max_examples=100, **COMMON)

# ------------------------------------------------------------------ inputs

NAMES = ["a", "b", "c", "d", "e", "f", "x", "t", "i", "w", "torch", "Normal", "Bernoulli", "Categorical",
         "Poisson", "Beta", "param", "cost", "using", "score", "rloo", "pathwise", "gumbel", "enumerate",
         "range", "for", "in", "log", "exp", "sum", "mean", "sigmoid", "softmax", "baseline", "n", "temperature",
         "logits", "probs", "loc", "scale", "None", "True", "lambda", "if", "else", "not", "and"]  # fmt: skip
NUMBERS = ["0", "1", "2", "3", "0.5", "-1", "1.0", "2.5", "1e-3", "1e400", "'rloo'", "'x'", '"s"']
OPERATORS = ["+", "-", "*", "/", "@", "=", "~", ",", ".", ":", "(", ")", "[", "]", "{", "}", "==", "<", ">",
             "%", "//", "+=", "|", "&", ";", "\\", "#", "!", "?", "$", "`"]  # fmt: skip
LAYOUT = ["\n", "\n", "\n    ", "    ", "\t", " ", "# note\n", "\r\n"]
FRAGMENTS = ["param(", "param(1.0)", "~ Normal(", "~ Bernoulli(logits=", "using score(baseline=", "cost ",
             "for i in range(2):\n    ", ".sum()", "torch.zeros(2)", "torch.ones(3)", "x ~ Normal(a, 1)\n",
             "a = param(1.0)\n", "cost x\n", "using rloo", "using pathwise", "using enumerate",
             "using gumbel(temperature=0.5)", "Categorical(logits=torch.zeros(3))"]  # fmt: skip

token = st.one_of(
    st.sampled_from(NAMES),
    st.sampled_from(NUMBERS),
    st.sampled_from(OPERATORS),
    st.sampled_from(LAYOUT),
    st.sampled_from(FRAGMENTS),
)
soup = st.builds(
    lambda toks, seps: "".join(t + s for t, s in zip(toks, seps)),
    st.lists(token, min_size=1, max_size=40),
    st.lists(st.sampled_from(["", " ", " ", " "]), min_size=40, max_size=40),
)

# "line soup": story-shaped lines (params first, a cost last) whose expressions,
# distributions and estimators are random; expressions mostly use names defined above
ESTIMATORS = ["score", "rloo", "pathwise", "reparam", "gumbel", "st_gumbel", "enumerate", "arm", "disarm", "rebar",
              "relax", "lax", "go", "indecater", "measure_valued", "unordered_set", "score_wor", "auto",
              "score(baseline='moving_average')", "score(baseline='batch_average')", "score(n=2)",
              "rloo(n=3)", "gumbel(temperature=0.5)", "score(baseline='rloo', n=2)", "unordered_set(n=2)"]  # fmt: skip
CONSTANTS = ["0", "1", "2", "0.5", "-1.0", "1e-3", "3.0", "True", "torch.zeros(2)", "torch.ones(3)",
             "torch.tensor([0.2, 0.8])", "torch.eye(2)", "torch.arange(3)", "pi"]  # fmt: skip
FUNCS = ["log", "exp", "sigmoid", "sum", "mean", "softmax", "abs", "sqrt", "tanh", "relu", "torch.cumsum",
         "one_hot", "float", "torch.stack", "len", "clamp", "logsumexp", "torch.log_softmax"]  # fmt: skip
PARAMS = ["0.5", "1.0", "-1.0", "0", "torch.zeros(2)", "torch.ones(3)", "torch.tensor([0.1, -0.2])"]
DISTS = ["Normal({0}, {1})", "Bernoulli(logits={0})", "Bernoulli(probs={0})", "Categorical(logits={0})",
         "OneHotCategorical(logits={0})", "Poisson({0})", "Beta({0}, {1})", "Gamma({0}, {1})", "Dirichlet({0})",
         "Geometric(logits={0})", "Binomial(3, logits={0})", "Exponential({0})", "Uniform({0}, {1})",
         "LogNormal({0}, {1})", "MultivariateNormal({0}, torch.eye(2))", "RelaxedBernoulli(0.5, logits={0})",
         "Normal({0})", "Laplace({0}, 1)", "StudentT(3, {0})", "Independent(Normal({0}, 1), 1)",
         "Normal(sigmoid({0}), exp({1}))", "Bernoulli(logits={0}).expand([2])"]  # fmt: skip


def _expr(names: list[str]):
    leaf = st.one_of(st.sampled_from(names), st.sampled_from(names), st.sampled_from(CONSTANTS))
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.builds("{} {} {}".format, inner, st.sampled_from(["+", "-", "*", "/", "@", ">", "==", "**"]), inner),
            st.builds("{}({})".format, st.sampled_from(FUNCS), inner),
            st.builds("({})[{}]".format, inner, st.sampled_from(["0", "1", "-1", ":", "..., 0", "None"])),
            st.builds("({}).{}()".format, inner, st.sampled_from(["sum", "mean", "exp", "float", "long", "t", "item"])),
            st.builds("[{}, {}]".format, inner, inner),
            st.builds("({} if {} else {})".format, inner, inner, inner),
        ),
        max_leaves=4,
    )


@st.composite
def line_soup(draw) -> str:
    lines = []
    names = ["a", "b"]
    for name in names:
        lines.append(f"{name} = param({draw(st.sampled_from(PARAMS))})")
    fresh = iter(["x", "y", "z", "u", "v", "w"])

    def body_line(depth: int) -> list[str]:
        kind = draw(
            st.sampled_from(["assign", "site", "site", "cost", "loop"] if depth == 0 else ["assign", "site", "cost"])
        )
        if kind == "assign":
            name = next(fresh, "x")
            out = [f"{name} = {draw(_expr(names))}"]
        elif kind == "cost":
            return [f"cost {draw(_expr(names))}"]
        elif kind == "loop":
            names.append("i")
            out = [f"for i in range({draw(st.integers(0, 3))}):"]
            for _ in range(draw(st.integers(1, 2))):
                out += ["    " + ln for ln in body_line(depth + 1)]
            return out
        else:
            name = next(fresh, "x")
            dist = draw(st.sampled_from(DISTS)).format(draw(_expr(names)), draw(_expr(names)))
            using = draw(st.one_of(st.just(""), st.sampled_from(ESTIMATORS).map(" using {}".format)))
            out = [f"{name} ~ {dist}{using}"]
        names.append(out[0].split()[0])
        return out

    for _ in range(draw(st.integers(0, 4))):
        lines += body_line(0)
    lines.append(f"cost {draw(_expr(names))}")
    return "\n".join(lines) + "\n"


SEEDS = [
    # the seed story
    "a = param(1.0)\nb = param(2.0)\nc = param(0.5)\nd = a + b\ne ~ Normal(c + b, 1)\nf = d * e**2\ncost f\n",
    # Bernoulli toy with a per-site estimator
    "t = param(0.0)\nb ~ Bernoulli(logits=t) using score(baseline='rloo')\ncost (b - 0.45)**2\n",
    # a loop (sequential story) with two costs
    "w = param(0.3)\nfor k in range(2):\n    a ~ Bernoulli(logits=w)\n    cost a * 2.0\ncost(w * w)\n",
    # vectors, a categorical, an exact-capable estimator, a multi-line bracket
    "m = param(torch.zeros(3))\nz ~ Categorical(logits=m) using enumerate\nv = torch.tensor([1.0, 2.0,\n"
    "                   3.0])\ncost v[z]  # the value of the category\n",
    # a namespace-free continuous story with helpers
    "s = param(0.5)\nx ~ Normal(0, exp(s))\ny = sigmoid(x) + log1p(abs(x))\ncost mean(y * s)\n",
]
INSERTS = ["~", "=", "(", ")", "[", "]", ":", ",", "using", "cost", "param(", "\n", "    ", "#", "'", "\x00", "*",
           "\u00e9", " ", "**", "0", "x", "Normal(", "for i in range(2):"]  # fmt: skip
MUTATIONS = ["del_char", "dup_char", "swap_chars", "del_line", "dup_line", "swap_lines", "insert"]


@st.composite
def mutated(draw) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(MUTATIONS))
        lines = text.split("\n")
        if op.endswith("line") or op.endswith("lines"):
            i = draw(st.integers(0, len(lines) - 1))
            if op == "del_line":
                del lines[i]
            elif op == "dup_line":
                lines.insert(i, lines[i])
            else:
                j = draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif text:
            i = draw(st.integers(0, len(text) - 1))
            if op == "del_char":
                text = text[:i] + text[i + 1 :]
            elif op == "dup_char":
                text = text[:i] + text[i] + text[i:]
            elif op == "swap_chars" and i + 1 < len(text):
                text = text[:i] + text[i + 1] + text[i] + text[i + 2 :]
            elif op == "insert":
                text = text[:i] + draw(st.sampled_from(INSERTS)) + text[i:]
    return text


# ----------------------------------------------------------------- checks


class Hang(BaseException):
    """The watchdog fired: the example made the engine run far too long."""


def _fire(signum, frame):
    raise Hang(f"no answer after {RUN_SECONDS} s")


def _check_story_error(exc: sn.StoryError, text: str) -> None:
    lines = text.splitlines()
    assert exc.lineno is None or 1 <= exc.lineno <= max(1, len(lines)), f"lineno {exc.lineno} outside the text"
    rendered = exc._render_traceback_()
    assert rendered and all(isinstance(s, str) for s in rendered)
    assert str(exc) and exc.message


def _attempt(text: str, run: bool) -> None:
    """Parse (and run) ``text``; fail with the input on anything but a result or a StoryError."""
    rng = torch.get_rng_state()
    dtype = torch.get_default_dtype()
    old = signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, RUN_SECONDS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            story = sn.Story(text)
            event("parsed")
            if run:
                story.run(samples=4, seed=0)
                event("ran")
    except sn.StoryError as exc:
        event(type(exc).__name__)
        try:
            _check_story_error(exc, text)
        except Exception as bad:  # noqa: BLE001
            pytest.fail(f"a StoryError broke its contract ({bad!r}) for the input {text!r}: {exc.message!r}")
    except Hang:
        pytest.fail(f"no answer after {RUN_SECONDS} s for the input {text!r}")
    except BaseException as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(exc).__name__}: {exc} -- for the input {text!r}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert torch.equal(rng, torch.get_rng_state()), f"a seeded run moved the global RNG: {text!r}"
    assert torch.get_default_dtype() == dtype


_BIG_INT = re.compile(r"(?<![\w.])\d+(?![\w.])")


def _small_numbers(text: str) -> bool:
    return all(int(m) <= 64 for m in _BIG_INT.findall(text))


# ------------------------------------------------------------------- tests


@PARSE
@given(soup)
def test_token_soup_parses_or_raises_story_error(text):
    _attempt(text, run=False)


# inputs the exploratory runs found (kept as fixed regression examples)
FOUND = [
    "b = param(2.0)\nc = param(0.5)\nd = a + b\nf =  * e**2\ncost f\n",  # SyntaxError from compile()
    "w = param(0.3)\nfor k in range(2):\n",  # lineno 3 in a 2-line text
]


@PARSE
@given(mutated())
@example(FOUND[0])
@example(FOUND[1])
def test_mutated_story_parses_or_raises_story_error(text):
    _attempt(text, run=False)


@RUN
@given(soup)
def test_token_soup_runs_or_raises_story_error(text):
    assume(_small_numbers(text))
    _attempt(text, run=True)


@PARSE
@given(line_soup())
def test_line_soup_parses_or_raises_story_error(text):
    _attempt(text, run=False)


@RUN
@given(line_soup())
def test_line_soup_runs_or_raises_story_error(text):
    assume(_small_numbers(text))
    _attempt(text, run=True)


@RUN
@given(mutated())
def test_mutated_story_runs_or_raises_story_error(text):
    assume(_small_numbers(text))
    _attempt(text, run=True)


def test_seeds_are_valid():
    """The mutation seeds themselves run (so mutations start from working stories)."""
    for text in SEEDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = sn.Story(text).run(samples=4, seed=0)
        assert res.grads
