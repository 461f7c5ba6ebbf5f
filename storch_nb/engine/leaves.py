"""The tensors a run differentiates: the story's own ``param(...)`` leaves, the
namespace tensors with ``requires_grad`` and the parameters of the modules a
story calls."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import StoryError
from .devices import on_device, same_device
from .helpers import BUILTINS, HELPERS
from .plan import Plan

__all__ = ["leaves", "module_params", "differentiated", "initial_value"]


def leaves(plan: Plan, params: dict[str, torch.Tensor], ns: Mapping[str, Any], device: torch.device,
           dtype: torch.dtype, steady: dict | None = None) -> dict[str, torch.Tensor]:
    """The parameter tensors a run differentiates: name -> tensor as used.

    The story's own parameters (kept in ``params``, created on first use) live
    on the run's device in its dtype. A namespace tensor there in that dtype is
    used itself; one elsewhere (or a float tensor of another dtype) through a
    differentiable copy ``t.to(device, dtype)``, made afresh each run: the run's
    gradients are the copy's (``train`` puts them on the tensor's own device and
    dtype) and ``backward()`` through a surrogate reaches the user's tensor,
    which is never moved. ``nn.Module``s are not moved either (that would change
    the user's module): one that is not on the run's device is refused (checked
    once per plan and device while ``steady``, a training loop's cache, is given)."""
    if steady is None or steady.setdefault(("devices", id(plan), device), False) is False:
        _check_modules(plan, device)
        if steady is not None:
            steady[("devices", id(plan), device)] = True
    out = {}
    for var, ref in plan.params.items():
        if ref.source == "story":
            leaf = params.get(var)
            if leaf is None or not same_device(leaf.device, device) or leaf.dtype != dtype:
                if leaf is not None:
                    value = leaf.detach()
                else:
                    with on_device(device):  # param(torch.zeros(3)) made on the run's device
                        value = initial_value(ref, ns, dtype)
                leaf = value.to(device=device, dtype=dtype).detach().requires_grad_(True)
                params[var] = leaf
            out[var] = leaf
        else:
            t = ref.value
            want = dtype if t.is_floating_point() else t.dtype
            if not same_device(t.device, device) or t.dtype != want:
                t = t.to(device=device, dtype=want)  # differentiable: gradients reach the user's tensor
            out[var] = t
    return out


def _check_modules(plan: Plan, device: torch.device) -> None:
    for mname, mod in plan.modules.items():
        for t in (*mod.parameters(), *mod.buffers()):
            if not same_device(t.device, device):
                where = device.type if device.index is None else str(device)
                raise StoryError(
                    f"module `{mname}` has tensors on {t.device}, but the story runs on {where}",
                    hint=f"move the module there first with `{mname}.to('{where}')`, "
                    f"or run with device='{t.device}'",
                )


def module_params(plan: Plan) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters of the modules a plan calls, as ``("enc.0.weight", p)``."""
    out = []
    for mname, mod in plan.modules.items():
        for pname, p in mod.named_parameters():
            if p.requires_grad:
                out.append((f"{mname}.{pname}", p))
    return out


def differentiated(plan: Plan, used: dict[str, torch.Tensor], steady: dict | None = None):
    """What a pass's gradient is taken with respect to: the names and tensors of its
    leaves as used, then of the modules' parameters; and those parameters by name
    (listed once per plan while ``steady``, a training loop's cache, is given: a
    module does not gain parameters between two steps)."""
    mod = module_params(plan) if steady is None else steady.get(("modules", id(plan)))
    if mod is None:
        mod = steady[("modules", id(plan))] = module_params(plan)
    return list(used) + [n for n, _ in mod], list(used.values()) + [p for _, p in mod], mod


def initial_value(ref, ns: Mapping[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """The value inside ``param(...)``, evaluated with the helpers and the namespace."""
    g = dict(HELPERS)
    g["__builtins__"] = BUILTINS
    g.update({n: ns[n] for n in ref.expr.names if n in ns})
    try:
        value = eval(ref.expr.code, g)
    except Exception as exc:
        raise StoryError(f"cannot compute the initial value: {type(exc).__name__}: {exc}", lineno=ref.lineno,
                         line=ref.line, hint="fix the value inside param(...)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise StoryError(
            f"param() needs a number or a float tensor, not {type(value).__name__}",
            lineno=ref.lineno,
            line=ref.line,
            hint="write e.g. `x = param(1.0)` or `x = param(torch.zeros(3))`",
        )
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=dtype)  # the Python number itself, in the run's dtype
    t = value
    if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)):
        raise StoryError(f"param() needs a real number, not {t.dtype}", lineno=ref.lineno, line=ref.line,
                         hint="write e.g. `x = param(torch.zeros(3))` (a float tensor)")
    return t.detach().clone()
