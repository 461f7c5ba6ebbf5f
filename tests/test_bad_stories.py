"""Issue 6, item 1: a catalogue of bad inputs. Each one raises a ``StoryError``
subclass (the exact subclass where it is clear which one fits) whose message
names the line (``.lineno``, when the input has a line) and whose hint says
what to do -- never another exception type, never a hang.

Every entry runs twice: through ``Story(text).run(...)`` and through the
``%%storch`` magic in a real IPython shell. In the magic a bad *option* is a
short ``UsageError`` by design (argparse checks it), a bad story is a
``StoryError`` whose rendering counts the ``%%storch`` line as line 1.

Inputs that could hang (a loop of 10**9 iterations, 10**30 samples) run under
a watchdog: a ``SIGALRM`` that raises ``Hang`` (a ``BaseException``, so no
``except Exception`` in the engine can swallow it), which fails the test
instead of blocking the suite.
"""

from __future__ import annotations

import contextlib
import signal
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

import storch_nb as sn
from storch_nb import EstimatorError, StoryError, StoryNameError, StorySyntaxError

OK = "a = param(1.0)\ne ~ Normal(a, 1)\ncost e**2\n"
BERN = "t = param(0.0)\nb ~ Bernoulli(logits=t)\ncost (b - 0.45)**2\n"

ANY = object()  # do not check the line number
DEFAULT_MAGIC = "-n 4 --seed 0"
WATCHDOG_S = 4.0


class Hang(BaseException):
    """Raised by the watchdog: the input made the engine run for too long."""


@contextlib.contextmanager
def watchdog(seconds: float = WATCHDOG_S):
    def fire(signum, frame):
        raise Hang(f"no answer after {seconds} s: the input hangs the engine")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _boom(x):
    raise RuntimeError("boom from a notebook function")


def _recurse(x):
    return _recurse(x)


@dataclass
class Bad:
    id: str
    text: str
    cls: type[StoryError] = StoryError
    lineno: Any = ANY  # expected .lineno (None: no line), ANY: not checked
    exact: bool = True  # the class is exactly ``cls`` (else: a subclass of it)
    kwargs: dict = field(default_factory=dict)  # Story.run options (on top of samples=4, seed=0)
    ns: Callable[[], dict] | None = None
    magic: str | None = DEFAULT_MAGIC  # the %%storch option line; None: no magic equivalent
    magic_usage: bool = False  # the magic answers with a UsageError (bad option, empty cell)


LONG_SUM = "b = " + " + ".join(["a"] * 25_000) + "\n"  # ~100k characters of valid syntax
assert len(LONG_SUM) > 100_000

