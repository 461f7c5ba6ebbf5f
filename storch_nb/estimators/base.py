"""The estimator interface and the registry.

An estimator decides, for one stochastic site, how the site's value is drawn and
how the site contributes to the DiCE surrogate (Foerster et al., 2018, "DiCE:
The Infinitely Differentiable Monte Carlo Estimator"):

* ``reparameterized`` estimators draw a value that carries the pathwise
  derivative (``rsample``); the site adds no term of its own.
* ``scored`` estimators draw a detached value; the engine multiplies every cost
  downstream of the site by the magic box ``exp(l - stop_grad(l))`` of its
  log-probability ``l``, and, where the estimator gives a baseline ``b``, adds
  ``(1 - box(l)) * box(ancestors) * b`` (Mao et al., 2019, "A Baseline for Any
  Order Gradient Estimation in Stochastic Computation Graphs"), which keeps
  every order of derivative unbiased.
* ``enumerates`` estimators replace the draw by the whole finite support and
  weight downstream costs by the (differentiable) probabilities.

Option ``n=K`` on any estimator draws K values per incoming particle: a
nested plate. Baselines that compare samples use that plate when present and
the story's sample dimension otherwise.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from functools import lru_cache
from typing import Any, ClassVar

import torch
from torch.distributions import Distribution

from ..errors import EstimatorError

__all__ = [
    "Estimator",
    "register_estimator",
    "estimators",
    "make_estimator",
    "parse_spec",
    "plate_select",
    "to_site_shape",
    "site_sum",
    "first_order",
    "first_order_only",
]

_REGISTRY: dict[str, type[Estimator]] = {}
_ALIASES: dict[str, str] = {}


class Estimator:
    """Base class of every estimator. Subclass it and decorate with
    :func:`register_estimator` to add one.

    Class attributes a subclass sets: ``reparameterized``, ``scored``,
    ``enumerates`` (see the module docstring) and ``options`` (the keyword
    options it accepts, with defaults). Methods it may override:
    :meth:`fits` (refuse a distribution), :meth:`draw`, :meth:`baseline` and
    :meth:`update`.
    """

    name: ClassVar[str] = "estimator"
    reparameterized: ClassVar[bool] = False
    scored: ClassVar[bool] = False
    enumerates: ClassVar[bool] = False
    #: the site evaluates the rest of the story at several values of its own
    #: (a plate of "variants": antithetic pairs, relaxations, ...) and reduces
    #: that plate itself with :meth:`reduce_plate`
    plated: ClassVar[bool] = False
    #: every variant along the estimator's plate is a joint draw of all the site's
    #: entries (ARM's pair, REBAR's relaxations), not a change of one entry or one
    #: outcome at a time: a site inside a data plate can then be credited with a
    #: cost outside the plate that mixes datapoints (see ``engine/plates.py``)
    joint_variants: ClassVar[bool] = False
    #: ``Story.surrogate`` differentiated twice gives unbiased second derivatives;
    #: where False the engine makes a second differentiation raise instead of
    #: returning a silently wrong Hessian
    higher_order: ClassVar[bool] = True
    #: built for multi-sample objectives (``vimco``, ``dreg``): needs option ``n``
    #: and a cost that reduces over the site's particles with ``logmeanexp``
    multi_sample: ClassVar[bool] = False
    #: the estimator has control-variate parameters that the engine trains to
    #: minimise the variance of the gradient estimate (see :meth:`cv_parameters`)
    trainable: ClassVar[bool] = False
    #: the estimator's state holds one entry per run (LAX's coefficients), so a call
    #: with another number of runs starts afresh; False where one state serves
    #: every number of runs (REBAR's and RELAX's pooled fit)
    state_per_run: ClassVar[bool] = True
    #: accepted keyword options and their defaults (``n`` is always accepted)
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, n: int | None = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(["n", *self.options]) or "n"
            raise EstimatorError(
                f"estimator `{self.name}` has no option {', '.join(map(repr, unknown))}",
                hint=f"its options are: {known}",
            )
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise EstimatorError(f"option n of `{self.name}` must be a positive int, not {n!r}",
                                 hint=f"write e.g. `using {self.name}(n=4)`")
        self.n = n
        self.opts = {**self.options, **options}

    # ----------------------------------------------------------------- text
    def text(self) -> str:
        """The canonical text of this estimator, as ``using`` takes it."""
        cached = self.__dict__.get("_text")
        if cached is None:
            cached = self.__dict__["_text"] = self._make_text()
        return cached

    def _make_text(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.opts.items() if v != self.options.get(k)]
        if self.n is not None:
            parts.insert(0, f"n={self.n}")
        return f"{self.name}({', '.join(parts)})" if parts else self.name

    def __repr__(self) -> str:
        return self.text()

    # -------------------------------------------------------------- fitting
    def fits(self, dist: Distribution) -> str | None:
        """None if the estimator can handle ``dist``; else the reason it cannot."""
        return None

    def fits_class(self, cls: type) -> str | None:
        """Like :meth:`fits` from the distribution class alone, before the story
        runs (None where it fits or the class cannot tell)."""
        return None

    def check(self, dist: Distribution, site: str) -> None:
        """Raise :class:`EstimatorError` naming the site when ``dist`` does not fit."""
        self._refuse(self.fits(dist), type(dist), site)

    def check_class(self, cls: type, site: str) -> None:
        """Raise :class:`EstimatorError` when the distribution class does not fit."""
        self._refuse(self.fits_class(cls), cls, site)

    def _refuse(self, reason: str | None, cls: type, site: str) -> None:
        if reason is not None:
            fit = suggest(cls)
            err = EstimatorError(
                f"estimator `{self.name}` does not fit site `{site}` ({cls.__name__}): {reason}",
                hint=f"use {fit} for this site, e.g. `{site.split('[')[0]} ~ {cls.__name__}(...) using {fit.split(' or ')[0]}`",
            )
            err.unfit = (site, cls.__name__, reason)  # type: ignore[attr-defined]
            raise err

    # ------------------------------------------------------------- drawing
    def draw(self, dist: Distribution, sample_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Draw the site's value(s), with ``sample_shape`` prepended."""
        if self.reparameterized:
            return dist.rsample(sample_shape)
        return dist.sample(sample_shape)

    # ---------------------------------------------------- plated estimators
    def plate_size(self, dist: Distribution) -> int:
        """How many variants the site evaluates per particle (``plated`` estimators)."""
        raise NotImplementedError

    def sample_variants(self, dist: Distribution, dim: int, size: int, state: dict) -> tuple[torch.Tensor, Any]:
        """Draw the site's variants.

        ``dist`` has batch shape ``batch + own`` where ``batch`` has size 1 at
        ``dim``; return the value with ``size`` variants along ``dim`` (shape
        ``batch`` with ``dim`` set to ``size``, then own and event dims) and
        anything :meth:`reduce_plate` needs (``aux``). ``state`` is this site's
        estimator state on the Story (control variates live there).
        """
        raise NotImplementedError

    def reduce_plate(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        """Reduce a downstream cost term over the site's variant plate ``dim``.

        ``term`` holds the cost (one entry per batch position; its own entries
        already averaged; dims after ``dim`` already reduced). Return a tensor
        without ``dim`` whose value is the cost estimate and whose first
        derivative is this estimator's gradient estimate.
        """
        raise NotImplementedError

    def plate_value(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        """The value of :meth:`reduce_plate` alone (the cost estimate, detached):
        what a scored site upstream of this one uses as its learning signal.
        Override it where the value is cheaper than the whole reduction."""
        return self.reduce_plate(term.detach(), dim, aux).detach()

    def cv_parameters(self, state: dict) -> list[torch.Tensor]:
        """Control-variate parameters to train (``trainable`` estimators)."""
        return []

    #: whether :meth:`cv_prepare` needs the proxy's gradients with their graph
    #: (to differentiate them again: second-order fits of the control variate)
    cv_second_order: ClassVar[bool] = False

    def cv_prepare(self, state: dict, grads: list[torch.Tensor | None]) -> Any:
        """Whatever :meth:`cv_step` needs from the gradients of the estimator's
        variance proxy (sum of squared gradient estimates) with respect to its
        control-variate parameters, computed before any estimator changes its
        parameters (default: the gradients, detached)."""
        return [None if g is None else g.detach() for g in grads]

    def cv_step(self, state: dict, prepared: Any) -> None:
        """Apply one optimisation step to the control-variate parameters, given
        what :meth:`cv_prepare` returned."""

    # ------------------------------------------------------------ baselines
    def baseline(self, signal: torch.Tensor, dim: int, state: dict) -> torch.Tensor | None:
        """A baseline for this site's learning signal, or None.

        ``signal`` is the (detached) downstream cost, one entry per particle;
        ``dim`` is the dimension holding the samples the baseline may compare
        (the site's own plate, or the story's samples). A baseline must not
        depend on the particle's own sample.
        """
        return None

    def update(self, signal: torch.Tensor, dim: int, state: dict) -> None:
        """Update estimator state after the current estimate has used it."""


# ------------------------------------------------ helpers for plated estimators
def plate_select(t: torch.Tensor, dim: int, i: int) -> torch.Tensor:
    """Variant ``i`` of ``t`` along the plate ``dim`` (the dim removed)."""
    return t.select(dim, i)


def to_site_shape(f: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """View a reduced cost (batch dims before ``dim``) against a site tensor
    (batch dims through ``dim``, then own dims)."""
    return f.reshape(f.shape + (1,) * (like.dim() - f.dim()))


def site_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum a site tensor over its own dims and drop the (size-1) plate ``dim``."""
    if x.dim() > dim + 1:
        x = x.sum(tuple(range(dim + 1, x.dim())))
    return x.squeeze(dim)


def first_order(x: torch.Tensor) -> torch.Tensor:
    """``x - stop_grad(x)``: value zero, gradient that of ``x``."""
    return x - x.detach()


class Guard:
    """Whether a surrogate's first-order-only parts may be differentiated with
    ``create_graph=True`` right now: only while the engine fits learned control
    variates on that surrogate's gradients (one guard per pass, so a fit in one
    thread lets no other surrogate through)."""

    __slots__ = ("fitting",)

    def __init__(self) -> None:
        self.fitting = False


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward refuses to be differentiated again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str, guard: Guard | None) -> torch.Tensor:
        ctx.name, ctx.guard = name, guard
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # create_graph=True: someone wants higher derivatives (the engine's own control-variate fit excepted)
        if torch.is_grad_enabled() and not (ctx.guard is not None and ctx.guard.fitting):
            raise EstimatorError(
                f"estimator `{ctx.name}` gives first derivatives only: its surrogate cannot be differentiated twice",
                hint="for second derivatives use score (any baseline), rloo, enumerate, unordered_set, "
                "score_wor, indecater, measure_valued, lax, or pathwise where torch's rsample is twice differentiable",
            )
        return grad, None, None


def first_order_only(x: torch.Tensor, name: str, guard: Guard | None = None) -> torch.Tensor:
    """``x`` itself; differentiating it twice raises an :class:`EstimatorError`
    (except while ``guard.fitting``)."""
    return _FirstOrderOnly.apply(x, name, guard)


def register_estimator(name: str, *aliases: str) -> Callable[[type[Estimator]], type[Estimator]]:
    """Class decorator: register an :class:`Estimator` subclass under ``name``.

    Example::

        @storch_nb.register_estimator("score_half")
        class HalfScore(storch_nb.Estimator):
            scored = True
            options = {"scale": 0.5}
    """

    def deco(cls: type[Estimator]) -> type[Estimator]:
        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise TypeError("register_estimator decorates a subclass of storch_nb.Estimator")
        cls.name = name
        _REGISTRY[name] = cls
        for a in aliases:
            _ALIASES[a] = name
        return cls

    return deco


def estimators() -> list[str]:
    """The names of every registered estimator (aliases included), sorted."""
    return sorted({*_REGISTRY, *_ALIASES, "auto"})


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"score(baseline='rloo', n=4)"`` -> ``("score", {"baseline": "rloo", "n": 4})``."""
    name, opts = _parse_spec(text)
    return name, dict(opts)


@lru_cache(maxsize=256)
def _parse_spec(text: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise EstimatorError(
            f"cannot read the estimator `{text}`",
            hint="write a name or a call with keyword options, e.g. score(baseline='rloo')",
        ) from None
    if isinstance(node, ast.Name):
        return node.id, ()
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
        opts = {}
        for kw in node.keywords:
            try:
                opts[kw.arg] = ast.literal_eval(kw.value)
            except ValueError:
                raise EstimatorError(
                    f"option {kw.arg} of `{text}` must be a literal value (number, string, None)",
                ) from None
        return node.func.id, tuple(opts.items())
    raise EstimatorError(
        f"cannot read the estimator `{text}`",
        hint="write a name or a call with keyword options, e.g. score(baseline='rloo')",
    )


def make_estimator(text: str) -> Estimator | None:
    """Build the estimator that ``text`` names; None for ``auto``."""
    name, opts = parse_spec(text)
    if name == "auto":
        if opts:
            raise EstimatorError("`auto` takes no options", hint="name an estimator to set options")
        return None
    cls = _REGISTRY.get(_ALIASES.get(name, name))
    if cls is None:
        import difflib

        close = difflib.get_close_matches(name, estimators(), n=1)
        raise EstimatorError(
            f"unknown estimator `{name}`",
            hint=(f"did you mean `{close[0]}`? " if close else "") + "storch_nb.estimators() lists the names",
        )
    return cls(**opts)


def auto_estimator(dist: Distribution, particles: int) -> Estimator:
    """``auto``: pathwise where the distribution has ``rsample``, else score with
    the leave-one-out baseline (plain score when there is a single particle)."""
    if dist.has_rsample:
        return _REGISTRY["pathwise"]()
    if particles >= 2:
        return _REGISTRY["score"](baseline="rloo")
    return _REGISTRY["score"]()


def suggest(dist: Distribution | type) -> str:
    """The estimator to suggest for a distribution (instance or class)."""
    if dist.has_rsample:
        return "pathwise"
    if dist.has_enumerate_support:
        return "score(baseline='rloo') or enumerate"
    return "score(baseline='rloo')"
