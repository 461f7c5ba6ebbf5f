"""Compiled passes: ``Story.run(..., compile=True)``, ``surrogate`` and ``train``.

A story's expressions run through ``eval`` and its ops are Python objects, so
``torch.compile``'s bytecode tracer (dynamo) would break the graph at every
step. Instead one pass of the planned story is *captured* once per setting
into an FX graph of aten operations (:mod:`.capture`: ``make_fx``, real tensors,
torch's dispatcher records what runs): sampling, every cost, the surrogate, and its
gradient (``torch.autograd.grad``, traced too), with

- the inputs: the leaves as used, the modules' parameters and buffers
  (re-bound for the capture), the namespace tensors the story reads, and the
  tensors of the estimator state the pass reads (moving averages);
- the outputs: the surrogate (per run or per sample, detached), the gradient
  of its sum, one flag (every argument check of the pass held, the cost and
  every gradient are finite), and the estimator state's new tensors.

That graph is compiled by Inductor (:func:`compile_graph`, with
``fallback_random``: random operations run torch's own kernels, so a seed
gives the same numbers as the eager pass) and cached on the story's
:class:`~.run.Runner` by plan, samples, runs, per-sample mode, the shapes of
the inputs and the layout of the estimator state it reads (a moving-average
baseline: once without its average, then with it). A call runs the compiled
graph, checks the flag (one read), writes the estimator state back and hands
the surrogate, its gradient attached (:class:`_Attach`), to the same code that
makes an eager run's result. Where the flag fails (an argument out of its
constraint, a NaN) the call is run again eagerly from the same random state,
which reports it as an eager run does.

Where a pass cannot be compiled (learned control variates need second
derivatives; a story that calls modules with ``runs > 1``; a run split into
chunks) or no compiler works here (:func:`compile_graph` raises), the call
runs eagerly after one warning per story and reason.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import EstimatorError, StoryError
from .capture import Uncompilable, at, capture, prepare, signature, slim, write_back
from .execute import place_constants
from .leaves import differentiated
from .plan import Plan

__all__ = ["compile_graph", "run_pass", "note_eager", "Compiled"]

_MAX_ENTRIES = 16  # cached compiled passes per story
_MAX_VARIANTS = 4  # per setting, for different layouts of the estimator state


def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
    """Compile a captured pass with Inductor. ``fallback_random`` is scoped to this
    compile (torch's and Inductor's global configuration are left alone). Raises
    where no compiler works here; tests replace this function to simulate that."""
    if not torch._dynamo.is_dynamo_supported():
        raise RuntimeError("torch.compile is not supported on this platform or Python version")
    from torch._inductor import compile as inductor_compile

    return inductor_compile(gm, example_inputs, options={"fallback_random": True})


@dataclass
class Compiled:
    """What a compiled call gives: as :meth:`Runner.run_pass` (the surrogate, the leaves
    as used, the execution: its sites only), and the seconds spent compiling."""

    total: torch.Tensor
    used: dict[str, torch.Tensor]
    ex: Any
    seconds: float


@dataclass
class _Entry:
    """One compiled pass: the graph and how its inputs and outputs map to the story."""

    plan: Plan
    fn: Any
    sources: list  # per graph input: ("diff", i) | ("const", name) | ("frozen", (module, attr)) | ("state", path)
    shapes: tuple  # the inputs' shapes when compiled
    keys: tuple  # top-level estimator-state keys the pass reads or writes
    signature: tuple  # the tensors under those keys when traced: signature(state, keys)
    template: dict  # key -> the entry after the pass (_In/_Out markers for tensors), or _ABSENT
    n_diff: int
    ex: Any


@dataclass
class _Cache:
    """A story's compiled passes and the warnings it has given."""

    entries: dict = field(default_factory=dict)  # (id(plan), samples, runs, per_sample) -> [_Entry]
    eager: dict = field(default_factory=dict)  # the same keys -> why that setting runs eagerly
    warned: set = field(default_factory=set)
    broken: str | None = None  # why no compiler works here


