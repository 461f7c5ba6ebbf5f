"""Double control variates (Titsias & Shi, AISTATS 2022, "Double Control Variates
for Gradient Estimation in Discrete Latent Variable Models"): Bernoulli,
Categorical and OneHotCategorical sites, option ``n=K`` (at least 2) samples per
particle.

On top of the leave-one-out baseline of K samples, a second control variate:
the first-order Taylor term of the cost around the other samples,

    h_k(b_k) = alpha * sum_entries gbar_{-k} * (b_k - m),   gbar_{-k} = mean_{j != k} df/db (b_j)

with ``m = E[b]`` (``p`` for a Bernoulli, ``pi`` for a one-hot; ``b`` is the
sample's one-hot for a Categorical) and ``alpha`` a
scalar the engine fits to the variance proxy (Adam, option ``lr``; it starts at
0, where the estimator is RLOO). With ``s_k = f(b_k) + h_k(b_k)`` and the score
``b_k - m`` of the logits::

    g = 1/K sum_k (s_k - mean_{j != k} s_j) (b_k - m)  -  alpha * Cov(b) gbar

where ``Cov(b) gbar`` is ``p (1 - p) gbar`` (``pi * gbar - pi (pi . gbar)`` for a
one-hot) and ``gbar`` the mean of all K cost gradients: the exact expectation of
the ``h_k`` part, subtracted back. Unbiased for every ``alpha`` (``gbar_{-k}``
does not depend on ``b_k``, and a ``h_j`` in another sample's baseline has mean
zero given ``b_k``). No evaluations beyond leave-one-out's K, one backward pass
for ``df/db``: the cost must be differentiable in the sample (a cost that is not
gets ``df/db = 0`` and is RLOO). A Categorical site's value is an integer index,
which the story may use as an index: there is no one-hot in the story's graph to
differentiate (giving it a float index instead would break ``A[k]``), so there
``df/db = 0``, ``h_k = 0`` and the estimator is exactly RLOO with the score
``onehot(k) - pi`` (unbiased; ``alpha`` has nothing to act on). Write the site as a
OneHotCategorical to get the Taylor term. First derivatives only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributions import Bernoulli, Categorical, Distribution, OneHotCategorical

from ..errors import EstimatorError
from .base import first_order, register_estimator, site_sum, to_site_shape
from .control_variates import _Adam, _Learned

__all__ = ["DoubleCV"]


@register_estimator("double_cv")
class DoubleCV(_Learned):
    """Double control variates: leave-one-out plus a learned Taylor control variate."""

    plated = True
    joint_variants = True
    higher_order = False
    state_per_run = False  # one alpha, pooled over runs
    options = {"lr": 0.05}

    def __init__(self, n: int | None = None, **options) -> None:
        super().__init__(n=n, **options)
        lr = self.opts["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
            raise EstimatorError(f"lr of `{self.name}` must be a number >= 0, not {lr!r}",
                                 hint="e.g. `using double_cv(n=4, lr=0.05)`; lr=0 keeps alpha at 0 (RLOO)")

    def fits_class(self, cls: type) -> str | None:
        if not issubclass(cls, (Bernoulli, Categorical, OneHotCategorical)):
            return ("it works for Bernoulli, Categorical and OneHotCategorical sites only "
                    "(discrete samples; the cost is differentiated in the sample)")
        if self.n is None or self.n < 2:
            return "it needs n=K samples with K >= 2, e.g. `using double_cv(n=4)`"
        return None

    def fits(self, dist: Distribution) -> str | None:
        return self.fits_class(type(dist))

    def plate_size(self, dist: Distribution) -> int:
        return int(self.n)

    def params(self, state: dict, like: torch.Tensor) -> dict[str, torch.Tensor]:
        cv = state.get("cv")
        if cv is None or state.get("owner") != self.text():
            alpha = torch.zeros((), dtype=like.dtype, device=like.device).requires_grad_(True)
            cv = state["cv"] = {"alpha": alpha}
            state["owner"] = self.text()
            state["optimizer"] = _Adam([alpha], self.opts["lr"]) if self.opts["lr"] > 0 else None
        return cv

    def sample_variants(self, dist: Distribution, dim: int, size: int, state: dict) -> tuple[torch.Tensor, Any]:
        logits = dist.logits
        shape = dist.batch_shape[:dim] + (size,) + dist.batch_shape[dim + 1 :]
        with torch.no_grad():
            value = dist.expand(shape).sample()
        if isinstance(dist, Categorical):  # an integer index: the one-hot for the score, df/db = 0 (RLOO)
            b = torch.nn.functional.one_hot(value, logits.shape[-1]).to(logits.dtype)
        else:
            b = value = value.requires_grad_(True)  # the cost is differentiated in the sample (df/db)
        cv = self.params(state, logits)
        # a copy of alpha: a fit may change alpha before the surrogate's backward pass
        return value, {"logits": logits, "b": b, "mean": dist.probs, "onehot": not isinstance(dist, Bernoulli),
                       "alpha": cv["alpha"].clone()}

    def reduce_plate(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        b, mean, alpha = aux["b"], aux["mean"], aux["alpha"]
        k = term.shape[dim]
        grad_b = None
        if term.requires_grad and b.requires_grad:
            (grad_b,) = torch.autograd.grad(term.sum(), b, retain_graph=True, allow_unused=True)
        grad_b = torch.zeros_like(b) if grad_b is None else grad_b.detach()
        others = (grad_b.sum(dim, keepdim=True) - grad_b) / (k - 1)  # gbar_{-k}
        centred = (b - mean).detach()
        prod = others * centred
        h = alpha * (prod.sum(tuple(range(dim + 1, prod.dim()))) if prod.dim() > dim + 1 else prod)  # per variant
        s = term.detach() + h
        diff = s - (s.sum(dim, keepdim=True) - s) / (k - 1)
        gbar = grad_b.mean(dim, keepdim=True)
        cov_g = mean * (gbar - (mean * gbar).sum(-1, keepdim=True)) if aux["onehot"] else mean * (1 - mean) * gbar
        g = (to_site_shape(diff, b, dim) * centred).mean(dim, keepdim=True) - alpha * cov_g.detach()
        return term.mean(dim) + site_sum(first_order(g * aux["logits"]), dim)

    def plate_value(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        return term.detach().mean(dim)
