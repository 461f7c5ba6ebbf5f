"""Issue 6, item 3: a failing ``%%storch`` cell loses nothing.

After any failing cell -- a story error, an estimator error, a NaN error, a bad
option, an error inside a notebook function the story calls, a failure in the
middle of ``--train`` or ``--compare`` -- the user namespace (keys, identities,
tensor values), parameters (values and ``.grad``), torch's global RNG state and
the default dtype are exactly as before; with and without ``--seed``.

A ``KeyboardInterrupt`` during a long run (raised by a notebook function on its
3rd call, or delivered by a signal timer while the story runs) leaves the same
guarantees, and the shell then runs the next ``%%storch`` cell correctly.

A failing cell without ``--seed`` has usually drawn random numbers before it
failed; the guarantee is that the global generator is *as before the cell*
anyway (the magic must save the state and put it back when the cell fails).
"""

from __future__ import annotations

import re
import signal
import time
import warnings

import pytest
import torch
from conftest import SEED_STORY
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from torch import nn
from traitlets.config import Config

import storch_nb as sn

# IPython's own bookkeeping names (run_cell adds them); everything else is the user's
_IPYTHON = re.compile(r"^(_+|_i+|_i\d+|_\d+|_ih|_oh|_dh|In|Out|get_ipython|exit|quit|_exit_code)$")


@pytest.fixture(scope="module")
def shell():
    cfg = Config()
    cfg.HistoryAccessor.enabled = False
    ip = InteractiveShell.instance(config=cfg)
    ip.run_line_magic("load_ext", "storch_nb")
    yield ip
    ip.run_line_magic("unload_ext", "storch_nb")


class Calls:
    """A notebook function that fails (``exc``) on its ``fail_at``-th call."""

    def __init__(self, fail_at: int, exc: type[BaseException] = RuntimeError) -> None:
        self.n = 0
        self.fail_at = fail_at
        self.exc = exc

    def __call__(self, x):
        self.n += 1
        if self.n >= self.fail_at:
            raise self.exc(f"call {self.n} of a notebook function failed")
        return x


USER_NAMES = ("w", "lin", "data", "k", "label", "items", "f", "g", "res")


@pytest.fixture
def ip(shell):
    """A namespace with the things a notebook holds: an nn.Parameter with a
    .grad, a module with grads, a data tensor, numbers, text, a list, functions."""
    torch.manual_seed(1234)
    w = nn.Parameter(torch.tensor([0.5, -0.25]))
    w.grad = torch.tensor([7.0, 8.0])
    lin = nn.Linear(2, 1)
    lin(torch.ones(1, 2)).sum().backward()  # leaves a .grad on its weight and bias
    ns = {
        "w": w,
        "lin": lin,
        "data": torch.randn(5),
        "k": 3,
        "label": "an experiment",
        "items": [1, 2, 3],
        "f": Calls(fail_at=1),
        "g": lambda x: x,
    }
    shell.user_ns.update(ns)
    yield shell
    for name in USER_NAMES:
        shell.user_ns.pop(name, None)


def snapshot(ns) -> dict:
    """Everything a failing cell must leave alone, with copies of tensor contents."""
    snap = {}
    for k, v in ns.items():
        if _IPYTHON.match(k):
            continue
        entry: dict = {"obj": v}
        if isinstance(v, torch.Tensor):
            entry["value"] = v.detach().clone()
            entry["requires_grad"] = v.requires_grad
            entry["grad"] = None if v.grad is None else (v.grad, v.grad.detach().clone())
        if isinstance(v, nn.Module):
            entry["state"] = {n: t.detach().clone() for n, t in v.state_dict().items()}
            entry["grads"] = {
                n: None if p.grad is None else (p.grad, p.grad.detach().clone()) for n, p in v.named_parameters()
            }
        snap[k] = entry
    return {
        "ns": snap,
        "rng": torch.get_rng_state(),
        "dtype": torch.get_default_dtype(),
        "grad_mode": torch.is_grad_enabled(),
    }


def _same_grad(before, now, what: str) -> None:
    if before is None:
        assert now is None, f"{what}: a .grad appeared"
        return
    obj, value = before
    assert now is not None, f"{what}: the .grad was removed"
    assert torch.equal(now, value), f"{what}: the .grad changed from {value} to {now}"