CATALOGUE: list[Bad] = [
    # ---------------------------------------------------------------- syntax
    Bad("syntax-operator", "a = param(1.0)\nb = a +* 2\ncost b\n", StorySyntaxError, 2),
    Bad("tilde-without-distribution", "a = param(1.0)\ne ~\ncost e\n", StorySyntaxError, 2),
    Bad("tilde-left-not-a-name", "a = param(1.0)\n3 ~ Normal(a, 1)\ncost a\n", StorySyntaxError, 2),
    Bad("unclosed-bracket", "a = param(1.0)\nb = (a * 2\ncost b\n", StorySyntaxError, 2),
    Bad("unterminated-string", "a = param(1.0)\ncost 'abc\n", StorySyntaxError, 2),
    Bad("unexpected-indent", "a = param(1.0)\n  b = a\ncost b\n", StorySyntaxError, 2),
    Bad("tabs-and-spaces", "t = param(1.0)\nfor i in range(2):\n\tx = t\n        cost x\n", StorySyntaxError, 4),
    Bad("loop-without-body", "t = param(1.0)\nfor i in range(2):\ncost t\n", StorySyntaxError, 3),
    Bad("starred-assignment", "a = param(1.0)\nf = * a\ncost f\n", StorySyntaxError, 2),
    Bad("loop-header-on-the-last-line", "w = param(0.3)\nfor k in range(2):\n", StorySyntaxError, 2),
    Bad("tuple-assignment", "a = param(1.0)\nb, c = a, a\ncost b\n", StorySyntaxError, 2),
    Bad("if-statement", "a = param(1.0)\nif a:\n    b = a\ncost a\n", StorySyntaxError, 2),
    Bad("import-statement", "import os\nt = param(1.0)\ncost t\n", StorySyntaxError, 1),
    Bad("def-statement", "def f(x):\n    return x\nt = param(1.0)\ncost t\n", StorySyntaxError, 1),
    Bad("walrus", "t = param(1.0)\ncost (y := t)\n", StorySyntaxError, 2),
    Bad("expression-alone", "a = param(1.0)\na + 1\ncost a\n", StorySyntaxError, 2),
    Bad("invalid-character", "t = param(1.0)\ncost t * \u20ac\n", StorySyntaxError, 2),
    Bad("starred-distribution-args", "t = param(1.0)\nx ~ Normal(*[t, 1])\ncost x\n", StorySyntaxError, 2),
    Bad(
        "double-starred-distribution-args",
        "t = param(1.0)\nx ~ Normal(**{'loc': t, 'scale': 1})\ncost x\n",
        StorySyntaxError,
        2,
    ),
    Bad("cost-without-expression", "a = param(1.0)\ncost\n", StorySyntaxError, 2),
    Bad("cost-two-expressions", "a = param(1.0)\ne ~ Normal(a, 1)\ncost(e, a)\n", StoryError, 3, exact=False),
    Bad("no-cost", "a = param(1.0)\nb = a * 2\n", StorySyntaxError, None),
    Bad("using-without-estimator", "t = param(0.0)\nb ~ Bernoulli(logits=t) using\ncost b\n", StorySyntaxError, 2),
    Bad(
        "using-positional-option",
        "t = param(0.0)\nb ~ Bernoulli(logits=t) using score(3)\ncost b\n",
        StoryError,
        2,
        exact=False,
    ),
    # ---------------------------------------------------------- empty, odd bytes, big
    Bad("empty", "", StorySyntaxError, None, magic_usage=True),
    Bad("whitespace-only", "   \n\t\n  \n", StorySyntaxError, None, magic_usage=True),
    Bad("comments-only", "# a story to be written\n# later\n", StorySyntaxError, None),
    Bad("nul-byte", "a = param(1.0)\nb = a\x00\ncost b\n", StorySyntaxError, 2),
    Bad("long-line-unknown-name", "a = param(1.0)\nb = " + "x" * 100_000 + "\ncost b\n", StoryNameError, 2),
    Bad("long-line-100k-chars-sum", "a = param(1.0)\n" + LONG_SUM + "cost b\n", StorySyntaxError, 2, exact=False),
    Bad(
        "deeply-nested-parentheses",
        "a = param(1.0)\nb = " + "(" * 1000 + "a" + ")" * 1000 + "\ncost b\n",
        StorySyntaxError,
        2,
    ),
    Bad(
        "deeply-nested-unary", "a = param(1.0)\nb = " + "-" * 100_000 + "a\ncost b\n", StorySyntaxError, 2, exact=False
    ),
    Bad("deeply-nested-power", "a = param(1.0)\nb = a" + "**a" * 5000 + "\ncost b\n", StorySyntaxError, 2, exact=False),
    # ------------------------------------------------------------------- names
    Bad("unknown-name", "alpha = param(1.0)\nb = alpah * 2\ncost b\n", StoryNameError, 2),
    Bad("unknown-distribution", "a = param(1.0)\ne ~ Normall(a, 1)\ncost e\n", StoryNameError, 2),
    Bad("unknown-name-in-loop-bound", "a = param(1.0)\nfor i in range(N):\n    cost a\n", StoryNameError, 2),
    Bad(
        "unknown-name-in-cost",
        "a = param(1.0)\ne ~ Normal(a, 1)\ncost e * wieght\n",
        StoryNameError,
        3,
        ns=lambda: {"weight": 2.0},
    ),
    # --------------------------------------------------- distribution arguments
    Bad("normal-negative-scale", "a = param(1.0)\ne ~ Normal(a, -1)\ncost e\n", StoryError, 2),
    Bad("bernoulli-probs-above-one", "a = param(1.0)\ne ~ Bernoulli(probs=2.0)\ncost e * a\n", StoryError, 2),
    Bad("bernoulli-probs-and-logits", "a = param(1.0)\ne ~ Bernoulli(probs=0.5, logits=a)\ncost e\n", StoryError, 2),
    Bad("distribution-missing-argument", "a = param(1.0)\ne ~ Normal(a)\ncost e\n", StoryError, 2),
    Bad("distribution-unknown-keyword", "a = param(1.0)\ne ~ Normal(a, 1, foo=2)\ncost e\n", StoryError, 2),
    Bad("distribution-too-many-arguments", "a = param(1.0)\ne ~ Normal(a, 1, 2, 3)\ncost e\n", StoryError, 2),
    Bad(
        "categorical-empty-probs",
        "a = param(1.0)\ne ~ Categorical(probs=torch.tensor([]))\ncost e * a\n",
        StoryError,
        2,
    ),
    Bad("tilde-a-number", "t = param(1.0)\nx ~ 3\ncost x + t\n", StoryError, 2),
    Bad("tilde-a-non-distribution-call", "t = param(1.0)\nx ~ int(3)\ncost x + t\n", StoryError, 2),
    Bad(
        "tilde-a-namespace-number",
        "m = param(0.0)\nx ~ notadist\ncost x + m\n",
        StoryError,
        2,
        ns=lambda: {"notadist": 3},
    ),
    # ----------------------------------------------------------------- shapes
    Bad(
        "shape-mismatch-add",
        "m = param(torch.zeros(3))\nx ~ Normal(m, 1)\ny = x + torch.ones(4)\ncost y.sum()\n",
        StoryError,
        3,
    ),
    Bad(
        "shape-mismatch-matmul",
        "m = param(torch.zeros(3))\nx ~ Normal(m, 1)\ny = x @ torch.ones(4)\ncost y\n",
        StoryError,
        3,
    ),
    Bad(
        "shape-mismatch-distribution-args",
        "m = param(torch.zeros(3))\nx ~ Normal(m, torch.ones(4))\ncost x.sum()\n",
        StoryError,
        2,
    ),
    Bad(
        "shape-mismatch-mvn",
        "m = param(torch.zeros(2))\nx ~ MultivariateNormal(m, torch.eye(3))\ncost x.sum()\n",
        StoryError,
        2,
    ),
    Bad("index-out-of-range", "t = param(1.0)\nx ~ Normal(t, 1)\ny = x[5]\ncost y\n", StoryError, 3),
    Bad("item-on-a-sample", "t = param(1.0)\nx ~ Normal(t, 1)\ny = x.item()\ncost y\n", StoryError, 3),
    Bad(
        "python-if-on-a-sample",
        "t = param(1.0)\nx ~ Normal(t, 1)\ny = 1.0 if x > 0 else 0.0\ncost y * t\n",
        StoryError,
        3,
    ),
    # --------------------------------------------------- estimator / site mismatch
    Bad("pathwise-on-bernoulli", "t = param(0.0)\nb ~ Bernoulli(logits=t) using pathwise\ncost b\n", EstimatorError, 2),
    Bad("enumerate-on-normal", "t = param(0.0)\nb ~ Normal(t, 1) using enumerate\ncost b\n", EstimatorError, 2),
    Bad("gumbel-on-normal", "t = param(0.0)\nb ~ Normal(t, 1) using gumbel\ncost b\n", EstimatorError, 2),
    Bad("using-unknown-estimator", "t = param(0.0)\nb ~ Normal(t, 1) using nope\ncost b\n", EstimatorError, 2),
    Bad("using-unknown-option", "t = param(0.0)\nb ~ Normal(t, 1) using score(zz=1)\ncost b\n", EstimatorError, 2),
    Bad(
        "using-negative-temperature",
        "t = param(0.0)\nb ~ Bernoulli(logits=t) using gumbel(temperature=-1)\ncost b\n",
        EstimatorError,
        2,
    ),
    Bad(
        "using-text-temperature",
        "t = param(0.0)\nb ~ Bernoulli(logits=t) using gumbel(temperature='x')\ncost b\n",
        EstimatorError,
        2,
    ),
    Bad("using-float-n", "t = param(0.0)\nb ~ Bernoulli(logits=t) using score(n=2.5)\ncost b\n", EstimatorError, 2),
    Bad("relax-ema-one", "t = param(0.0)\nb ~ Bernoulli(logits=t) using relax(ema=1)\ncost b\n", EstimatorError, 2),
    Bad("relax-negative-ridge", "t = param(0.0)\nb ~ Bernoulli(logits=t) using relax(ridge=-1)\ncost b\n", EstimatorError, 2),
    Bad("rebar-loo-number", "t = param(0.0)\nb ~ Bernoulli(logits=t) using rebar(loo=1)\ncost b\n", EstimatorError, 2),
    Bad("rebar-text-eta", "t = param(0.0)\nb ~ Bernoulli(logits=t) using rebar(eta='x')\ncost b\n", EstimatorError, 2),
    Bad(
        "using-bad-baseline",
        "t = param(0.0)\nb ~ Bernoulli(logits=t) using score(baseline='bogus')\ncost b\n",
        EstimatorError,
        2,
    ),
    Bad(
        "rloo-with-one-sample",
        "t = param(0.0)\nb ~ Bernoulli(logits=t) using rloo\ncost b\n",
        EstimatorError,
        2,
        kwargs={"samples": 1},
        magic="-n 1 --seed 0",
    ),
    # ------------------------------------------------------ parameters not floats
    Bad("param-text", "a = param('x')\ncost a\n", StoryError, 1),
    Bad("param-list", "a = param([1, 2])\ncost a.sum()\n", StoryError, 1),
    Bad("param-none", "a = param(None)\ncost a\n", StoryError, 1),
    Bad("param-bool", "a = param(True)\ncost a\n", StoryError, 1),
    Bad("param-complex", "a = param(1j)\ncost a\n", StoryError, 1),
    Bad("param-bool-tensor", "a = param(torch.tensor([True]))\ne ~ Normal(a, 1)\ncost e.sum()\n", StoryError, 1),
    Bad("param-two-values", "a = param(1.0, 2.0)\ncost a\n", StorySyntaxError, 1),
    Bad("param-depends-on-story", "a = param(1.0)\nb = param(a)\ncost b\n", StoryError, 2),
    # --------------------------------------------------------- costs not numbers
    Bad("cost-text", "a = param(1.0)\ne ~ Normal(a, 1)\ncost 'x'\n", StoryError, 3),
    Bad("cost-list", "a = param(1.0)\ne ~ Normal(a, 1)\ncost list((e, a))\n", StoryError, 3),
    Bad("cost-list-display", "a = param(1.0)\ne ~ Normal(a, 1)\ncost [e, a]\n", StorySyntaxError, 3),
    Bad("cost-distribution", "a = param(1.0)\ncost Normal(a, 1)\n", StoryError, 2),
    Bad("cost-none", "a = param(1.0)\ncost None\n", StoryError, 2),
    Bad("cost-bool", "a = param(1.0)\ncost True\n", StoryError, 2),
    Bad("cost-complex", "a = param(1.0)\ne ~ Normal(a, 1)\ncost e * 1j\n", StoryError, 3),
    # ------------------------------------------------------------------- loops
    Bad("loop-float-range", "t = param(0.0)\nfor i in range(2.5):\n    cost t\n", StoryError, 2),
    Bad("loop-text-range", "t = param(0.0)\nfor i in range('a'):\n    cost t\n", StoryError, 2),
    Bad("loop-over-a-parameter", "t = param(0.0)\nfor i in range(t):\n    cost t\n", StoryError, 2),
    Bad("loop-over-a-list", "t = param(0.0)\nfor i in [1, 2]:\n    cost t\n", StorySyntaxError, 2),
    Bad("loop-zero-step", "t = param(0.0)\nfor i in range(0, 5, 0):\n    cost t\n", StoryError, 2),
    Bad("loop-a-billion-times", "t = param(0.0)\nfor i in range(10**9):\n    cost t\n", StoryError, 2),
    Bad("loop-never-runs", "t = param(0.0)\nfor i in range(0):\n    cost t\n", StoryError, ANY),
    Bad("loop-with-else", "t = param(0.0)\nfor i in range(2):\n    cost t\nelse:\n    cost t\n", StorySyntaxError, 5),
    # ---------------------------------------------------------- reserved names
    Bad("reserved-cost", "cost = param(1.0)\ncost cost\n", StorySyntaxError, 1),
    Bad("reserved-param", "param = 3\nt = param(1.0)\ncost t\n", StorySyntaxError, 1),
    Bad("reserved-range", "range = 3\nt = param(1.0)\ncost t\n", StorySyntaxError, 1),
    Bad("reserved-internal", "__storch_site__ = 3\nt = param(1.0)\ncost t\n", StorySyntaxError, 1),
    # ---------------------------------------------- failures while the story runs
    Bad("notebook-function-raises", "t = param(1.0)\ncost f(t)\n", StoryError, 2, ns=lambda: {"f": _boom}),
    Bad("notebook-function-recurses", "t = param(1.0)\ncost f(t)\n", StoryError, 2, ns=lambda: {"f": _recurse}),
    Bad("division-by-zero", "t = param(1.0)\nx = 1 / 0\ncost t + x\n", StoryError, 2),
    Bad("call-a-string", "t = param(1.0)\nx = 'a'(1)\ncost t\n", StoryError, 2),
    Bad("int-overflow", "t = param(1.0)\ncost t * 10**400\n", StoryError, 2),
    Bad("nan-step", "a = param(-1.0)\ne ~ Normal(0, 1)\nf = log(a) * e\ncost f\n", StoryError, 3),
    Bad("infinite-cost", "t = param(1.0)\ncost t * 1e400\n", StoryError, 2),
    # ------------------------------------------------------ bad options to run()
    Bad("samples-zero", OK, StoryError, None, kwargs={"samples": 0}, magic="-n 0", magic_usage=True),
    Bad("samples-negative", OK, StoryError, None, kwargs={"samples": -1}, magic="-n -1", magic_usage=True),
    Bad("samples-fraction", OK, StoryError, None, kwargs={"samples": 2.5}, magic="-n 2.5", magic_usage=True),
    Bad("samples-text", OK, StoryError, None, kwargs={"samples": "10"}, magic=None),
    Bad("samples-bool", OK, StoryError, None, kwargs={"samples": True}, magic=None),
    Bad("samples-none", OK, StoryError, None, kwargs={"samples": None}, magic=None),
    Bad("samples-10e30", OK, StoryError, None, kwargs={"samples": 10**30}, magic="-n " + str(10**30), magic_usage=True),
    Bad("runs-zero", OK, StoryError, None, kwargs={"runs": 0}, magic="-r 0", magic_usage=True),
    Bad("runs-text", OK, StoryError, None, kwargs={"runs": "2"}, magic=None),
    Bad("runs-10e28", OK, StoryError, None, kwargs={"runs": 10**28}, magic="-n 4 -r " + str(10**28), magic_usage=True),
    Bad("device-tpu", OK, StoryError, None, kwargs={"device": "tpu"}, magic="--device tpu", magic_usage=True),
    Bad("device-number", OK, StoryError, None, kwargs={"device": 3}, magic="--device 3", magic_usage=True),
    Bad("dtype-int8", OK, StoryError, None, kwargs={"dtype": "int8"}, magic="--dtype int8", magic_usage=True),
    Bad(
        "dtype-torch-int64",
        OK,
        StoryError,
        None,
        kwargs={"dtype": torch.int64},
        magic="--dtype int64",
        magic_usage=True,
    ),
    Bad("dtype-torch-bool", OK, StoryError, None, kwargs={"dtype": torch.bool}, magic="--dtype bool", magic_usage=True),
    Bad("estimator-number", OK, EstimatorError, None, kwargs={"estimator": 3}, magic="-n 4 -e 3"),
    Bad("estimator-unknown", OK, EstimatorError, ANY, kwargs={"estimator": "nope"}, magic="-n 4 -e nope"),
    Bad(
        "estimator-unreadable",
        OK,
        EstimatorError,
        None,
        kwargs={"estimator": "score("},
        magic="-n 4 -e score(",
        magic_usage=True,
    ),
    Bad("estimator-empty", OK, EstimatorError, None, kwargs={"estimator": ""}, magic="-n 4 -e ''", magic_usage=True),
    Bad("estimator-list", OK, EstimatorError, None, kwargs={"estimator": ["score"]}, magic=None),
    Bad(
        "estimator-mapping-unknown-site",
        OK,
        EstimatorError,
        None,
        kwargs={"estimator": {"zz": "score"}},
        magic="-n 4 -e \"{'zz': 'score'}\"",
    ),
    Bad(
        "estimator-mapping-not-text",
        OK,
        EstimatorError,
        None,
        kwargs={"estimator": {"e": 3}},
        magic="-n 4 -e \"{'e': 3}\"",
        magic_usage=True,
    ),
    Bad(
        "estimator-pathwise-on-bernoulli",
        BERN,
        EstimatorError,
        2,
        kwargs={"estimator": "pathwise"},
        magic="-n 4 -e pathwise",
    ),
    # ------------------------------------------------ plates and the rules of issue 11
    Bad("plate-over-a-scalar", "a = param(1.0)\nfor x_i in plate(k):\n    z ~ Normal(a, 1)\n    cost z\n", StoryError, 2,
        ns=lambda: {"k": torch.tensor(3.0)}),
    Bad("plate-over-a-number", "a = param(1.0)\nfor x_i in plate(k):\n    z ~ Normal(a, 1)\n    cost z\n", StoryError, 2,
        ns=lambda: {"k": 3}),
    Bad("plate-lengths-differ", "a = param(1.0)\nfor x_i, y_i in plate(x, y):\n    z ~ Normal(a + x_i, 1)\n    cost z * y_i\n",
        StoryError, 2, ns=lambda: {"x": torch.zeros(3), "y": torch.zeros(4)}),
    Bad("plate-batch-over-n", "a = param(1.0)\nfor x_i in plate(x, batch=5):\n    z ~ Normal(a + x_i, 1)\n    cost z\n",
        StoryError, 2, ns=lambda: {"x": torch.zeros(3)}),
    Bad("plate-batch-zero", "a = param(1.0)\nfor x_i in plate(x, batch=0):\n    z ~ Normal(a + x_i, 1)\n    cost z\n",
        StoryError, 2, ns=lambda: {"x": torch.zeros(3)}),
    Bad("plate-batch-fraction", "a = param(1.0)\nfor x_i in plate(x, batch=1.5):\n    z ~ Normal(a + x_i, 1)\n    cost z\n",
        StoryError, 2, ns=lambda: {"x": torch.zeros(3)}),
    Bad("plate-batch-from-a-sample", "a = param(1.0)\ne ~ Normal(a, 1)\nfor x_i in plate(x, batch=e):\n    cost x_i * e\n",
        StoryError, 3, ns=lambda: {"x": torch.zeros(3)}),
    Bad("plate-inside-a-loop", "a = param(1.0)\nfor t in range(2):\n    for x_i in plate(x):\n        cost a * x_i\n",
        StorySyntaxError, 3, ns=lambda: {"x": torch.zeros(3)}),
    Bad("plate-names-fewer-than-tensors", "a = param(1.0)\nfor x_i in plate(x, y):\n    cost a * x_i\n",
        StorySyntaxError, 2, ns=lambda: {"x": torch.zeros(3), "y": torch.zeros(3)}),
    Bad("plate-bad-reduce", "a = param(1.0)\nfor x_i in plate(x, reduce='max'):\n    cost a * x_i\n",
        StorySyntaxError, 2, ns=lambda: {"x": torch.zeros(3)}),
    Bad("plate-unknown-option", "a = param(1.0)\nfor x_i in plate(x, size=3):\n    cost a * x_i\n",
        StorySyntaxError, 2, ns=lambda: {"x": torch.zeros(3)}),
    Bad("plate-without-data", "a = param(1.0)\nfor x_i in plate():\n    cost a\n", StorySyntaxError, 2),
    Bad("plate-param-inside", "for x_i in plate(x):\n    w = param(1.0)\n    cost w * x_i\n", StoryError, 2,
        ns=lambda: {"x": torch.zeros(3)}),
    Bad("plate-datapoint-after-the-block", "a = param(1.0)\nfor x_i in plate(x):\n    z ~ Normal(a + x_i, 1)\ncost z.sum() + x_i\n",
        StoryNameError, 4, ns=lambda: {"x": torch.zeros(3)}),
    Bad("plate-empty-data", "a = param(1.0)\nfor x_i in plate(x):\n    z ~ Normal(a + x_i, 1)\n    cost z\n", StoryError, 2,
        ns=lambda: {"x": torch.zeros(0)}),
    Bad("plate-indecater-cost-outside",
        "t = param(0.0)\nfor x_i in plate(x):\n    b ~ Bernoulli(logits=t + x_i) using indecater\ncost b.prod()\n",
        EstimatorError, ANY, ns=lambda: {"x": torch.zeros(3)}),
    Bad("name-before-its-line", "y = a * 2\na = param(1.0)\ncost y\n", StoryNameError, 1),
    Bad("name-before-its-line-in-namespace", "y = a * 2\na = param(1.0)\ncost y\n", StoryNameError, 1,
        ns=lambda: {"a": torch.tensor(1.0, requires_grad=True)}),
    Bad("randn-in-a-story", "a = param(1.0)\nx = a + torch.randn(())\ncost x**2\n", StoryError, 2),
    Bad("rand-like-in-a-story", "a = param(1.0)\ne ~ Normal(a, 1)\ncost e * torch.rand_like(e)\n", StoryError, 3),
    Bad("uniform-in-place-in-a-story", "a = param(1.0)\nx = a * torch.zeros(3).uniform_()\ncost x.sum()\n", StoryError, 2),
    Bad("sample-in-a-story", "a = param(1.0)\nx = Normal(a, 1).sample()\ncost x\n", StoryError, 2),
    Bad("negative-scale-from-a-param", "s = param(-0.5)\nx ~ Normal(0, s)\ncost x**2\n", StoryError, 2),
    Bad("probs-above-one-from-a-param", "p = param(1.5)\nb ~ Bernoulli(probs=p)\ncost b\n", StoryError, 2),
    Bad("seed-text", OK, StoryError, None, kwargs={"seed": "x"}, magic="-n 4 --seed x", magic_usage=True),
    Bad("seed-fraction", OK, StoryError, None, kwargs={"seed": 1.5}, magic="-n 4 --seed 1.5", magic_usage=True),
    Bad("seed-list", OK, StoryError, None, kwargs={"seed": [1]}, magic=None),
    Bad("seed-2e70", OK, StoryError, None, kwargs={"seed": 2**70}, magic="-n 4 --seed " + str(2**70), magic_usage=True),
    Bad("namespace-list", OK, StoryError, None, kwargs={"namespace": [1, 2]}, magic=None),
    Bad("max-memory-text", OK, StoryError, None, kwargs={"max_memory": "1GB"}, magic=None),
    Bad("max-memory-negative", OK, StoryError, None, kwargs={"max_memory": -1}, magic=None),
]


