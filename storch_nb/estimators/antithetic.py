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


@register_estimator("arms")
class ARMS(Estimator):
    """ARMS (Dimitriev & Zhou, ICML 2021, "ARMS: Antithetic-REINFORCE-Multi-Sample
    Gradient for Binary Variables"), with the Dirichlet copula: option ``n=K``
    (at least 2) coupled draws of every Bernoulli entry.

    Per entry, ``d ~ Dirichlet(1, ..., 1)`` over the K draws and
    ``u_k = (1 - d_k)^(K-1)``: each ``u_k`` is uniform, the K are negatively
    dependent. With ``p = sigmoid(theta)``, ``b_k = 1[u_k < p]`` where ``p <= 1/2``
    and ``b_k = 1[1 - u_k < p]`` otherwise (the antithetic side); then::

        g_theta = 1/(K-1) * sum_k (f(b_k) - mean_j f(b_j)) (b_k - p) * c(p)

    the leave-one-out estimator of K samples, made unbiased for the dependent
    draws by ``c(p) = p (1 - p) / (q - C(q, q))``, ``q = min(p, 1 - p)``,
    ``C(a, a) = max(2 a^(1/(K-1)) - 1, 0)^(K-1)`` the copula's joint probability
    of two draws below ``a``. With independent draws ``C(q, q) = q^2`` and
    ``c = 1``: RLOO. K evaluations of the downstream story per particle; the cost
    estimate is the mean of the K. The entries of a site get independent
    copulas, and f may couple them (the estimate is unbiased coordinate by
    coordinate). First derivatives only.
    """

    plated = True
    joint_variants = True
    higher_order = False

    def fits_class(self, cls: type) -> str | None:
        if not issubclass(cls, Bernoulli):
            return "it works for Bernoulli sites only"
        if self.n is None or self.n < 2:
            return "it needs n=K coupled draws with K >= 2, e.g. `using arms(n=4)`"
        return None

    def fits(self, dist: Distribution) -> str | None:
        return self.fits_class(type(dist))

    def plate_size(self, dist: Distribution) -> int:
        return int(self.n)

    def sample_variants(self, dist: Distribution, dim: int, size: int, state: dict) -> tuple[torch.Tensor, Any]:
        logits = dist.logits  # batch (size 1 at dim) + own
        k = size
        with torch.no_grad():
            shape = logits.shape[:dim] + (k,) + logits.shape[dim + 1 :]
            e = -torch.log(torch.rand(shape, dtype=logits.dtype, device=logits.device).clamp_min(
                torch.finfo(logits.dtype).tiny))
            u = (1 - e / e.sum(dim, keepdim=True)) ** (k - 1)  # the Dirichlet copula: uniform marginals
            p = torch.sigmoid(logits)
            flip = p > 0.5
            b = torch.where(flip, (1 - u) < p, u < p).to(logits.dtype)
            q = torch.where(flip, 1 - p, p)
            joint = (2 * q ** (1.0 / (k - 1)) - 1).clamp_min(0) ** (k - 1)
            debias = p * (1 - p) / (q - joint)
        return b, (logits, b, p, debias)

    def reduce_plate(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        logits, b, p, debias = aux
        k = term.shape[dim]
        f = term.detach()
        centred = to_site_shape(f - f.mean(dim, keepdim=True), b, dim)
        g = (centred * (b - p)).sum(dim, keepdim=True) * debias / (k - 1)
        return term.mean(dim) + site_sum(first_order(g * logits), dim)

    def plate_value(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        return term.detach().mean(dim)