def assert_as_before(ip, snap: dict) -> None:
    ns = {k: v for k, v in ip.user_ns.items() if not _IPYTHON.match(k)}
    assert ns.keys() == snap["ns"].keys(), f"namespace keys changed: {set(ns) ^ set(snap['ns'])}"
    for k, entry in snap["ns"].items():
        v = ns[k]
        assert v is entry["obj"], f"`{k}` was replaced"
        if "value" in entry:
            assert torch.equal(v.detach(), entry["value"]), f"`{k}` changed from {entry['value']} to {v}"
            assert v.requires_grad == entry["requires_grad"], f"`{k}`.requires_grad changed"
            _same_grad(entry["grad"], v.grad, f"`{k}`")
        if "state" in entry:
            for n, t in v.state_dict().items():
                assert torch.equal(t, entry["state"][n]), f"`{k}.{n}` changed"
            for n, p in v.named_parameters():
                _same_grad(entry["grads"][n], p.grad, f"`{k}.{n}`")
    assert torch.equal(torch.get_rng_state(), snap["rng"]), "the global torch RNG state changed"
    assert torch.get_default_dtype() == snap["dtype"], "the default dtype changed"
    assert torch.is_grad_enabled() == snap["grad_mode"], "grad mode changed"


def run_failing(ip, line: str, cell: str) -> BaseException:
    """Run a cell that must fail; return its exception (a StoryError or a UsageError)."""
    with warnings.catch_warnings(), capture_output() as cap:
        warnings.simplefilter("ignore")
        try:
            ip.run_cell_magic("storch", line, cell)
        except (sn.StoryError, UsageError) as exc:
            err = exc
        else:
            pytest.fail(f"the cell `%%storch {line}` did not fail")
    assert not cap.outputs, "a failing cell displayed output"
    return err


# each: (id, option line, cell, expected error class, notebook function `f`)
FAILING = [
    ("story-syntax-error", "-n 8", "x ~ Normal(w, 1)\ny = x +* 2\ncost y.sum()\n", sn.StorySyntaxError, None),
    ("unknown-name", "-n 8", "x ~ Normal(w, 1)\ncost (x * wieght).sum()\n", sn.StoryNameError, None),
    (
        "estimator-error",
        "-n 8",
        "x ~ Normal(w, 1)\nb ~ Bernoulli(logits=x.sum()) using pathwise\ncost b\n",
        sn.EstimatorError,
        None,
    ),
    ("nan-cost", "-n 8", "x ~ Normal(w, 1)\ncost log(x.sum() - x.sum())\n", sn.StoryError, None),
    (
        "nan-in-a-later-line",
        "-n 8",
        "x ~ Normal(w, 1)\ny ~ Normal(x.sum(), 1)\nz = sqrt(-(y * y) - 1)\ncost z + (w * w).sum()\n",
        sn.StoryError,
        None,
    ),
    ("bad-option", "-n 0", "x ~ Normal(w, 1)\ncost x.sum()\n", UsageError, None),
    ("bad-grad-option", "-n 8 --grad nope", "x ~ Normal(w, 1)\ncost x.sum()\n", UsageError, None),
    (
        "notebook-function-raises",
        "-n 8",
        "x ~ Normal(w, 1)\ny = lin(x)\ncost f(y.sum())\n",
        sn.StoryError,
        lambda: Calls(fail_at=1),
    ),
    (
        "notebook-function-raises-in-a-loop",
        "-n 8",
        "for t in range(4):\n    x ~ Normal(w, 1)\n    cost f((x * data[:2]).sum())\n",
        sn.StoryError,
        lambda: Calls(fail_at=3),
    ),
    ("failing-out-cell", "-n 8 --out res", "x ~ Normal(w, 1)\ncost log(x.sum() - x.sum())\n", sn.StoryError, None),
    (
        "compare-second-estimator-fails",
        "-n 8 -r 3 --compare score,pathwise",
        "t = param(0.0)\nx ~ Normal(w, 1)\nb ~ Bernoulli(logits=t + x.sum())\ncost b\n",
        sn.EstimatorError,
        None,
    ),
    (
        "train-fails-midway",
        "-n 8 --train 10 --lr 0.5",
        "x ~ Normal(w, 1)\ny = lin(x)\ncost f((y * y).sum())\n",
        sn.StoryError,
        lambda: Calls(fail_at=5),
    ),
]


@pytest.mark.parametrize("seed", ["", " --seed 0"], ids=["unseeded", "seeded"])
@pytest.mark.parametrize(("name", "line", "cell", "cls", "fn"), FAILING, ids=[c[0] for c in FAILING])
def test_failing_cell_loses_nothing(ip, name, line, cell, cls, fn, seed):
    if fn is not None:
        ip.user_ns["f"] = fn()
    snap = snapshot(ip.user_ns)
    err = run_failing(ip, line + seed, cell)
    assert isinstance(err, cls), f"{type(err).__name__}: {err}"
    assert_as_before(ip, snap)