def test_catalogue_is_big_and_distinct():
    ids = [c.id for c in CATALOGUE]
    assert len(ids) == len(set(ids))
    inputs = {(c.text, repr(sorted(c.kwargs.items(), key=str)), repr(c.ns() if c.ns else None)) for c in CATALOGUE}
    assert len(inputs) == len(CATALOGUE)
    assert len(CATALOGUE) >= 40
    assert len([c for c in CATALOGUE if not c.kwargs]) >= 40  # bad story texts
    assert len([c for c in CATALOGUE if c.kwargs]) >= 20  # bad options


def _check_error(exc: BaseException, case: Bad, text: str, line_offset: int = 0) -> None:
    """The shared contract of every catalogue error."""
    assert isinstance(exc, StoryError), f"{case.id}: {type(exc).__name__} escaped: {exc!r}"
    if case.exact:
        assert type(exc) is case.cls, f"{case.id}: {type(exc).__name__} (expected {case.cls.__name__}): {exc}"
    else:
        assert isinstance(exc, case.cls), f"{case.id}: {type(exc).__name__} (expected {case.cls.__name__}): {exc}"
    assert exc.message and isinstance(exc.message, str)
    assert exc.hint, f"{case.id}: no hint saying what to do: {exc.render()}"
    rendered = exc._render_traceback_()
    assert isinstance(rendered, list) and all(isinstance(s, str) for s in rendered)
    assert "Traceback" not in "\n".join(rendered)
    assert rendered[0].startswith(type(exc).__name__)
    assert any(s.startswith("hint: ") for s in rendered)
    if case.lineno is not ANY:
        assert exc.lineno == case.lineno, f"{case.id}: lineno {exc.lineno}, expected {case.lineno}: {exc}"
    if exc.lineno is not None:
        lines = text.splitlines()
        assert 1 <= exc.lineno <= len(lines), f"{case.id}: lineno {exc.lineno} outside the story"
        assert f"line {exc.lineno + line_offset}:" in rendered[0], rendered[0]
        assert exc.line is not None
        # the offending line is shown (long lines cut) with a caret under it
        shown = exc.line.rstrip("\n").replace("\x00", "\\0")[:100].strip()
        i = next((i for i, s in enumerate(rendered) if i and shown and s.strip().startswith(shown)), None)
        assert i is not None, f"{case.id}: line {shown!r} not shown in {rendered}"
        assert rendered[i + 1].strip() == "^", rendered


