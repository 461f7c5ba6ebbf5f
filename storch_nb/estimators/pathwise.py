"""The pathwise derivative (reparameterization).

For ``x = g(eps, theta)`` with ``eps ~ p(eps)`` independent of ``theta``::

    d/dtheta E[f(x)] = E_eps[ f'(g(eps, theta)) * dg/dtheta ]

Glasserman & Ho (1991), "Gradient Estimation via Perturbation Analysis";
Kingma & Welling (2014), "Auto-Encoding Variational Bayes". Unbiased; needs a
distribution with ``rsample`` and a cost differentiable in the sample.
"""

from __future__ import annotations

from torch.distributions import Distribution

from .base import Estimator, register_estimator


@register_estimator("pathwise", "reparam")
class Pathwise(Estimator):
    """Pathwise derivative: the sample is drawn with ``rsample`` so autograd
    differentiates through it."""

    reparameterized = True

    def fits(self, dist: Distribution) -> str | None:
        return self.fits_class(dist)

    def fits_class(self, cls) -> str | None:
        if not cls.has_rsample:
            return "it has no reparameterized sampler (rsample)"
        return None