def test_successful_cell_keeps_grads_and_namespace(ip):
    """A run never writes .grad into the notebook's tensors; with --seed it leaves the RNG alone."""
    snap = snapshot(ip.user_ns)
    with capture_output():
        ip.run_cell_magic("storch", "-n 16 --seed 0", "x ~ Normal(w, 1)\ny = lin(x)\ncost (y * data.sum()).sum()\n")
    assert_as_before(ip, snap)


# ------------------------------------------------------------ KeyboardInterrupt


GOOD_LINE = "-n 64 --seed 0 --out res"


def _good_result(ip):
    with capture_output() as cap:
        ip.run_cell_magic("storch", GOOD_LINE, SEED_STORY)
    assert cap.outputs, "the good cell showed nothing"
    res = ip.user_ns.pop("res")
    return {k: v.detach().clone() for k, v in res.grads.items()}, res.cost


def _run_cell_interrupted(ip, source: str):
    """Run a whole cell the way a kernel does (``run_cell``): the shell catches the
    KeyboardInterrupt and reports it."""
    with warnings.catch_warnings(), capture_output():
        warnings.simplefilter("ignore")
        result = ip.run_cell(source, store_history=False)
    return result


@pytest.mark.parametrize("seed", ["", " --seed 0"], ids=["unseeded", "seeded"])
def test_keyboard_interrupt_from_a_notebook_function(ip, seed):
    before_grads, before_cost = _good_result(ip)
    ip.user_ns["f"] = Calls(fail_at=3, exc=KeyboardInterrupt)
    snap = snapshot(ip.user_ns)
    cell = "%%storch -n 256" + seed + "\nfor t in range(6):\n    x ~ Normal(w, 1)\n    cost f((x * x).sum())\n"
    result = _run_cell_interrupted(ip, cell)
    assert isinstance(result.error_in_exec, KeyboardInterrupt), result.error_in_exec
    assert ip.user_ns["f"].n == 3
    assert_as_before(ip, snap)
    # the shell goes on: the next cell runs and gives the same seeded result as before
    after_grads, after_cost = _good_result(ip)
    assert after_cost == before_cost
    for k, g in before_grads.items():
        assert torch.equal(after_grads[k], g), k


@pytest.mark.parametrize("seed", ["", " --seed 0"], ids=["unseeded", "seeded"])
def test_keyboard_interrupt_from_a_signal_timer(ip, seed):
    """SIGALRM with Python's default SIGINT handler: a KeyboardInterrupt arrives
    asynchronously in the middle of a long run, exactly like Ctrl-C / "interrupt kernel"."""
    before_grads, before_cost = _good_result(ip)
    calls = {"n": 0}

    def slow(x):
        calls["n"] += 1
        if calls["n"] == 1:  # the timer starts with the run itself, however long planning took
            signal.setitimer(signal.ITIMER_REAL, 0.3)
        time.sleep(0.02)
        return x

    ip.user_ns["f"] = slow
    snap = snapshot(ip.user_ns)
    cell = (
        "%%storch -n 128" + seed + "\nfor t in range(100):\n    x ~ Normal(w, 1)\n    y = lin(x)\n"
        "    cost f((y * y).sum())\n"
    )
    old = signal.signal(signal.SIGALRM, signal.default_int_handler)
    try:
        t0 = time.perf_counter()
        result = _run_cell_interrupted(ip, cell)
        took = time.perf_counter() - t0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert isinstance(result.error_in_exec, KeyboardInterrupt), result.error_in_exec
    assert 0 < calls["n"] < 100, calls  # interrupted in the middle of the run
    assert took < 1.9, took  # 100 calls x 20 ms would be 2 s
    assert_as_before(ip, snap)
    after_grads, after_cost = _good_result(ip)
    assert after_cost == before_cost
    for k, g in before_grads.items():
        assert torch.equal(after_grads[k], g), k


def test_interrupted_train_leaves_parameters(ip):
    """Ctrl-C in the middle of --train: the notebook's parameters and their .grad are as before."""
    ip.user_ns["f"] = Calls(fail_at=6, exc=KeyboardInterrupt)
    snap = snapshot(ip.user_ns)
    result = _run_cell_interrupted(ip, "%%storch -n 8 --train 20 --lr 0.5\nx ~ Normal(w, 1)\ncost f((x * x).sum())\n")
    assert isinstance(result.error_in_exec, KeyboardInterrupt), result.error_in_exec
    assert_as_before(ip, snap)
