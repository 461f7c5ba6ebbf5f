"""The DiCE surrogate: one differentiable scalar (per run) whose value is the
cost estimate and whose derivatives of every order are the estimator's.

For each cost ``c`` with scored sites ``W_c`` upstream of it and enumerated
sites ``U_c`` upstream of it::

    term_c = prod_{u in U_c} p_u * ( box(sum_{w in W_c} l_w) * c
                                    + sum_{w in W_c} (1 - box(l_w)) * box(sum_{v in A_w} l_v) * b_w )

where ``box(x) = exp(x - stop_grad(x))`` (Foerster et al., 2018), ``l_w`` is
the site's log-probability summed down to the cost's own shape, ``A_w`` are
the scored sites upstream of ``w`` and ``b_w`` the site's baseline (Mao et al.,
2019). Each term is averaged over the cost's own entries, summed over
enumeration plates and averaged over sample plates; the terms are summed over
costs. Because the baseline term carries ``box(l_w)`` only through ``1 - box``
(never multiplied by the site's own box a second time) its second derivative
has expectation zero: baselines keep higher derivatives unbiased.
"""

from __future__ import annotations

import torch

from ..errors import StoryError
from ..estimators.base import first_order_only
from .devices import placed_like
from .execute import Execution


def _sum(xs: list) -> torch.Tensor | None:
    if not xs:
        return None
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def _box(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x - x.detach())


def _to_cost_shape(lp: torch.Tensor, r: int, m: int, k: int) -> torch.Tensor:
    """Sum a log-probability (batch rank ``r``) over its trailing own dims down
    to own rank ``k``, then view it at batch rank ``m`` (right-aligned own dims)."""
    own = lp.dim() - r
    if own > k:
        lp = lp.sum(tuple(range(lp.dim() - (own - k), lp.dim())))
        own = k
    if r == m and own == k:
        return lp
    shape = lp.shape
    return lp.reshape(shape[:r] + (1,) * (m - r) + (1,) * (k - own) + shape[r:])


def build(ex: Execution, state: dict, keep: int, stop: int | None = None, first_order: bool = False) -> torch.Tensor:
    """The surrogate: a scalar, or one entry per run when ``keep`` is 1.

    ``stop`` (default ``keep``) is how many leading batch dims stay unreduced:
    ``stop=1`` with ``keep=0`` gives one term per sample (their mean is the
    surrogate), for standard errors.

    ``first_order=True`` (for callers that take first derivatives only, like
    ``Story.run``) builds ``c + sum_w (l_w - stop_grad(l_w)) * (stop_grad(c) - b_w)``
    for stories without enumerated sites: the same value and the same first
    derivative as the DiCE form, with fewer operations.
    """
    stop = keep if stop is None else stop
    total = None
    updates = []
    kinds = ex.kinds

    all_mean = all(kd == "mean" for kd in kinds)

    def reduce(term: torch.Tensor, k: int, upstream: tuple[str, ...]) -> torch.Tensor:
        # average the cost's own entries, then reduce the batch dims
        if all_mean and stop == 0:
            return term.mean()
        if k:
            term = term.mean(tuple(range(term.dim() - k, term.dim())))
        for d in range(term.dim() - 1, stop - 1, -1):
            kd = kinds[d]
            if kd == "sum":
                term = term.sum(d)
            elif kd == "mean" or kd.node not in upstream:
                term = term.mean(d)
            else:  # a plated estimator's variants: the estimator reduces them
                term = kd(term, d)
                if not first_order and not kd.est.higher_order:
                    term = first_order_only(term, kd.est.name)
        return term

    for op, c in ex.costs:
        r = op.fn.rank
        k = c.dim() - r
        scored = []  # (site op, estimator, log-prob in the cost's shape)
        enumerated = []  # (site op, log-probability of the outcome in the cost's shape)
        for name in op.sites:
            site, est, lp = ex.sites[name]
            if est.enumerates:
                enumerated.append((site, _to_cost_shape(lp, site.rank, r, k)))
            elif est.scored:
                scored.append((site, est, _to_cost_shape(lp, site.rank, r, k)))
        weights = _sum([w for _, w in enumerated])
        extra = None  # baseline terms that enumeration plates must not sum over
        if scored:
            baselines = []
            for site, est, lp in scored:
                key = (site.node, op.node)
                st = state.get(key)
                if st is None or st.get("sizes") != ex.sizes[:keep] or not placed_like(st, ex.device, ex.dtype):
                    # baseline state (moving averages) per run, on the run's device in its dtype
                    st = state[key] = {"sizes": ex.sizes[:keep], "run_dims": keep, "device": ex.device, "dtype": ex.dtype}
                dim = site.plate if site.plate is not None and est.n is not None else site.sample_dim
                # the site's learning signal: the cost, summed over the enumerated
                # outcomes that do not come before the site (its expectation over them)
                anc = [w for u, w in enumerated if u.node in site.ancestors]
                rest = [(u, w) for u, w in enumerated if u.node not in site.ancestors]
                signal = c.detach()
                if rest:
                    signal = signal * torch.exp(_sum([w for _, w in rest])).detach()
                    signal = signal.sum(tuple(u.plate for u, _ in rest), keepdim=True)
                try:
                    b = est.baseline(signal, dim, st)
                except StoryError as exc:
                    raise exc.located(site.lineno, site.line) from None
                updates.append((est, signal, dim, st))
                if b is not None:
                    baselines.append((site, lp, b, anc, bool(rest)))
            if first_order and not enumerated:
                term = c
                with_b = {id(site): b for site, _, b, _, _ in baselines}
                for site, _, lp in scored:
                    b = with_b.get(id(site))
                    term = term + (lp - lp.detach()) * (signal if b is None else signal - b)
            elif len(scored) == 1 and len(baselines) == 1 and not enumerated:
                # (1 - box) * b + box * c, written with one product fewer
                b = baselines[0][2]
                term = b + _box(scored[0][2]) * (c - b)
            else:
                term = _box(_sum([lp for _, _, lp in scored])) * c
                for site, lp, b, anc, has_rest in baselines:
                    bt = (1 - _box(lp)) * b
                    up = [lp2 for s2, _, lp2 in scored if s2.node in site.ancestors]
                    if up:
                        bt = bt * _box(_sum(up))
                    if anc:
                        bt = bt * torch.exp(_sum(anc))
                    if has_rest:
                        extra = bt if extra is None else extra + bt
                    else:
                        term = term + bt
        else:
            term = c
        if weights is not None:
            term = term * torch.exp(weights)
        term = reduce(term, k, op.sites)
        if extra is not None:
            term = term + reduce(extra, k, op.sites)
        total = term if total is None else total + term
    for est, signal, dim, st in updates:
        est.update(signal, dim, st)
    return total
