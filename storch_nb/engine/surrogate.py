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

from .execute import Execution


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


def build(ex: Execution, state: dict, keep: int) -> torch.Tensor:
    """The surrogate: a scalar, or one entry per run when ``keep`` is 1."""
    total = None
    updates = []
    kinds = ex.kinds
    for op, c in ex.costs:
        r = op.fn.rank
        k = c.dim() - r
        scored = []  # (site op, estimator, log-prob in the cost's shape)
        weights = None
        for name in op.sites:
            site, est, lp = ex.sites[name]
            if est.enumerates:
                w = _to_cost_shape(lp, site.rank, r, k)
                weights = w if weights is None else weights + w
            elif est.scored:
                scored.append((site, est, _to_cost_shape(lp, site.rank, r, k)))
        if scored:
            logp = scored[0][2]
            for _, _, lp in scored[1:]:
                logp = logp + lp
            box = _box(logp)
            signal = c.detach()
            baselines = []
            for site, est, lp in scored:
                key = (site.node, op.node)
                st = state.get(key)
                if st is None or st.get("sizes") != ex.sizes[:keep]:
                    st = state[key] = {"sizes": ex.sizes[:keep], "run_dims": keep}
                dim = site.plate if site.plate is not None and est.n is not None else site.sample_dim
                b = est.baseline(signal, dim, st)
                updates.append((est, signal, dim, st))
                if b is not None:
                    baselines.append((site, lp, b))
            if len(scored) == 1 and baselines:
                # (1 - box) * b + box * c, written with one product fewer
                b = baselines[0][2]
                term = b + box * (c - b)
            else:
                term = box * c
                for site, lp, b in baselines:
                    bt = (1 - _box(lp)) * b
                    anc = [lp2 for s2, _, lp2 in scored if s2.node in site.ancestors]
                    if anc:
                        a = anc[0]
                        for x in anc[1:]:
                            a = a + x
                        bt = bt * _box(a)
                    term = term + bt
        else:
            term = c
        if weights is not None:
            term = term * torch.exp(weights)
        # average the cost's own entries, then reduce the batch dims
        if k:
            term = term.mean(tuple(range(term.dim() - k, term.dim())))
        for d in range(term.dim() - 1, keep - 1, -1):
            term = term.sum(d) if kinds[d] == "sum" else term.mean(d)
        total = term if total is None else total + term
    for est, signal, dim, st in updates:
        est.update(signal, dim, st)
    return total
