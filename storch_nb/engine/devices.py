"""The run's device: comparing devices, and making the tensors a story creates
(``torch.arange(5.0)``, ``torch.zeros(3)`` in a story line) on the run's device
without changing torch's default device (a context manager, never
``torch.set_default_device``)."""

from __future__ import annotations

import contextlib

import torch

_NULL = contextlib.nullcontext()
#: how many torch function modes are active (a C call); torch's default device is
#: the CPU unless one of them is a device context
_MODES = getattr(torch._C, "_len_torch_function_stack", None)


def _index(d: torch.device) -> int:
    if d.index is not None:
        return d.index
    if d.type == "cuda":
        return torch.cuda.current_device()
    return 0


def same_device(a: torch.device | None, b: torch.device | None) -> bool:
    """Whether ``a`` and ``b`` are the same device: ``cuda`` is the current CUDA
    device (``cuda:0`` where that is current), where ``torch.device`` equality
    says ``cuda != cuda:0``."""
    if a == b:
        return True
    if a is None or b is None or a.type != b.type:
        return False
    return _index(a) == _index(b)


def placed_like(state: dict, device: torch.device | None, dtype: torch.dtype) -> bool:
    """Whether estimator or baseline ``state`` was made for runs on ``device`` in
    ``dtype`` (its ``"device"`` and ``"dtype"`` entries): state from another device
    or dtype is started afresh."""
    return state.get("dtype") == dtype and same_device(state.get("device"), device)


def on_device(device: torch.device | None):
    """A context in which torch's factory functions without ``device=`` make
    their tensors on ``device``; nothing where that is already torch's default
    device (the CPU run on a default torch: no overhead)."""
    if device is None:
        return _NULL
    if device.type == "cpu" and _MODES is not None and _MODES() == 0:
        return _NULL
    if same_device(torch.get_default_device(), device):
        return _NULL
    return torch.device(device)