def _cache(runner) -> _Cache:
    cache = getattr(runner, "_compiled", None)
    if cache is None:
        cache = runner._compiled = _Cache()
    return cache


class _NoCompiler(Exception):
    """No compiler works here (the message says why)."""


def note_eager(runner, why: str, stacklevel: int = 5) -> None:
    """Warn once per story and reason that a ``compile=True`` call runs eagerly."""
    cache = _cache(runner)
    if why not in cache.warned:
        cache.warned.add(why)
        warnings.warn(f"compile=True: {why}; this call runs eagerly", stacklevel=stacklevel)


def _build(runner, plan, used, samples, runs, device, dtype, max_outcomes, per_sample) -> _Entry:
    """Capture and compile one pass. Raises StoryError (the story's own error: the eager
    pass reports it), Uncompilable (this pass cannot be compiled) or _NoCompiler."""
    try:
        gm, flat, sources, info, n_diff = capture(runner, plan, used, samples, runs, device, dtype, max_outcomes,
                                                   per_sample)
    except StoryError as exc:
        cause = exc.__cause__
        if cause is not None and ("tracing tensor" in str(cause) or "data-dependent" in str(cause)):
            raise Uncompilable(f"line {exc.lineno} reads a value in Python (data-dependent), which a captured "
                                "graph cannot repeat") from exc
        raise
    except (Uncompilable, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:
        raise Uncompilable(f"the pass could not be captured into a graph ({type(exc).__name__}: "
                            f"{str(exc).strip()[:200]})") from exc
    flat, sources = prepare(gm, flat, sources)
    try:
        fn = compile_graph(gm, flat)
    except Exception as exc:
        raise _NoCompiler(f"torch.compile is not available here ({type(exc).__name__}: "
                          f"{str(exc).strip()[:200]})") from exc
    keys = info["keys"]
    return _Entry(plan=plan, fn=fn, sources=sources, shapes=tuple(x.shape for x in flat), keys=keys,
                  signature=signature(runner.state, keys), template=info["template"], n_diff=n_diff,
                  ex=slim(info["ex"]))


# ------------------------------------------------------------------ calling
class _Attach(torch.autograd.Function):
    """The compiled pass's surrogate, with the gradient the graph computed as its
    backward (first derivatives only; the engine differentiates it uniformly: a scalar,
    or the sum or mean of its entries)."""

    @staticmethod
    def forward(ctx, box: tuple, *inputs: torch.Tensor) -> torch.Tensor:
        total, ctx.grads = box
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():
            raise EstimatorError(
                "a compiled pass gives first derivatives only: its surrogate cannot be differentiated twice",
                hint="use compile=False for second derivatives",
            )
        scale = grad if grad.dim() == 0 else grad.reshape(-1)[0]
        return (None, *(g * scale for g in ctx.grads))


def _rng(device) -> tuple:
    cuda = None
    if device is not None and device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cuda = (idx, torch.cuda.get_rng_state(idx))
    return torch.get_rng_state(), cuda


def _set_rng(saved: tuple) -> None:
    torch.set_rng_state(saved[0])
    if saved[1] is not None:
        torch.cuda.set_rng_state(saved[1][1], saved[1][0])


def _attr(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _inputs(entry: _Entry, plan: Plan, diff: list, state: dict, device) -> list:
    if plan.constants:
        place_constants(plan, device)
    xs = []
    for kind, ref in entry.sources:
        if kind == "diff":
            xs.append(diff[ref].detach())
        elif kind == "const":
            xs.append(plan.globals[ref])
        elif kind == "frozen":
            xs.append(_attr(*ref))
        else:
            xs.append(at(state, ref))
    return xs


def _lookup(cache: _Cache, key: tuple, plan: Plan, state: dict) -> tuple[list, _Entry | None]:
    found = cache.entries.get(key)
    if found is None or (found and found[0].plan is not plan):
        found = cache.entries[key] = []
    for entry in found:
        if entry.signature == signature(state, entry.keys):
            return found, entry
    return found, None


def run_pass(runner, plan: Plan, leaves: dict[str, torch.Tensor], samples: int, runs: int, device, dtype,
             max_outcomes: int = 10**6, per_sample: bool = False) -> Compiled | None:
    """One pass as :meth:`Runner.run_pass` (``first_order=True``), compiled: None where
    this call must run eagerly (a warning said why, once per story and reason), with
    the random state and the estimator state as they were."""
    cache = _cache(runner)
    key = (id(plan), samples, runs, per_sample)
    if cache.broken is not None:
        return None
    if key in cache.eager:
        note_eager(runner, cache.eager[key])
        return None
    used = leaves
    if plan.batched_params:
        n = runs if plan.run_dim else samples
        used = {k: v.detach().unsqueeze(0).expand((n,) + v.shape).clone().requires_grad_(True)
                for k, v in leaves.items()}
    found, entry = _lookup(cache, key, plan, runner.state)
    seconds = 0.0
    saved = _rng(device)
    if entry is None:
        t0 = time.perf_counter()
        entry = _new_entry(runner, cache, key, found, plan, used, samples, runs, device, dtype, max_outcomes,
                           per_sample, saved)
        if entry is None:
            return None
        seconds = time.perf_counter() - t0
    diff = differentiated(plan, used)[1]
    xs = _inputs(entry, plan, diff, runner.state, device)
    if tuple(x.shape for x in xs) != entry.shapes:
        found.remove(entry)
        return run_pass(runner, plan, leaves, samples, runs, device, dtype, max_outcomes, per_sample)
    t1 = time.perf_counter()
    outs = entry.fn(*xs)
    if seconds:
        seconds += time.perf_counter() - t1  # the first call of a compiled graph finishes its compilation
    n = entry.n_diff
    if not bool(outs[n + 1]):  # an argument check failed, or a NaN: the eager pass says where
        _set_rng(saved)
        return None
    plan.validated = True  # as after an eager pass: the checks of Python-number arguments held
    write_back(entry.template, outs[n + 2 :], runner.state)
    total = _Attach.apply((outs[0], outs[1 : n + 1]), *diff)
    return Compiled(total, used, entry.ex, seconds)


def _new_entry(runner, cache: _Cache, key: tuple, found: list, plan, used, samples, runs, device, dtype,
               max_outcomes, per_sample, saved) -> _Entry | None:
    """Capture and compile a pass for this setting; None (and a warning) where it cannot be."""
    trained = [op.estimator.text() for op in plan.site_ops.values()
               if op.estimator is not None and op.estimator.trainable]
    why = None
    if trained:
        why = (f"learned control variates ({', '.join(trained)}) are fitted with second derivatives, which a "
               "compiled pass does not give")
    elif len(found) >= _MAX_VARIANTS:
        why = "the estimator state changed its layout too often to keep compiling"
    if why is not None:
        cache.eager[key] = why
        note_eager(runner, why, stacklevel=6)
        return None
    if len(cache.entries) > _MAX_ENTRIES:
        cache.entries.clear()
        cache.entries[key] = found
    try:
        entry = _build(runner, plan, used, samples, runs, device, dtype, max_outcomes, per_sample)
    except StoryError:
        _set_rng(saved)  # the eager pass raises it, from the same random state
        return None
    except Uncompilable as exc:
        cache.eager[key] = str(exc)
        note_eager(runner, str(exc), stacklevel=6)
        _set_rng(saved)
        return None
    except _NoCompiler as exc:
        cache.broken = str(exc)
        note_eager(runner, cache.broken, stacklevel=6)
        _set_rng(saved)
        return None
    except BaseException:
        _set_rng(saved)
        raise
    _set_rng(saved)  # the capture ran the pass once: the compiled graph draws the same numbers again
    found.append(entry)
    return entry
