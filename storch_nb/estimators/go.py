"""The GO gradient (Cong, Zhao & Carin, ICLR 2019, "GO Gradient for
Expectation-Based Objectives").

For a univariate ``x ~ q(x; theta)`` with CDF ``F(x; theta)``, GO writes::

    d/dtheta E f(x) = E[ G(x; theta) * Df(x) ],   G(x; theta) = -(d/dtheta F(x; theta)) / q(x; theta)

with ``Df(x) = f'(x)`` for continuous ``x`` and ``Df(x) = f(x + 1) - f(x)``
for ``x`` on the integers; entries of a factorised site add up.

* Continuous sites (Gamma, Chi2, Beta, Exponential): ``G * f'(x)`` is the
  implicit reparameterization gradient (Figurnov, Mohamed & Mnih, 2018),
  which is what torch's ``rsample`` computes for these distributions, so the
  site is drawn with ``rsample`` and autograd does the rest.
* Poisson(rate): ``F(x) = Q(x + 1, rate)``, ``dF/drate = -q(x)``, so
  ``G = 1``::

      d/drate E f(x) = E[ f(x + 1) - f(x) ]

* Geometric(probs), ``q(x) = p (1 - p)^x`` on ``x = 0, 1, ...``:
  ``F(x) = 1 - (1 - p)^(x + 1)``, so ``G = -(x + 1) / p``.
* Binomial(total_count n, probs p): ``dF/dp = -(n - x) C(n, x) p^x (1 - p)^(n - x - 1)``,
  so ``G = (n - x) / (1 - p)`` (zero at ``x = n``, where ``x + 1`` is clamped
  to ``n``).

For discrete sites the plate holds ``1 + N`` variants for ``N`` own entries:
``x`` itself (its cost ``f(x)`` is the unbiased cost estimate) and ``x`` with
entry ``i`` raised by one. All forms are unbiased. For the discrete ones the
second derivatives of the surrogate are unbiased too (mixed terms from the
live ``f(x + 1) - f(x)``, the curvature in the parameter from the score
function of the sample: ``indecater.second_order_reduce``); for the
continuous ones they are what torch's ``rsample`` gives (Gamma's implicit
gradient is not differentiable twice: torch raises).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch.distributions import Beta, Binomial, Distribution, Exponential, Gamma, Geometric, Poisson

from .base import Estimator, register_estimator
from .indecater import OWN_RANK_REASON, own_entries, own_rank_fits, own_shape, second_order_reduce

__all__ = ["GO"]

_CONTINUOUS = (Gamma, Beta, Exponential)
_DISCRETE = (Poisson, Geometric, Binomial)


@register_estimator("go")
class GO(Estimator):
    """GO gradient: implicit reparameterization for Gamma/Beta/Exponential,
    ``G(x) (f(x + 1) - f(x))`` for Poisson, Geometric and Binomial."""

    plated = True

    def fits_class(self, cls: type) -> str | None:
        if not issubclass(cls, _CONTINUOUS + _DISCRETE):
            return "it works for Gamma, Chi2, Beta, Exponential, Poisson, Geometric and Binomial sites only"
        if self.n is not None:
            return "option n does not apply (the site's variants are its own plate)"
        return None

    def fits(self, dist: Distribution) -> str | None:
        reason = self.fits_class(type(dist))
        if reason is not None:
            return reason
        if isinstance(dist, _DISCRETE) and not own_rank_fits(dist.batch_shape):
            return OWN_RANK_REASON
        return None

    def plate_size(self, dist: Distribution) -> int:
        return 1 if isinstance(dist, _CONTINUOUS) else 1 + own_entries(dist)

    def sample_variants(self, dist: Distribution, dim: int, size: int, state: dict) -> tuple[torch.Tensor, Any]:
        if isinstance(dist, _CONTINUOUS):
            return dist.rsample(), None  # implicit reparameterization = GO
        own = own_shape(dist, dim, size, 1, 1, self.name)
        n = math.prod(own)
        with torch.no_grad():
            x = dist.sample()
            batch = x.shape[:dim]
            up = x + 1
            if isinstance(dist, Binomial):
                up = torch.minimum(up, dist.total_count)
            eye = torch.eye(n, dtype=torch.bool, device=x.device)
            raised = torch.where(eye, up.reshape(batch + (1, n)), x.reshape(batch + (1, n)))  # (N, N)
            value = torch.cat([x, raised.reshape(batch + (n,) + own)], dim)
            if isinstance(dist, Poisson):
                coef = torch.ones_like(x)
            elif isinstance(dist, Geometric):
                coef = -(x + 1) / dist.probs.detach()
            else:
                left = dist.total_count - x
                coef = torch.where(left > 0, left / (1 - dist.probs.detach()), torch.zeros_like(x))
        if isinstance(dist, Poisson):
            make, param = _poisson, dist.rate
        elif isinstance(dist, Geometric):
            make, param = _geometric, dist.probs
        else:
            make, param = functools.partial(_binomial, dist.total_count), dist.probs
        return value, (make, param, x, coef, own)

    def reduce_plate(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        if aux is None:
            return term.squeeze(dim)
        make, param, x, coef, own = aux
        n = math.prod(own)
        diff = term.narrow(dim, 1, n) - term.narrow(dim, 0, 1)  # f(x + e_i) - f(x), live
        g = coef * diff.reshape(term.shape[:dim] + (1,) + own)
        return second_order_reduce(term, dim, make, [param], x, [g])


def _poisson(rate: torch.Tensor) -> Distribution:
    return Poisson(rate, validate_args=False)


def _geometric(probs: torch.Tensor) -> Distribution:
    return Geometric(probs=probs, validate_args=False)


def _binomial(total_count: torch.Tensor, probs: torch.Tensor) -> Distribution:
    return Binomial(total_count, probs=probs, validate_args=False)
