"""IndeCateR: the CatLog-derivative estimator for independent categoricals.

For a site ``x = (x_1, ..., x_N)`` of independent categoricals with
``x_i ~ Cat(p_i(theta))`` over ``K`` outcomes (De Smet, Sansone & Zuidberg Dos
Martires, NeurIPS 2023, "Differentiable Sampling of Categorical Distributions
Using the CatLog-Derivative Trick")::

    d/dtheta E[f(x)] = sum_i E_{x_{-i}} [ sum_k d/dtheta p_i(k) * f(x_{-i}, x_i := k) ]

estimated from one sample ``x`` per particle (its coordinates other than
``i`` stand in for ``x_{-i}``)::

    g = sum_{i=1}^N sum_{k=1}^K d/dtheta p_i(k) * f(x with x_i := k)

Unbiased, and the Rao-Blackwellisation of the score function over each
coordinate in turn (every coordinate's outcomes are summed exactly). The site
evaluates the downstream story along its own plate at ``1 + N * K``
variants: ``x`` itself, whose cost ``f(x)`` is the (unbiased) cost estimate,
then ``x with x_i := k`` for every ``i`` and ``k``. (The sample's own variant
sits at a fixed position, not at ``x with x_1 := x_1``: a baseline that a
scored site upstream computes per variant must not depend on this sample.)

Fits Categorical and OneHotCategorical sites (``K`` categories) and Bernoulli
sites (two categories, ``p(0) = 1 - p``, ``p(1) = p``) whose own batch shape is
``(N,)`` or ``()``. Second derivatives of the surrogate are unbiased too: the
within-coordinate curvature ``sum_k d2 p_i(k) f(x with x_i := k)`` comes from
the same evaluations and the rest from the score function of the sample (see
:func:`second_order_reduce`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributions import Bernoulli, Categorical, Distribution, OneHotCategorical

from ..errors import EstimatorError
from .base import Estimator, first_order, plate_select, register_estimator, site_sum

__all__ = ["IndeCateR"]


# ----------------------------------------- the site's own entries, for plate sizes
# ``plate_size(dist)`` sees the distribution as the story built it: batch shape
# ``own`` when its arguments are not batched, else ``batch + own`` where the
# batch part ends with the site's plate dim, of size 1. With an own batch shape
# of rank <= 1 the number of own entries is therefore always the size of the
# last dim (or 1 without dims): a trailing 1 is either the plate or an own dim
# of size 1. Estimators that evaluate one variant per own entry (IndeCateR,
# measure-valued, GO) accept own batch shapes of rank <= 1 only, and check the
# count against the real own shape once the engine tells them the plate dim.


def own_rank_fits(batch_shape: torch.Size) -> bool:
    """Whether ``batch_shape`` can be that of a site with own batch rank <= 1."""
    return len(batch_shape) <= 1 or batch_shape[-1] == 1 or batch_shape[-2] == 1


def own_entries(dist: Distribution) -> int:
    """The number of the site's own entries (own batch shape (N,) or ())."""
    shape = dist.batch_shape
    return int(shape[-1]) if len(shape) else 1


def own_shape(dist: Distribution, dim: int, size: int, per_entry: int, extra: int, name: str) -> tuple[int, ...]:
    """The site's own batch shape, given its plate ``dim``, checked against
    the plate ``size``: ``extra + per_entry * N`` variants for N own entries."""
    own = tuple(dist.batch_shape[dim + 1 :])
    if len(own) > 1 or extra + per_entry * math.prod(own) != size:
        raise EstimatorError(
            f"estimator `{name}` needs a site with own batch shape (N,) or (), not {own}",
            hint="flatten the distribution's parameters to one dimension, or use score(baseline='rloo')",
        )
    return own


OWN_RANK_REASON = "it needs a vector of independent entries (own batch shape (N,) or ()); flatten the parameters"


# ------------------------------------------------ second-order-correct surrogates
# A plated estimator that reduces its plate to
#
#     term_0 * h  +  sum_psi sum (psi - stop psi) * G_psi
#
# where ``term_0`` is the cost at the sample ``x`` itself, ``G_psi`` its
# (live) estimate of dE/dpsi for each distribution parameter tensor ``psi``,
# and ``h = box(L) - sum_psi sum (psi - stop psi) * stop(dL/dpsi)`` with
# ``L = log p(x; psi)``, has value ``term_0`` and first derivative
# ``d term_0 + sum_psi G_psi d psi`` (``h`` has value 1 and first derivative
# 0). Its second derivative is unbiased too: ``G_psi d2 psi`` is the chain-rule
# curvature, ``d psi dG_psi^T`` (+ transpose) the mixed terms with parameters
# downstream of the site (``G_psi`` is built from live cost terms), and
# ``term_0 d2 h = f dpsi^T (d2L/dpsi2 + dL/dpsi dL/dpsi^T) dpsi`` the
# score-function estimate of the curvature in ``psi`` itself (``h`` leaves out
# ``dL/dpsi d2 psi``, already in the first part).


