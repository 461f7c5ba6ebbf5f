"""Antithetic estimators for Bernoulli sites: ARM and DisARM.

Both draw one uniform ``u`` per entry and evaluate the rest of the story at the
antithetic pair ``b = 1[u < sigma(theta)]``, ``b~ = 1[u > sigma(-theta)]``
(each marginally Bernoulli(sigma(theta))), with ``theta`` the logits.

* ARM (Yin & Zhou, 2019, "ARM: Augment-REINFORCE-Merge Gradient for Stochastic
  Binary Networks")::

      g_theta = (f(b~) - f(b)) * (u - 1/2)

* DisARM (Dong, Mnih & Tucker, 2020, "DisARM: An Antithetic Gradient Estimator
  for Binary Latent Variables")::

      g_theta_i = 1/2 * (f(b) - f(b~)) * (-1)^{b~_i} * 1[b_i != b~_i] * sigma(|theta_i|)

  the Rao-Blackwellisation of ARM over ``u``: never more variance than ARM.

The cost estimate is the pair's mean ``(f(b) + f(b~)) / 2``. Both cost two
evaluations of the downstream story per particle.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributions import Bernoulli, Distribution

from .base import Estimator, first_order, plate_select, register_estimator, site_sum, to_site_shape


class _Antithetic(Estimator):
    plated = True
    joint_variants = True
    higher_order = False  # first-order surrogate: second derivatives are refused

    def fits_class(self, cls: type) -> str | None:
        if not issubclass(cls, Bernoulli):
            return "it works for Bernoulli sites only"
        if self.n is not None:
            return "option n does not apply (the antithetic pair is its own plate)"
        return None

    def fits(self, dist: Distribution) -> str | None:
        return self.fits_class(type(dist))

    def plate_size(self, dist: Distribution) -> int:
        return 2

    def plate_value(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        return term.detach().mean(dim)  # the pair's mean cost

    def sample_variants(self, dist: Distribution, dim: int, size: int, state: dict) -> tuple[torch.Tensor, Any]:
        logits = dist.logits
        with torch.no_grad():
            u = torch.rand(dist.batch_shape, dtype=logits.dtype, device=logits.device)
            p = torch.sigmoid(logits)
            b = (u < p).to(logits.dtype)
            b_anti = (u > 1 - p).to(logits.dtype)
        value = torch.cat([b, b_anti], dim=dim)
        return value, (logits, u, b, b_anti)


@register_estimator("arm")
class ARM(_Antithetic):
    """ARM: ``(f(b~) - f(b)) * (u - 1/2)`` with respect to the logits."""

    def reduce_plate(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        logits, u, b, b_anti = aux
        f, f_anti = plate_select(term, dim, 0).detach(), plate_select(term, dim, 1).detach()
        g = to_site_shape(f_anti - f, logits, dim) * (u - 0.5)
        return term.mean(dim) + site_sum(first_order(g * logits), dim)


@register_estimator("disarm")
class DisARM(_Antithetic):
    """DisARM: ``1/2 (f(b) - f(b~)) (-1)^{b~} 1[b != b~] sigma(|theta|)`` w.r.t. the logits."""

    def reduce_plate(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        logits, u, b, b_anti = aux
        f, f_anti = plate_select(term, dim, 0).detach(), plate_select(term, dim, 1).detach()
        with torch.no_grad():
            weight = (1 - 2 * b_anti) * (b != b_anti) * torch.sigmoid(logits.abs())
        g = 0.5 * to_site_shape(f - f_anti, logits, dim) * weight
        return term.mean(dim) + site_sum(first_order(g * logits), dim)
