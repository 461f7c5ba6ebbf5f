"""Sampling without replacement: the unordered set estimator and its built-in
baseline (Categorical and OneHotCategorical sites, and Bernoulli sites as the
two outcomes tails and heads).

Kool, van Hoof & Welling (2020), "Estimating Gradients for Discrete Random
Variables by Sampling without Replacement" (ICLR). For a categorical ``p`` on
the domain ``D`` (``K`` outcomes), each particle draws ``k`` distinct outcomes
with the Gumbel-top-k trick, ``B = top-k_j (log p_j + g_j)``, ``g_j`` iid
Gumbel (Kool, van Hoof & Welling, 2019, "Stochastic Beams and Where to Find
Them"): an ordered sample without replacement, ``P(B) = prod_i p(b_i) / (1 -
sum_{j<i} p(b_j))``. Let ``S`` be its unordered set,
``p^D(S) = sum_{orderings B of S} P(B)``, and the leave-one-out ratio::

    R(S, s) = p^{D \\ {s}}(S \\ {s}) / p^D(S)

so that ``p(s) R(S, s) = P(b_1 = s | S)`` (the weights sum to one).

* ``unordered_set`` (the unordered set estimator and its policy gradient form;
  option ``k``, default 4, or the number of outcomes where that is smaller)::

      cost estimate  sum_{s in S} p(s) R(S, s) f(s)
      gradient       sum_{s in S} p(s) R(S, s) grad log p(s) f(s)
                     + sum_{s in S} stop_grad(p(s) R(S, s)) grad f(s)

  the Rao-Blackwellisation over the order of single-sample REINFORCE on
  ``b_1``, plus the pathwise part for a cost that depends on parameters
  directly. Unbiased; with ``k = K`` it is the exact gradient.

* ``score_wor`` (the unordered set policy gradient estimator with the built-in
  baseline; option ``k``, default as above, at least 2)::

      gradient  sum_{s in S} p(s) R(S, s) grad log p(s) (f(s) - B(S, s))
      B(S, s) = sum_{s' in S} p(s') R^{D \\ {s}}(S, s') f(s')

  with the second-order leave-one-out ratio
  ``R^{D \\ {s}}(S, s') = p^{D \\ {s, s'}}(S \\ {s, s'}) / p^{D \\ {s}}(S \\ {s})``
  for ``s' != s`` and ``R^{D \\ {s}}(S, s) = 1``. ``B(S, s)`` is
  ``p(s) f(s)`` plus the unordered set estimate of ``(1 - p(s)) E_{x ~ p^{D \\
  {s}}}[f(x)]`` from the other ``k - 1`` elements (a sample without
  replacement from ``D \\ {s}`` given ``b_1 = s``), so its expectation given
  ``b_1 = s`` is ``E[f]`` whatever ``s`` is: an unbiased baseline. Here
  ``p(s') R^{D \\ {s}}(S, s') = (1 - p(s)) P(b_2 = s' | b_1 = s, S)``. The
  cost estimate is the unordered set one. Unbiased; exact for ``k = K``.

Every ratio is computed exactly (vectorized, in log space; the mass outside
``S`` is summed directly rather than as ``1 - sum``): ``P(b_1 = s | S)`` and
``P(b_2 = s' | b_1 = s, S)`` follow from the probability of drawing each subset
of ``S`` first, a recursion over the ``2^k`` subsets (see :func:`set_ratios`)
rather than a sum over the ``k!`` orderings; ``k`` is at most 12. Each particle
evaluates the downstream story at its ``k`` distinct values (``k`` cost
evaluations). A site of N independent entries (own batch shape ``(N,)``, C
outcomes each) is one categorical over its ``C**N`` joint outcomes (at most
4096; the joint log-probability is the sum over entries), so a cost that
couples the entries is handled like any other.

The surrogate (Foerster et al., 2018; Mao et al., 2019) is, with ``box(x) =
exp(x - stop_grad(x))`` and the weights held constant::

    unordered_set   sum_{s in S} stop_grad(w_s) box(log p(s)) f(s)
    score_wor       ... + sum_{s in S} stop_grad(w_s) (1 - box(log p(s))) stop_grad(B(S, s))

with ``w_s = p(s) R(S, s)``: the value is the cost estimate and the first
derivative the gradient estimator above. It is single-sample DiCE on ``b_1``
averaged over the orderings of ``S`` given ``S`` (the weights are that
conditional distribution), so its derivatives of every order are unbiased,
and the baseline term keeps them so because ``E[B(S, s) | b_1 = s] = E[f]``
does not depend on ``s``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch
from torch.distributions import Bernoulli, Categorical, Distribution, OneHotCategorical

from ..errors import EstimatorError
from .base import Estimator, register_estimator

__all__ = ["UnorderedSet", "ScoreWithoutReplacement", "gumbel_top_k", "set_ratios"]

MAX_K = 12


@lru_cache(maxsize=32)
def _subsets(k: int, device: str):
    """Tables for a dynamic programme over the subsets of ``range(k)`` (bit masks):
    membership (2^k, k); per size m = 1..k the masks of that size (n_m,), their
    members (n_m, m) and each mask without that member (n_m, m); the masks
    ``S \\ {s}`` (k,) and ``S \\ {s, s'}`` (k, k) with ``S`` the full set."""
    dev = torch.device(device)
    n = 1 << k
    member = (torch.arange(n)[:, None] >> torch.arange(k)[None, :]) & 1
    levels = []
    for m in range(1, k + 1):
        masks = [a for a in range(n) if bin(a).count("1") == m]
        elems = [[i for i in range(k) if a >> i & 1] for a in masks]
        subs = [[a ^ (1 << i) for i in e] for a, e in zip(masks, elems)]
        levels.append(tuple(torch.tensor(x, dtype=torch.long, device=dev) for x in (masks, elems, subs)))
    full = n - 1
    loo = torch.tensor([full ^ (1 << i) for i in range(k)], dtype=torch.long, device=dev)
    loo2 = torch.tensor(
        [[full ^ (1 << i) ^ (1 << j) for j in range(k)] for i in range(k)], dtype=torch.long, device=dev
    )
    return member.bool().to(dev), levels, full, loo, loo2


def gumbel_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (last dim ``k``) of an ordered sample without replacement from
    ``Categorical(logits=logits)``, by the Gumbel-top-k trick, for every batch entry."""
    with torch.no_grad():
        gumbel = -torch.empty(logits.shape, dtype=logits.dtype, device=logits.device).exponential_().log()
        return (logits + gumbel).topk(k, dim=-1).indices


def set_ratios(logits: torch.Tensor, index: torch.Tensor, second: bool = False):
    """For each batch entry: the normalised log-probabilities ``logits`` (..., K) and the
    sampled set ``index`` (..., k), return ``w_s = p(s) R(S, s) = P(b_1 = s | S)``
    (..., k) and, with ``second``, ``v_{s s'} = P(b_2 = s' | b_1 = s, S)`` (..., k, k),
    zero on the diagonal. No gradient flows.

    With ``r`` the mass outside ``S`` and, for ``A`` a subset of ``S``,
    ``G(A) = sum_{orderings B of A} prod_i q(b_i) / (r + q({b_i, ..., b_|A|}))``
    (the probability of drawing ``A`` first, in any order, from ``A`` and the
    rest), ``G(A) = sum_{a in A} q(a) G(A \\ a) / (r + q(A))``: a recursion over
    the ``2^k`` subsets (instead of the ``k!`` orderings), in log space. Then
    ``w_s = q(s) G(S \\ s) / ((r + q(S)) G(S))`` and
    ``v_{s s'} = q(s') G(S \\ {s, s'}) / ((r + q(S \\ s)) G(S \\ s))``.
    """
    with torch.no_grad():
        k = index.shape[-1]
        member, levels, full, loo, loo2 = _subsets(k, str(index.device))
        log_q = logits.gather(-1, index)  # (..., k)
        # the mass outside S, summed directly (no 1 - sum cancellation)
        inside = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(-1, index, True)
        log_rest = logits.masked_fill(inside, -math.inf).logsumexp(-1, keepdim=True)  # (..., 1)
        # log(r + q(A)) for every subset A
        log_mass = torch.logaddexp(log_q[..., None, :].masked_fill(~member, -math.inf).logsumexp(-1), log_rest)
        log_g = torch.zeros(log_mass.shape, dtype=log_q.dtype, device=log_q.device)  # G(empty) = 1
        for masks, elems, subs in levels:
            terms = log_q[..., elems] + log_g[..., subs]  # (..., n_m, m)
            log_g[..., masks] = terms.logsumexp(-1) - log_mass[..., masks]
        w = (log_q - log_mass[..., full, None] + log_g[..., loo] - log_g[..., full, None]).exp()
        if not second:
            return w, None
        # [s, s']: q(s') G(S - {s, s'}) / ((r + q(S - s)) G(S - s))
        v = (log_q[..., None, :] + log_g[..., loo2] - (log_mass[..., loo] + log_g[..., loo])[..., :, None]).exp()
        v = v.masked_fill(torch.eye(k, dtype=torch.bool, device=v.device), 0.0)  # s' = s: not a second draw
        return w, v


#: ``k`` when the option is not given (or the site's number of outcomes, where smaller)
DEFAULT_K = 4


#: the most joint outcomes of a site with several entries (sampled as one categorical)
MAX_JOINT = 4096


def _entries(dist: Distribution) -> int:
    """The site's own entries (own batch shape (N,) or (); see ``sample_variants``)."""
    shape = dist.batch_shape
    return int(shape[-1]) if len(shape) else 1


def _outcomes(dist: Distribution) -> int:
    """The site's joint outcomes: C per entry, C**N for N entries."""
    per = 2 if isinstance(dist, Bernoulli) else int(dist.logits.shape[-1])
    return per ** _entries(dist)


@lru_cache(maxsize=32)
def _configurations(per: int, n: int, device: str) -> torch.Tensor:
    """Every joint outcome of ``n`` entries with ``per`` outcomes each: (per**n, n)."""
    return torch.cartesian_prod(*[torch.arange(per, device=torch.device(device))] * n).reshape(per**n, n)


def _joint_logits(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry normalised log-probabilities (..., n, C) to those of the joint outcomes
    (..., C**n) (independent entries: a sum), with the outcomes' table (C**n, n)."""
    table = _configurations(logits.shape[-1], n, str(logits.device))
    picked = logits[..., torch.arange(n, device=logits.device), table]  # (..., C**n, n)
    return picked.sum(-1), table


def _class_logits(dist: Distribution) -> torch.Tensor:
    """Normalised log-probabilities of the site's outcomes (a Bernoulli's: tails, heads)."""
    if isinstance(dist, Bernoulli):
        t = dist.logits
        return torch.stack([torch.nn.functional.logsigmoid(-t), torch.nn.functional.logsigmoid(t)], -1)
    return dist.logits


class _WithoutReplacement(Estimator):
    plated = True
    options = {"k": None}  # None: DEFAULT_K, or the site's number of outcomes where that is smaller
    min_k = 1
    baseline_builtin = False

    def __init__(self, n: int | None = None, **options) -> None:
        super().__init__(n=n, **options)
        k = self.opts["k"]
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not self.min_k <= k <= MAX_K):
            why = " (the built-in baseline leaves one sample out)" if self.min_k > 1 else ""
            raise EstimatorError(
                f"option k of `{self.name}` must be an int from {self.min_k} to {MAX_K}{why}, not {k!r}",
                hint=f"e.g. `using {self.name}(k=4)`; each particle evaluates the story at k distinct outcomes",
            )

    def fits_class(self, cls: type) -> str | None:
        if not issubclass(cls, (Categorical, OneHotCategorical, Bernoulli)):
            return "it samples Categorical, OneHotCategorical and Bernoulli sites without replacement only"
        if self.n is not None:
            return "option n does not apply (the k samples without replacement are its own plate; use option k)"
        return None

    def fits(self, dist: Distribution) -> str | None:
        reason = self.fits_class(type(dist))
        if reason is not None:
            return reason
        size = _outcomes(dist)
        if size > MAX_JOINT:
            return (f"its {_entries(dist)} entries have {size:,} joint outcomes; it samples joint outcomes "
                    f"without replacement, at most {MAX_JOINT:,}")
        k = self.opts["k"]
        if k is not None and k > size:
            return f"option k={k} is more than the site's {size} outcomes"
        if self.plate_size(dist) < self.min_k:
            return f"it needs at least {self.min_k} outcomes to leave one out, and the site has {size}"
        return None

    def plate_size(self, dist: Distribution) -> int:
        k = self.opts["k"]
        return k if k is not None else min(DEFAULT_K, _outcomes(dist))

    def sample_variants(self, dist: Distribution, dim: int, size: int, state: dict) -> tuple[torch.Tensor, Any]:
        own = tuple(dist.batch_shape[dim + 1 :])
        if len(own) > 1:
            raise EstimatorError(
                f"estimator `{self.name}` needs a site with own batch shape (N,) or (), not {own}",
                hint="flatten the distribution's parameters to one dimension, or use score(baseline='rloo')",
            )
        entry = _class_logits(dist)  # (*batch, *own, C), normalised; batch has size 1 at dim (its last dim)
        per = entry.shape[-1]
        if own:  # N entries: sampled jointly, one categorical over the C**N joint outcomes
            logits, table = _joint_logits(entry, own[0])
        else:
            logits, table = entry, None
        index = gumbel_top_k(logits, size)  # (*batch, k)
        index = index.transpose(dim, -1).squeeze(-1)  # (*batch with k at dim)
        log_p = logits.expand(index.shape + logits.shape[-1:]).gather(-1, index.unsqueeze(-1)).squeeze(-1)
        w, v = set_ratios(logits.detach().squeeze(dim), index, second=self.baseline_builtin)
        outcome = index if table is None else table[index]  # (*batch with k at dim, *own)
        if isinstance(dist, OneHotCategorical):
            value = torch.nn.functional.one_hot(outcome, per).to(entry.dtype)
        elif isinstance(dist, Bernoulli):
            value = outcome.to(entry.dtype)  # outcome 1 is heads
        else:
            value = outcome
        return value, (log_p, w, v)

    def plate_value(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        return (aux[1] * term.detach()).sum(dim)  # sum_s p(s) R(S, s) f(s)

    def reduce_plate(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        log_p, w, v = aux
        box = torch.exp(log_p - log_p.detach())  # the DiCE magic box of log p(s): value 1
        out = w * box * term
        if v is not None:
            f = term.detach()
            dtype = torch.promote_types(f.dtype, w.dtype)  # a float32 cost of an index in a float64 run
            f, p, v = f.to(dtype), log_p.detach().exp().to(dtype), v.to(dtype)
            if f.shape[-1] != w.shape[-1]:
                f = f.expand(f.shape[:-1] + w.shape[-1:])
            baseline = p * f + (1 - p) * (v @ f.unsqueeze(-1)).squeeze(-1)  # B(S, s)
            out = out + w * (1 - box) * baseline
        return out.sum(dim)


@register_estimator("unordered_set")
class UnorderedSet(_WithoutReplacement):
    """The unordered set estimator: ``sum_s p(s) R(S, s) grad log p(s) f(s)`` over a
    sample ``S`` of ``k`` distinct outcomes (Kool et al., 2020)."""


@register_estimator("score_wor")
class ScoreWithoutReplacement(_WithoutReplacement):
    """The unordered set estimator with its built-in baseline:
    ``sum_s p(s) R(S, s) grad log p(s) (f(s) - sum_s' p(s') R^{D\\s}(S, s') f(s'))``
    (Kool et al., 2020)."""

    min_k = 2
    baseline_builtin = True
