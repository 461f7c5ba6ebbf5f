"""Finding where NaN or infinite values came from, so that they are reported
with the story line that produced them instead of being averaged silently."""

from __future__ import annotations

import math

import torch

from ..errors import StoryError
from .ops import CostOp, SiteOp, StepOp


def _bad(v) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v.detach()).all())


def grads_finite(grads: dict[str, torch.Tensor]) -> bool:
    """Whether every gradient is finite. On the CPU one ``float`` per parameter
    (~1 us each, of the sum where it is not a scalar); elsewhere one reduction and
    one read per device, not one synchronisation per parameter."""
    gs = list(grads.values())
    if all(g.device.type == "cpu" for g in gs):
        total = 0.0
        for g in gs:
            total += float(g) if g.dim() == 0 else float(g.sum())
        return math.isfinite(total)
    return all_finite(gs)


def all_finite(tensors) -> bool:
    """Whether every entry of every tensor is finite: one ``isfinite().all()`` per
    tensor (asynchronous on a GPU), stacked, and one read per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.is_floating_point() or t.is_complex():
            by_device.setdefault(t.device, []).append(torch.isfinite(t.detach()).all())
    return all(bool(torch.stack(flags).all()) for flags in by_device.values())


def read_checked(values: list[torch.Tensor], grads: dict[str, torch.Tensor], on_cpu: bool) -> tuple[list[float], bool]:
    """The scalar tensors ``values`` as floats, and whether every gradient is
    finite. On the CPU, as :func:`grads_finite`; elsewhere with one read of the
    device: the values and the sum of each gradient go back together (a NaN or
    an infinity anywhere makes its sum non-finite; a sum that overflowed from
    finite entries is told apart by the exact check, run only then). ``on_cpu``:
    the run, and so every tensor here, is on the CPU."""
    if on_cpu:
        return [v.item() for v in values], grads_finite(grads)
    return read_fused(values, grads)


def read_fused(values: list[torch.Tensor], grads: dict[str, torch.Tensor]) -> tuple[list[float], bool]:
    """:func:`read_checked` off the CPU (any device: tested on the CPU too)."""
    gs = list(grads.values())
    dev = values[0].device
    here = [g for g in gs if g.device == dev and (g.is_floating_point() or g.is_complex())]
    elsewhere = [g for g in gs if g.device != dev]
    dt = values[0].dtype
    parts = [v.detach().reshape(()).to(dt) for v in values]
    if here:
        parts.append(torch.stack([(g.detach().sum() if g.dim() else g.detach()).real.to(dt) for g in here]).sum())
    out = torch.stack(parts).tolist()
    ok = len(here) == 0 or math.isfinite(out[len(values)])
    if not ok:
        ok = all_finite(here)
    if elsewhere:
        ok = ok and all_finite(elsewhere)
    return out[: len(values)], ok


def check_finite(cost: float, grads: dict[str, torch.Tensor], ex, grads_ok: bool | None = None) -> None:
    """Raise a StoryError naming the first step, site or cost with NaN/inf values
    when the cost estimate or a gradient is not finite (looked for only then).
    ``grads_ok``: whether the gradients are finite, where already known."""
    if math.isfinite(cost) and (grads_finite(grads) if grads_ok is None else grads_ok):
        return
    err = locate(ex, grads, math.isfinite(cost))
    err.nonfinite = True  # type: ignore[attr-defined]  (training stops with a warning instead)
    raise err


def locate(ex, grads: dict[str, torch.Tensor], cost_ok: bool) -> StoryError:
    hint = "guard the expression (e.g. clamp before log or sqrt, avoid division by 0), or check parameter values"
    for op in ex.plan.ops:
        if isinstance(op, StepOp) and _bad(ex.env.get(op.var)):
            return StoryError(f"step `{op.node}` produced NaN or infinite values", lineno=op.lineno, line=op.line, hint=hint)
        if isinstance(op, SiteOp):
            rec = ex.sites.get(op.node)
            if rec is not None and _bad(ex.env.get(op.var)):
                return StoryError(f"site `{op.node}` drew NaN or infinite values", lineno=op.lineno, line=op.line,
                                  hint="check the distribution's arguments (they may be NaN or out of range)")
            if rec is not None and _bad(rec[2]):
                return StoryError(f"the log-probability of site `{op.node}` is NaN or infinite",
                                  lineno=op.lineno, line=op.line,
                                  hint="a value lies outside the distribution's support, or its arguments are degenerate")
    for op, value in ex.costs:
        if isinstance(op, CostOp) and _bad(value):
            return StoryError(f"cost `{op.node}` is NaN or infinite", lineno=op.lineno, line=op.line, hint=hint)
    bad = [k for k, g in grads.items() if _bad(g)]
    what = "the cost estimate" if not cost_ok else "the gradient with respect to " + ", ".join(bad or ["a parameter"])
    return StoryError(
        f"{what} is NaN or infinite although every value in the story is finite",
        hint="a derivative is infinite at these values (e.g. sqrt or log at 0, abs at 0 with pow); guard the expression",
    )