def _api_call(case: Bad):
    kwargs = {"samples": 4, "seed": 0, **case.kwargs}
    if case.ns is not None:
        kwargs["namespace"] = case.ns()
    return sn.Story(case.text).run(**kwargs)


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_api(case):
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with watchdog():
                res = _api_call(case)
        except Hang as exc:
            pytest.fail(f"{case.id}: {exc}")
        except BaseException as exc:  # noqa: BLE001 - the point: every other type is a failure
            _check_error(exc, case, case.text)
        else:
            pytest.fail(f"{case.id}: no error; the run gave cost {res.cost}")
    assert torch.equal(rng, torch.get_rng_state()), f"{case.id}: a seeded run changed the global RNG"


# ---------------------------------------------------------------- the magic


@pytest.fixture(scope="module")
def ip():
    cfg = Config()
    cfg.HistoryAccessor.enabled = False
    shell = InteractiveShell.instance(config=cfg)
    shell.run_line_magic("load_ext", "storch_nb")
    yield shell
    shell.run_line_magic("unload_ext", "storch_nb")


MAGIC_CASES = [c for c in CATALOGUE if c.magic is not None]


@pytest.mark.parametrize("case", MAGIC_CASES, ids=[c.id for c in MAGIC_CASES])
def test_magic(ip, case):
    ns = case.ns() if case.ns is not None else {}
    added = [k for k in ns if k not in ip.user_ns]
    ip.user_ns.update(ns)
    before = dict(ip.user_ns)
    try:
        with warnings.catch_warnings(), capture_output() as cap:
            warnings.simplefilter("ignore")
            try:
                with watchdog():
                    ip.run_cell_magic("storch", case.magic, case.text)
            except Hang as exc:
                pytest.fail(f"{case.id}: {exc}")
            except UsageError as exc:
                assert case.magic_usage, f"{case.id}: a UsageError where a StoryError was expected: {exc}"
                assert str(exc).strip()
            except BaseException as exc:  # noqa: BLE001
                assert not case.magic_usage or isinstance(exc, StoryError), (
                    f"{case.id}: {type(exc).__name__} escaped: {exc!r}"
                )
                _check_error(exc, case, case.text, line_offset=1)
                assert exc.line_offset == 1
            else:
                pytest.fail(f"{case.id}: the cell ran without an error")
        assert not cap.outputs, f"{case.id}: a failing cell displayed {cap.outputs}"
        assert ip.user_ns.keys() == before.keys()
        assert all(ip.user_ns[k] is v for k, v in before.items())
    finally:
        for k in added:
            ip.user_ns.pop(k, None)


# ------------------------------------------------ the other entry points never crash


STORY_CASES = [c for c in CATALOGUE if not c.kwargs]


@pytest.mark.parametrize("case", STORY_CASES, ids=[c.id for c in STORY_CASES])
def test_surrogate_and_exact_raise_only_story_errors(case):
    """``surrogate`` and ``exact`` on the same texts: a value or a StoryError."""
    ns = case.ns() if case.ns is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call in ("surrogate", "exact"):
            try:
                with watchdog():
                    story = sn.Story(case.text)
                    if call == "surrogate":
                        story.surrogate(samples=4, seed=0, namespace=ns)
                    else:
                        story.exact(namespace=ns)
            except Hang as exc:
                pytest.fail(f"{case.id} ({call}): {exc}")
            except StoryError:
                pass
            except BaseException as exc:  # noqa: BLE001
                pytest.fail(f"{case.id} ({call}): {type(exc).__name__} escaped: {exc!r}")
