"""The measure-valued derivative for Normal sites (loc and scale).

A weak derivative writes the derivative of a density as a scaled difference
of two densities, ``d/dtheta p(x; theta) = c_theta (p+(x) - p-(x))``, so that
``d/dtheta E_p[f] = c_theta (E_{p+}[f] - E_{p-}[f])`` (Pflug, 1989,
"Sampling derivatives of probabilities"; Mohamed, Rosca, Figurnov & Mnih,
JMLR 2020, "Monte Carlo Gradient Estimation in Machine Learning", sec. 6,
table 1). For ``x ~ N(mu, sigma^2)``, entry by entry::

    d/dmu    E f(x) = 1 / (sigma sqrt(2 pi)) * E_W[ f(mu + sigma W) - f(mu - sigma W) ]
    d/dsigma E f(x) = 1 / sigma * E[ f(mu + sigma M) - f(mu + sigma e) ]

with ``W ~ Weibull(scale sqrt(2), concentration 2)`` (the Rayleigh density
``w exp(-w^2/2)``: the positive and negative parts of
``(x - mu)/sigma^2 N(x; mu, sigma^2)``), ``M`` double-sided Maxwell (density
``m^2 exp(-m^2/2) / sqrt(2 pi)``: ``sign * sqrt(Chi2(3))``) and ``e ~ N(0, 1)``.
The two parts of each pair are coupled (common random numbers): the same
``W`` for ``mu +/- sigma W``, and ``e = M U`` with ``U ~ U(0, 1)``, which is
exactly N(0, 1) (a Maxwell times an independent uniform is Gaussian).

For a site with ``N`` entries, entry ``i``'s derivatives come from the story
evaluated at ``x`` with only entry ``i`` moved to each of the four points; the
site's plate holds ``1 + 4 N`` variants: the sample ``x ~ N(mu, sigma^2)``
itself, whose cost ``f(x)`` is the (unbiased) cost estimate, and the four
coupled points per entry. Unbiased; ``f`` need not be differentiable. The
gradient reaches ``loc`` and ``scale`` as ``first_order(g_mu * loc + g_sigma * scale)``
(summed over the entries), with ``g_mu``, ``g_sigma`` built from the live cost
terms so that mixed second derivatives with parameters downstream are right;
the curvature in ``loc`` and ``scale`` themselves comes from the score
function of the sample (``indecater.second_order_reduce``), so second
derivatives of the surrogate are unbiased as well.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributions import Chi2, Distribution, Normal, Weibull

from .base import Estimator, plate_select, register_estimator
from .indecater import OWN_RANK_REASON, own_entries, own_rank_fits, own_shape, second_order_reduce

__all__ = ["MeasureValued"]

_SQRT_2PI = math.sqrt(2 * math.pi)


@register_estimator("measure_valued")
class MeasureValued(Estimator):
    """Measure-valued derivative of a Normal site: Weibull pair for the mean,
    (double-sided Maxwell, Normal) pair for the scale (Mohamed et al., 2020)."""

    plated = True

    def fits_class(self, cls: type) -> str | None:
        if not issubclass(cls, Normal):
            return "it works for Normal sites only"
        if self.n is not None:
            return "option n does not apply (the coupled points are its own plate)"
        return None

    def fits(self, dist: Distribution) -> str | None:
        reason = self.fits_class(type(dist))
        if reason is not None:
            return reason
        if not own_rank_fits(dist.batch_shape):
            return OWN_RANK_REASON
        return None

    def plate_size(self, dist: Distribution) -> int:
        return 1 + 4 * own_entries(dist)

    def sample_variants(self, dist: Distribution, dim: int, size: int, state: dict) -> tuple[torch.Tensor, Any]:
        own = own_shape(dist, dim, size, 4, 1, self.name)
        n = math.prod(own)
        loc, scale = dist.loc, dist.scale
        shape = loc.shape  # batch (size 1 at dim) + own
        kw = {"dtype": loc.dtype, "device": loc.device}
        with torch.no_grad():
            x = dist.sample()
            mu, sigma = loc.detach(), scale.detach()
            w = Weibull(torch.tensor(math.sqrt(2.0), **kw), torch.tensor(2.0, **kw)).sample(shape)
            sign = torch.randint(0, 2, shape, device=loc.device).to(loc.dtype) * 2 - 1
            m = sign * Chi2(torch.tensor(3.0, **kw)).sample(shape).sqrt()
            e = m * torch.rand(shape, **kw)  # ~ N(0, 1), coupled with m
            points = torch.stack([mu + sigma * w, mu - sigma * w, mu + sigma * m, mu + sigma * e], -1)
            batch = shape[:dim]
            # variant 1 + 4 i + j: x with entry i moved to point j
            eye = torch.eye(n, dtype=torch.bool, device=loc.device).reshape(n, 1, n)
            moved = torch.where(eye, points.reshape(batch + (n, 4, 1)), x.reshape(batch + (1, 1, n)))
            value = torch.cat([x, moved.reshape(batch + (4 * n,) + own)], dim)
        return value, (loc, scale, x, own)

    def plate_value(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        return plate_select(term, dim, 0).detach()  # the cost at the sample itself (variant 0)

    def reduce_plate(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        loc, scale, x, own = aux
        n = math.prod(own)
        f = term.narrow(dim, 1, 4 * n).reshape(term.shape[:dim] + (1,) + own + (4,))  # live
        sigma = scale.detach()
        g_mu = (f[..., 0] - f[..., 1]) / (sigma * _SQRT_2PI)
        g_sigma = (f[..., 2] - f[..., 3]) / sigma
        return second_order_reduce(term, dim, _normal, [loc, scale], x, [g_mu, g_sigma])


def _normal(loc: torch.Tensor, scale: torch.Tensor) -> Distribution:
    return Normal(loc, scale, validate_args=False)
