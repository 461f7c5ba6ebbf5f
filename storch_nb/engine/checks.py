"""Checks a pass makes on what the story computes: distribution arguments
against their constraints (on every pass, so that training that drives a
scale negative stops at that step), and randomness drawn outside ``~``.

``torch.distributions``' own ``validate_args`` is left off: it would also
check every sample against the support on each ``log_prob`` (about 10% of a
small story's time), and its message prints the whole offending tensor. Here
one line names the argument, the constraint and one offending value, and
arguments that are cached Python numbers are checked once.
"""

from __future__ import annotations

import ast
from contextvars import ContextVar
from typing import Any

import torch
from torch.distributions import Distribution, constraints

from ..errors import StoryError

__all__ = ["check_arguments", "constrained", "describe", "random_call"]

#: while a compiled pass is captured (``compiled.py``): the list where each check leaves its
#: flag (a 0-dim bool tensor) instead of reading it, so that the compiled pass checks the same
#: arguments on every call
FLAGS: ContextVar[list | None] = ContextVar("storch_nb_check_flags", default=None)

# constraints that only say "a number" (NaN is reported by the finiteness check of the result)
_TRIVIAL = (constraints.real, constraints.real_vector)


#: constraints by identity, in words
_WORDS = (
    (constraints.positive, "positive"),
    (constraints.nonnegative, "non-negative"),
    (constraints.unit_interval, "in [0, 1]"),
    (constraints.simplex, "a probability vector (non-negative entries summing to 1)"),
    (constraints.positive_definite, "a positive definite matrix"),
    (constraints.lower_cholesky, "a lower-triangular matrix with a positive diagonal"),
    (constraints.nonnegative_integer, "a non-negative integer"),
    (constraints.boolean, "0 or 1"),
)
#: constraints with bounds, by class name: the words as a template of the bounds
_BOUNDED = {
    "GreaterThan": "greater than {lb:g}",
    "GreaterThanEq": "at least {lb:g}",
    "LessThan": "less than {ub:g}",
    "Interval": "in [{lb:g}, {ub:g}]",
    "IntegerInterval": "in [{lb:g}, {ub:g}]",
    "HalfOpenInterval": "in [{lb:g}, {ub:g})",
}


def _base(c: Any) -> Any:
    """The constraint an ``independent(...)`` constraint wraps (itself otherwise)."""
    while type(c).__name__ == "_IndependentConstraint":
        c = c.base_constraint
    return c


def describe(c: Any) -> str:
    """A constraint in words."""
    c = _base(c)
    for known, words in _WORDS:
        if c is known:
            return words
    template = _BOUNDED.get(type(c).__name__.lstrip("_"))
    lb, ub = getattr(c, "lower_bound", 0.0), getattr(c, "upper_bound", 0.0)
    if template is not None and isinstance(lb, (int, float)) and isinstance(ub, (int, float)):
        return template.format(lb=lb, ub=ub)
    return repr(c)


def _trivial(c: Any) -> bool:
    return _base(c) in _TRIVIAL


def check_arguments(dist: Distribution, skip: frozenset[str] | set[str] = frozenset()) -> None:
    """Raise a StoryError naming the first parameter of ``dist`` that breaks its
    constraint, as ``validate_args`` would check it (the parameters the
    distribution holds, after its own normalisation), except those in ``skip``
    (given as Python numbers and checked on an earlier pass)."""
    held = dist.__dict__
    for name, c in constrained(type(dist)):
        if name not in held or name in skip:
            continue
        value = held[name]
        if not isinstance(value, torch.Tensor):
            continue
        try:
            ok = c.check(value)
        except (RuntimeError, TypeError, ValueError, IndexError):
            continue  # a shape torch itself complains about
        flags = FLAGS.get()
        if flags is not None:  # read after each compiled call, where a failed one reruns eagerly
            flags.append(ok.all())
            continue
        if bool(ok.all()):
            continue
        err = StoryError(
            f"{type(dist).__name__}'s argument `{name}` must be {describe(c)}, but is {_offending(value, ok)}",
            hint=_hint(name, c),
        )
        err.argument = name  # type: ignore[attr-defined]  (the caller puts the caret under it)
        raise err


