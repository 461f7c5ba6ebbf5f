"""The surrogate's terms for multi-sample objectives (``logmeanexp(EXPR, over=z)``).

A cost that reduces over site ``z``'s K particles is one number per K-tuple:
every particle is credited with all of it (the scored sites' log-probability
is summed over the particles, as over a data plate the cost is outside of,
in ``surrogate.py``). The estimators built for such objectives add their own
terms here; their maths is in :mod:`storch_nb.estimators.multisample`.

* ``vimco``: per particle ``k``, ``(l_k - stop(l_k)) * (C - C_k)`` summed over
  the particles, ``C_k`` the cost line evaluated again (once, vectorized over
  k) with each of ``z``'s reductions at its leave-one-out value.
* ``dreg``: ``sum_k u_k log q(stop(z_k)) - sum_k stop(G_k) z_k`` with zero
  value, ``u_k = a w_k`` and ``G_k = a w_k (1 - w_k) df_k/dz_k`` (one
  backward pass from the reductions' inputs to the draw), ``a`` the cost's
  derivative in the reduction, read from the zero probe the reduction
  carries.
"""

from __future__ import annotations

import torch

from ..errors import EstimatorError
from ..estimators.base import first_order
from ..estimators.multisample import leave_one_out_logmeanexp

__all__ = ["vimco_term", "dreg_term"]


def _outside_reads(op, site, c: torch.Tensor, name: str) -> EstimatorError | None:
    p = site.plate
    if c.dim() > p and c.shape[p] > 1:
        return EstimatorError(
            f"{name}: the cost reads the particles of site `{site.var}` outside logmeanexp(..., over={site.var})",
            hint=f"compute everything that reads `{site.var}` inside the logmeanexp's expression, or use "
            f"score(n=K) / pathwise(n=K) for `{site.var}`")
    return None


def vimco_term(ex, op, c: torch.Tensor, site, lp: torch.Tensor) -> torch.Tensor:
    """VIMCO's score term for one cost; ``lp`` the site's per-particle log-probability
    (joint over its entries and outside data plates), in the cost's shape."""
    err = _outside_reads(op, site, c, "vimco")
    if err is not None:
        raise err.located(op.lineno, op.line, max(op.line.find("logmeanexp"), 0))
    env = dict(ex.cost_inputs[op.node])
    for var, node, dim in op.reductions:
        if node == site.node:
            x = ex.reductions[var][1].detach()
            env[var] = leave_one_out_logmeanexp(x, dim) if x.dim() > dim and x.shape[dim] > 1 else x
    with torch.no_grad():
        base = op.fn(env)
    base = torch.as_tensor(base, dtype=c.dtype, device=c.device)
    return (first_order(lp) * (c.detach() - base)).sum(site.plate, keepdim=True)


def _coefficients(op, c: torch.Tensor, probes: list) -> list:
    """``a``: the cost (its entries averaged) differentiated in each reduction; an
    error where the cost is not linear in it."""
    k = c.dim() - op.fn.rank
    total = (c.mean(tuple(range(c.dim() - k, c.dim()))) if k else c).sum()
    coeffs = torch.autograd.grad(total, probes, retain_graph=True, allow_unused=True, create_graph=True)
    bent = [a for a in coeffs if a is not None and a.requires_grad]
    if bent:
        second = torch.autograd.grad(sum(a.sum() for a in bent), probes, retain_graph=True, allow_unused=True)
        if any(s is not None for s in second):
            raise EstimatorError(
                "dreg needs the cost to be linear in logmeanexp(...) (a number times it, plus terms without it)",
                hint="write the cost as `cost -logmeanexp(EXPR, over=z)`, or use vimco(n=K) or pathwise(n=K)",
            ).located(op.lineno, op.line, max(op.line.find("logmeanexp"), 0))
    return [None if a is None else a.detach() for a in coeffs]


def dreg_term(ex, op, c: torch.Tensor, site, aux, joint) -> torch.Tensor | None:
    """DReG's correction for one cost (zero value); ``joint(t)`` sums a tensor of the
    site's batch shape over its own entries and the dims the cost is outside of,
    in the cost's shape."""
    z, dist = aux
    recs = [ex.reductions[var] for var, node, _ in op.reductions if node == site.node]
    recs = [r for r in recs if r[3] is not None]
    if not recs or not torch.is_grad_enabled():
        return None
    err = _outside_reads(op, site, c, "dreg")
    late = [r for r in recs if any(s > 1 for s in r[1].shape[site.rank:r[0].fn.rank])]
    if err is None and (late or any(s > 1 for s in c.shape[site.rank:op.fn.rank])):
        err = EstimatorError(
            f"dreg: the cost or its logmeanexp reads values drawn or plated after site `{site.var}`",
            hint=f"write the multi-sample objective from values of `{site.var}`'s particle only, or use vimco(n=K)")
    if err is not None:
        raise err.located(op.lineno, op.line, max(op.line.find("logmeanexp"), 0))
    coeffs = _coefficients(op, c, [r[3] for r in recs])
    p = site.plate
    pull, score = [], None
    for (rop, x, _, _), a in zip(recs, coeffs):
        if a is None:
            continue
        w = torch.softmax(x.detach(), p)
        pull.append((a * w * (1 - w) * x).sum())
        u = a * w
        u = u.sum(tuple(range(rop.fn.rank, u.dim()))) if u.dim() > rop.fn.rank else u
        u = u.reshape(u.shape[: site.rank])
        score = u if score is None else score + u
    if score is None:
        return None
    term = score * _joint_own(dist.log_prob(z.detach()), site.rank)
    if z.requires_grad:
        (g,) = torch.autograd.grad(sum(pull), z, retain_graph=True, allow_unused=True)
        if g is not None:
            term = term - _joint_own(g.detach() * z, site.rank)
    return first_order(joint(term))


def _joint_own(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.sum(tuple(range(rank, t.dim()))) if t.dim() > rank else t