def score_coefficients(make: Any, psis: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """``stop(d log p(x; psi) / d psi)`` for each parameter tensor, where
    ``make(*psis)`` builds the distribution."""
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(True) for p in psis]
        lp = make(*leaves).log_prob(x)
        return list(torch.autograd.grad(lp.sum(), leaves))


def second_order_reduce(
    term: torch.Tensor, dim: int, make: Any, psis: list[torch.Tensor], x: torch.Tensor, grads: list[torch.Tensor]
) -> torch.Tensor:
    """``term_0 * h + sum_psi site_sum(first_order(psi) * G_psi)`` (see above);
    ``grads`` are the live ``G_psi``, in the shape of their ``psi``."""
    log_p = site_sum(make(*psis).log_prob(x), dim)
    h = torch.exp(log_p - log_p.detach())
    out = None
    for psi, c, g in zip(psis, score_coefficients(make, psis, x), grads):
        h = h - site_sum(first_order(psi) * c, dim)
        part = site_sum(first_order(psi) * g, dim)
        out = part if out is None else out + part
    return plate_select(term, dim, 0) * h + out


@register_estimator("indecater")
class IndeCateR(Estimator):
    """IndeCateR: ``sum_i sum_k d p_i(k) * f(x with x_i := k)`` (De Smet et al., 2023);
    ``1 + N K`` evaluations of the downstream story per particle."""

    plated = True

    def fits_class(self, cls: type) -> str | None:
        if not issubclass(cls, (Categorical, OneHotCategorical, Bernoulli)):
            return "it works for Categorical, OneHotCategorical and Bernoulli sites (independent categoricals) only"
        if self.n is not None:
            return "option n does not apply (the N*K variants are its own plate)"
        return None

    def fits(self, dist: Distribution) -> str | None:
        reason = self.fits_class(type(dist))
        if reason is not None:
            return reason
        if not own_rank_fits(dist.batch_shape):
            return OWN_RANK_REASON
        return None

    @staticmethod
    def categories(dist: Distribution) -> int:
        return 2 if isinstance(dist, Bernoulli) else int(dist.probs.shape[-1])

    def plate_size(self, dist: Distribution) -> int:
        return 1 + own_entries(dist) * self.categories(dist)

    def sample_variants(self, dist: Distribution, dim: int, size: int, state: dict) -> tuple[torch.Tensor, Any]:
        k = self.categories(dist)
        own = own_shape(dist, dim, size, k, 1, self.name)
        n = math.prod(own)
        onehot = isinstance(dist, OneHotCategorical)
        with torch.no_grad():
            x = dist.sample()
            idx = x.argmax(-1) if onehot else x.long()
            flat = idx.reshape(idx.shape[: dim + 1] + (n,))  # batch (size 1 at dim) + (N,)
            # variant 1 + i*K + j is x with coordinate i set to outcome j
            eye = torch.eye(n, dtype=torch.bool, device=flat.device).repeat_interleave(k, 0)  # (N*K, N)
            outcome = torch.arange(k, device=flat.device).repeat(n).unsqueeze(-1)  # (N*K, 1)
            variants = torch.where(eye, outcome, flat).reshape(flat.shape[:dim] + (n * k,) + own)
            variants = torch.cat([idx, variants], dim)
            if onehot:
                value = torch.nn.functional.one_hot(variants, k).to(x.dtype)
            elif isinstance(dist, Bernoulli):
                value = variants.to(x.dtype)
            else:
                value = variants
        if isinstance(dist, Bernoulli):
            p = dist.probs
            probs = torch.stack([1 - p, p], -1)
        else:
            probs = dist.probs
        return value, (probs, idx, own, k)

    def plate_value(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        return plate_select(term, dim, 0).detach()  # the cost at the sample itself (variant 0)

    def reduce_plate(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        probs, idx, own, k = aux
        # f(x with x_i := k), live: the estimate of dE/dp_i(k)
        g = term.narrow(dim, 1, term.shape[dim] - 1).reshape(term.shape[:dim] + (1,) + own + (k,))
        return second_order_reduce(term, dim, _categorical, [probs], idx, [g])


def _categorical(probs: torch.Tensor) -> Distribution:
    return Categorical(probs=probs, validate_args=False)