def _hint(name: str, c: Any) -> str:
    c = _base(c)
    if c is constraints.simplex:
        return f"make `{name}` with softmax(...), or pass logits= instead"
    if c is constraints.unit_interval:
        return f"make `{name}` with sigmoid(...), or pass logits= instead"
    if c is constraints.positive or type(c).__name__.lstrip("_") in ("GreaterThan", "GreaterThanEq"):
        return f"keep `{name}` {describe(c)}, e.g. with softplus(...) or exp(...) of the quantity you train"
    return f"keep `{name}` {describe(c)}"


_CONSTRAINED: dict[type, tuple[tuple[str, Any], ...]] = {}


def constrained(cls: type) -> tuple[tuple[str, Any], ...]:
    """The arguments of a distribution class whose constraint says more than "a
    number" (cached per class)."""
    got = _CONSTRAINED.get(cls)
    if got is None:
        cons = cls.arg_constraints if isinstance(cls.arg_constraints, dict) else {}
        got = _CONSTRAINED[cls] = tuple(
            (name, c) for name, c in cons.items() if not constraints.is_dependent(c) and not _trivial(c)
        )
    return got


def _offending(value: torch.Tensor, ok: torch.Tensor) -> str:
    """One offending value of ``value`` (and how many more), as text."""
    bad = value.detach()
    if ok.dim() < bad.dim():  # an event constraint (simplex): one flag per vector
        rows = bad.reshape(-1, *bad.shape[ok.dim():])[~ok.reshape(-1)]
        vec = rows[0].flatten()
        text = "[" + ", ".join(f"{float(v):.4g}" for v in vec[:6]) + (", ..." if vec.numel() > 6 else "") + "]"
        n_bad, n_all = int((~ok).sum()), ok.numel()
    else:
        flags = (~ok).reshape(-1)
        first = int(flags.nonzero()[0])
        text = f"{float(bad.reshape(-1)[first]):.4g}"
        n_bad, n_all = int(flags.sum()), flags.numel()
    if n_all > 1:
        text += f" ({n_bad} of its {n_all} entries)" if n_bad > 1 else f" (one of its {n_all} entries)"
    return text


# torch functions and tensor methods that draw random numbers
_RNG_FUNCTIONS = ("rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli",
                  "multinomial", "normal", "poisson", "binomial", "gumbel_softmax", "dropout", "rrelu")
_RNG_METHODS = ("uniform_", "normal_", "bernoulli_", "exponential_", "geometric_", "cauchy_", "log_normal_",
                "random_", "sample", "rsample", "sample_n", "bernoulli", "multinomial")


def _rng_objects() -> set[int]:
    out = set()
    for mod in (torch, torch.nn.functional):
        for name in _RNG_FUNCTIONS:
            f = getattr(mod, name, None)
            if f is not None:
                out.add(id(f))
    return out


_RNG_IDS: set[int] | None = None


def random_call(node: ast.AST, resolve) -> str | None:
    """The text of a call in ``node`` that draws random numbers (``torch.randn(...)``,
    ``x.uniform_()``, ``d.sample()``), or None. ``resolve(name)`` gives what a free
    name stands for (None for story values)."""
    global _RNG_IDS
    if _RNG_IDS is None:
        _RNG_IDS = _rng_objects()
    for sub in ast.walk(node):
        if not isinstance(sub, ast.Call):
            continue
        f = sub.func
        if isinstance(f, ast.Name):
            obj = resolve(f.id)
            if obj is not None and id(obj) in _RNG_IDS:
                return f.id
        elif isinstance(f, ast.Attribute):
            if f.attr in _RNG_METHODS and not (isinstance(f.value, ast.Name) and resolve(f.value.id) is torch):
                return f".{f.attr}"
            if isinstance(f.value, (ast.Name, ast.Attribute)):
                owner = _dotted(f.value, resolve)
                if owner is not None and id(getattr(owner, f.attr, None)) in _RNG_IDS:
                    return f"{ast.unparse(f.value)}.{f.attr}"
    return None


def _dotted(node: ast.AST, resolve) -> Any:
    if isinstance(node, ast.Name):
        return resolve(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, resolve)
        return None if base is None else getattr(base, node.attr, None)
    return None
