"""Estimators for multi-sample objectives: ``vimco`` and ``dreg``.

A cost ``C = a * L + rest`` with ``L = logmeanexp(f, over=z)``, the log of the
mean of ``exp(f(z_k))`` over K particles ``z_1..z_K ~ q_phi`` of one site (the
IWAE bound when ``f = log p(x, z) - log q(z)``; Burda et al., 2016), has an
expectation whose gradient the plain estimators already give without bias:
``score(n=K)`` credits every particle with the whole ``C`` (the site's
log-probability summed over the particles), ``pathwise(n=K)`` differentiates
through the particles. Both are noisy: the score's signal is shared by all K
particles, and the pathwise gradient of ``phi`` carries, through ``log q``, a
score term whose variance grows with K (Rainforth et al., 2018). With
``w_k = softmax_k(f)`` the self-normalized weights:

* **VIMCO** (Mnih & Rezende, 2016, "Variational Inference for Monte Carlo
  Objectives"): the score function with a baseline per particle, the cost
  evaluated with ``f_k`` replaced by the mean of the other particles'
  values::

      g = sum_k (C - C[f_k := mean_{j != k} f_j]) * d/dphi log q(z_k)

  The baseline does not depend on ``z_k``, so ``g`` is unbiased for any cost
  ``C(L)`` (the engine evaluates the cost line again, once, with every
  particle's leave-one-out ``L`` at once); it stays zero-mean where ``f_k``
  is far from the others, where a leave-one-out of the cost itself would not
  exist. Discrete or continuous sites; first derivatives.

* **DReG** (Tucker, Lawson, Gu & Maddison, 2019, "Doubly Reparameterized
  Gradient Estimators for Monte Carlo Objectives"), for reparameterizable
  sites ``z_k = g(eps_k, phi)``. The pathwise gradient is
  ``sum_k u_k (df_k/dz_k dz_k/dphi + d_phi f_k)``, ``u_k = a w_k``. Where
  ``f`` contains ``-log q_phi(z)`` its direct ``phi``-derivative holds the
  score ``s_k = d_phi log q_phi(z_k)``, and the identity
  ``E[u_k s_k] = E[du_k/dz_k dz_k/dphi]`` (the reparameterization of a score,
  ``phi`` held fixed inside ``u``) turns that term into a pathwise one. The
  engine adds ``sum_k u_k s_k`` and subtracts its equal in expectation
  ``sum_k a w_k (1 - w_k) df_k/dz_k dz_k/dphi``, so the estimate is unbiased
  whatever ``f`` is; for ``f = log p - log q`` the score terms cancel
  exactly and what is left is DReG's::

      g_phi = sum_k a w_k^2 df_k/dz_k dz_k/dphi,     g_theta = sum_k a w_k d_theta f_k

  It needs ``C`` linear in each ``logmeanexp`` (``a`` not depending on
  ``L``; checked, an error otherwise) and ``f`` made of values of the site's
  own particle (nothing drawn after it). First derivatives.

Both need option ``n=K`` (K >= 2) and a cost reducing over the site's
particles with ``logmeanexp``; for a cost per particle (no reduction) VIMCO
is RLOO over the particles and DReG is pathwise.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution

from ..errors import EstimatorError
from .base import Estimator, register_estimator
from .pathwise import Pathwise

__all__ = ["VIMCO", "DReG", "leave_one_out_logmeanexp"]


def leave_one_out_logmeanexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Along ``dim`` (K particles), entry k: ``logmeanexp`` of ``x`` with ``x_k``
    replaced by the mean of the other K-1 values (VIMCO's baseline argument)."""
    xs = x.movedim(dim, -1)
    k = xs.shape[-1]
    others = (xs.sum(-1, keepdim=True) - xs) / (k - 1)  # (..., K): mean of the others, for each k
    eye = torch.eye(k, dtype=torch.bool, device=x.device)
    mat = torch.where(eye, others.unsqueeze(-1), xs.unsqueeze(-2))  # row k: x with x_k replaced
    out = torch.logsumexp(mat, -1) - math.log(k)
    return out.movedim(-1, dim)


def _need_particles(name: str, n: int | None) -> None:
    if n is not None and n < 2:
        raise EstimatorError(f"{name} needs n=K with K >= 2 particles, not n={n}",
                             hint=f"write `using {name}(n=5)` and reduce over them with logmeanexp(..., over=z)")


@register_estimator("vimco")
class VIMCO(Estimator):
    """Score function with VIMCO's per-particle leave-one-out baseline (option ``n=K``)."""

    scored = True
    multi_sample = True
    higher_order = False

    def __init__(self, n: int | None = None, **options) -> None:
        super().__init__(n=n, **options)
        _need_particles("vimco", n)

    def fits(self, dist: Distribution) -> str | None:
        return None

    def check(self, dist: Distribution, node: str) -> None:
        if self.n is None:
            raise EstimatorError(f"site `{node}`: vimco needs option n=K, the particles of a multi-sample objective",
                                 hint="write `using vimco(n=5)` and a cost with logmeanexp(EXPR, over=" + node + ")")
        super().check(dist, node)

    def baseline(self, signal: torch.Tensor, dim: int, state: dict) -> torch.Tensor | None:
        """For a cost per particle (no ``logmeanexp``): leave-one-out over the particles."""
        k = signal.shape[dim]
        return (signal.sum(dim, keepdim=True) - signal) / (k - 1) if k > 1 else None


@register_estimator("dreg")
class DReG(Pathwise):
    """Pathwise derivative with the doubly reparameterized correction (option ``n=K``)."""

    multi_sample = True
    higher_order = False

    def __init__(self, n: int | None = None, **options) -> None:
        super().__init__(n=n, **options)
        _need_particles("dreg", n)

    def fits_class(self, cls) -> str | None:
        if not cls.has_rsample:
            return "it has no reparameterized sampler (rsample): dreg differentiates through the particles"
        return None

    def _refuse(self, reason: str | None, cls: type, site: str) -> None:
        try:
            super()._refuse(reason, cls, site)
        except EstimatorError as exc:
            exc.hint = f"use vimco(n=K) for this site, e.g. `{site.split('[')[0]} ~ {cls.__name__}(...) using vimco(n=5)`"
            raise

    def check(self, dist: Distribution, node: str) -> None:
        if self.n is None:
            raise EstimatorError(f"site `{node}`: dreg needs option n=K, the particles of a multi-sample objective",
                                 hint="write `using dreg(n=5)` and a cost with logmeanexp(EXPR, over=" + node + ")")
        super().check(dist, node)
