"""The names a story sees after its own and the notebook's: math helpers,
``torch``, and every ``torch.distributions`` class by name.

``ELEMENTWISE`` lists the helpers and torch functions that act entry by entry;
a step built only from arithmetic and these runs directly on batched tensors
(broadcasting), every other step is vectorized with ``torch.func.vmap``.
"""

from __future__ import annotations

import builtins
import math

import torch
import torch.distributions as D
import torch.nn.functional as F


def _sum(x, *args, **kwargs):
    return torch.sum(x, *args, **kwargs) if isinstance(x, torch.Tensor) else builtins.sum(x, *args, **kwargs)


def _mean(x, *args, **kwargs):
    """``torch.mean`` of a tensor. Of a list or tuple holding tensors, the mean of its
    items, entry by entry (their sum over their number, as ``sum`` adds them; with
    ``dim`` arguments, ``torch.mean`` of the items stacked along a new first dim),
    which keeps their gradient, device and dtype and runs under vmap. Of numbers,
    a float32 tensor as before."""
    if isinstance(x, torch.Tensor):
        return torch.mean(x, *args, **kwargs)
    if isinstance(x, (list, tuple)) and x:
        ref = next((v for v in x if isinstance(v, torch.Tensor)), None)
        if ref is not None:
            if not args and not kwargs:
                return builtins.sum(x) / len(x)
            items = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=ref.dtype, device=ref.device) for v in x]
            return torch.mean(torch.stack(torch.broadcast_tensors(*items)), *args, **kwargs)
    return torch.mean(torch.as_tensor(x, dtype=torch.float))


def _abs(x):
    return torch.abs(x) if isinstance(x, torch.Tensor) else builtins.abs(x)


def _t(fn):
    """A torch function that also takes Python numbers."""

    def wrapped(x, *args, **kwargs):
        return fn(x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.get_default_dtype()), *args, **kwargs)

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


_ELEMENTWISE_FUNCS = {
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "softplus": F.softplus,
    "sin": torch.sin,
    "cos": torch.cos,
    "log1p": torch.log1p,
    "expm1": torch.expm1,
    "logit": torch.logit,
    "erf": torch.erf,
    "lgamma": torch.lgamma,
    "digamma": torch.digamma,
    "floor": torch.floor,
    "ceil": torch.ceil,
    "sign": torch.sign,
    "square": torch.square,
}

HELPERS: dict[str, object] = {name: _t(fn) for name, fn in _ELEMENTWISE_FUNCS.items()}
HELPERS.update(
    {
        "abs": _abs,
        "clamp": torch.clamp,
        "where": torch.where,
        "maximum": torch.maximum,
        "minimum": torch.minimum,
        "sum": _sum,
        "mean": _mean,
        "prod": torch.prod,
        "softmax": torch.softmax,
        "log_softmax": torch.log_softmax,
        "logsumexp": torch.logsumexp,
        "dot": torch.dot,
        "matmul": torch.matmul,
        "one_hot": F.one_hot,
        "pi": math.pi,
        "torch": torch,
        "F": F,
        "math": math,
        "D": D,
    }
)
for _name in dir(D):
    _obj = getattr(D, _name)
    if isinstance(_obj, type) and issubclass(_obj, D.Distribution) and _obj is not D.Distribution:
        HELPERS.setdefault(_name, _obj)

#: objects whose calls act entry by entry and broadcast
ELEMENTWISE: set[int] = {id(HELPERS[n]) for n in _ELEMENTWISE_FUNCS}
ELEMENTWISE.update(id(HELPERS[n]) for n in ("abs", "clamp", "where", "maximum", "minimum"))
ELEMENTWISE.update(id(fn) for fn in _ELEMENTWISE_FUNCS.values())
ELEMENTWISE.update(id(getattr(torch, n)) for n in ("clamp", "where", "maximum", "minimum", "abs", "pow", "square"))
ELEMENTWISE.update(id(getattr(F, n)) for n in ("softplus", "relu", "logsigmoid", "silu", "gelu", "elu"))
ELEMENTWISE.update(id(f) for f in (builtins.abs, builtins.float))

#: tensor methods that act entry by entry (``x.exp()``)
ELEMENTWISE_METHODS = {
    "exp", "log", "sqrt", "sigmoid", "tanh", "relu", "sin", "cos", "log1p", "expm1",
    "abs", "clamp", "pow", "square", "float", "double", "logit", "floor", "ceil", "sign",
    "neg", "reciprocal", "erf", "lgamma", "digamma",
}  # fmt: skip

BUILTINS = builtins.__dict__
