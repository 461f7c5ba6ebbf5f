"""Antithetic estimators: ARM and DisARM (Bernoulli sites), ARMS (Bernoulli,
Categorical and OneHotCategorical sites; see :class:`ARMS`).

ARM and DisARM draw one uniform ``u`` per entry and evaluate the rest of the story at the
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
evaluations of the downstream story per particle. ARMS generalises the pair to K
copula-coupled draws, with the leave-one-out estimator corrected for the coupling
(the maths in its docstring).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributions import Bernoulli, Categorical, Distribution, OneHotCategorical

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
    Gradient for Binary Variables"): option ``n=K`` coupled draws of every entry of a
    Bernoulli, Categorical or OneHotCategorical site, from the Dirichlet copula.

    Per entry, ``d ~ Dirichlet(1, ..., 1)`` over the K draws and
    ``u_k = (1 - d_k)^(K-1)``: each ``u_k`` is uniform, the K are exchangeable and
    negatively dependent, with ``P(u_j < s, u_k < t) = C(s, t) =
    max(s^(1/(K-1)) + t^(1/(K-1)) - 1, 0)^(K-1)`` for any two of them.

    Bernoulli (the paper): with ``p = sigmoid(theta)``, ``b_k = 1[u_k < p]`` where
    ``p <= 1/2`` and ``b_k = 1[1 - u_k < p]`` otherwise (the antithetic side); then::

        g_theta = 1/(K-1) * sum_k (f(b_k) - mean_j f(b_j)) (b_k - p) * c(p)

    the leave-one-out estimator of K samples, made unbiased for the dependent
    draws by ``c(p) = p (1 - p) / (q - C(q, q))``, ``q = min(p, 1 - p)``. With
    independent draws ``C(q, q) = q^2`` and ``c = 1``: RLOO.

    Categorical and OneHotCategorical (C outcomes, probabilities ``pi``; the
    copula-coupled multi-sample idea of CARMS, Dimitriev & Zhou 2021,
    arXiv:2110.14002, with the correction derived here): the outcomes are laid
    on [0, 1) in increasing probability (the rarest first, where two draws cannot
    both fall when ``pi_a <= 2^-(K-1)``) and ``x_k`` is the outcome whose interval
    holds ``u_k``. Write ``e_x`` for the one-hot of ``x``, ``S = diag(pi) - pi pi^T``
    its covariance (``S f`` is the exact gradient w.r.t. the logits of a cost
    ``f`` of one entry) and ``J[a, b] = P(x_j = a, x_k = b)`` the pairwise joint,
    exact from ``C`` (a rectangle of it). For ``j != k``,
    ``E[f(x_j) (e_{x_k} - pi)] = (J - pi pi^T) f``, so the leave-one-out sum
    ``v = sum_k (f(x_k) - mean_j f(x_j)) (e_{x_k} - pi)`` has mean
    ``(K-1) L f`` with ``L = diag(pi) - J`` (a graph Laplacian: PSD, kernel the
    constants for K >= 3, where every outcome meets the likeliest one); hence::

        g_logits = 1/(K-1) * S L^+ v

    is unbiased (``S L^+ L = S``, since ``S`` also kills the constants). For two
    outcomes it is the Bernoulli estimator above; for independent draws
    (``J = pi pi^T``, ``L = S``) it is RLOO. A cost coupling entries is fine: the
    entries get independent copulas, and given the others' draws the cost is
    linear in one entry's one-hot (the estimate is unbiased entry by entry).
    Option ``n=K`` needs K >= 2 (Bernoulli) or K >= 3 (categorical: two
    antithetic draws can leave a direction of the logits unseen). K evaluations
    of the downstream story per particle; the cost estimate is the mean of the K.
    First derivatives only.
    """

    plated = True
    joint_variants = True
    higher_order = False

    def fits_class(self, cls: type) -> str | None:
        if not issubclass(cls, (Bernoulli, Categorical, OneHotCategorical)):
            return "it works for Bernoulli, Categorical and OneHotCategorical sites only"
        if self.n is None or self.n < 2:
            return "it needs n=K coupled draws with K >= 2, e.g. `using arms(n=4)`"
        if self.n < 3 and not issubclass(cls, Bernoulli):
            return ("on a Categorical or OneHotCategorical site it needs n=K coupled draws with K >= 3 "
                    "(two antithetic draws can leave a direction of the logits unseen), e.g. `using arms(n=4)`")
        return None

    def fits(self, dist: Distribution) -> str | None:
        return self.fits_class(type(dist))

    def plate_size(self, dist: Distribution) -> int:
        return int(self.n)

    def sample_variants(self, dist: Distribution, dim: int, size: int, state: dict) -> tuple[torch.Tensor, Any]:
        if not isinstance(dist, Bernoulli):
            return _categorical_variants(dist, dim, size)
        logits = dist.logits  # batch (size 1 at dim) + own
        k = size
        with torch.no_grad():
            u = _dirichlet_copula(logits.shape[:dim] + (k,) + logits.shape[dim + 1 :], dim, k, logits)
            p = torch.sigmoid(logits)
            flip = p > 0.5
            b = torch.where(flip, (1 - u) < p, u < p).to(logits.dtype)
            q = torch.where(flip, 1 - p, p)
            joint = (2 * q ** (1.0 / (k - 1)) - 1).clamp_min(0) ** (k - 1)
            debias = p * (1 - p) / (q - joint)
        return b, (logits, b, p, debias)

    def reduce_plate(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        logits, x, mean, weight = aux
        k = term.shape[dim]
        f = term.detach()
        centred = to_site_shape(f - f.mean(dim, keepdim=True), x, dim)
        v = (centred * (x - mean)).sum(dim, keepdim=True)
        if weight.dim() == logits.dim():  # Bernoulli: weight is c(p)
            g = v * weight / (k - 1)
        else:  # categorical: weight is S L^+, one C x C matrix per entry
            g = (weight @ v.unsqueeze(-1)).squeeze(-1) / (k - 1)
        return term.mean(dim) + site_sum(first_order(g * logits), dim)

    def plate_value(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        return term.detach().mean(dim)


def _dirichlet_copula(shape: tuple[int, ...], dim: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """K uniforms along ``dim``, ``u_k = (1 - d_k)^(K-1)`` with ``d ~ Dirichlet(1, ..., 1)``."""
    e = -torch.log(torch.rand(shape, dtype=like.dtype, device=like.device).clamp_min(torch.finfo(like.dtype).tiny))
    return (1 - e / e.sum(dim, keepdim=True)) ** (k - 1)


def _categorical_variants(dist: Distribution, dim: int, k: int) -> tuple[torch.Tensor, Any]:
    """K copula-coupled draws of every categorical entry, and the correction ``S L^+``."""
    logits = dist.logits  # batch (size 1 at dim) + own + (C,)
    c = logits.shape[-1]
    with torch.no_grad():
        probs = dist.probs.to(torch.float64)
        order = probs.argsort(-1)  # increasing probability: one order for the draws and the correction
        edges = torch.cat([torch.zeros_like(probs[..., :1]), probs.gather(-1, order).cumsum(-1)], -1)
        edges[..., -1] = 1.0
        u = _dirichlet_copula(logits.shape[:dim] + (k,) + logits.shape[dim + 1 : -1], dim, k, probs)
        upper = edges[..., 1:].expand(u.shape + (c,)).contiguous()
        pos = torch.searchsorted(upper, u.unsqueeze(-1), right=True).clamp_max(c - 1)
        index = order.expand(u.shape + (c,)).gather(-1, pos).squeeze(-1)
        onehot = torch.nn.functional.one_hot(index, c).to(logits.dtype)
        weight = _correction(edges, order, k).to(logits.dtype)
    value = onehot if isinstance(dist, OneHotCategorical) else index
    return value, (logits, onehot, dist.probs.detach(), weight)


def _correction(edges: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """``S L^+`` (outcomes in their own order) from the outcomes' ``edges`` on [0, 1]
    (sorted by ``order``): ``J`` from the copula's pairwise ``C``, ``L = diag(pi) - J``."""
    r = edges ** (1.0 / (k - 1))
    cdf = (r.unsqueeze(-1) + r.unsqueeze(-2) - 1).clamp_min(0) ** (k - 1)  # C(edge_a, edge_b)
    joint = cdf[..., 1:, 1:] - cdf[..., :-1, 1:] - cdf[..., 1:, :-1] + cdf[..., :-1, :-1]
    c = order.shape[-1]
    rank = order.argsort(-1)  # back to the outcomes' own order: J[a, b] = J_sorted[rank a, rank b]
    joint = joint.gather(-2, rank.unsqueeze(-1).expand(rank.shape + (c,)))
    joint = joint.gather(-1, rank.unsqueeze(-2).expand(rank.shape[:-1] + (c, c)))
    pi = joint.sum(-1)  # the marginals (the probabilities, to rounding)
    lap = torch.diag_embed(pi) - joint
    cov = torch.diag_embed(pi) - pi.unsqueeze(-1) * pi.unsqueeze(-2)
    return cov @ torch.linalg.pinv(lap, hermitian=True)
