"""The DiCE surrogate: one differentiable scalar (per run) whose value is the
cost estimate and whose derivatives of every order are the estimator's.

For each cost ``c`` with scored sites ``W_c`` upstream of it and enumerated
sites ``U_c`` upstream of it::

    term_c = prod_{u in U_c} p_u * ( box(sum_{w in W_c} l_w) * c
                                    + sum_{w in W_c} (1 - box(l_w)) * box(sum_{v in A_w} l_v) * b_w )

where ``box(x) = exp(x - stop_grad(x))`` (Foerster et al., 2018), ``l_w`` is
the site's joint log-probability (summed over all its own entries, and over
the datapoints of every plate that the site is inside and the cost is not),
``A_w`` are the scored sites upstream of ``w`` and ``b_w`` the site's
baseline (Mao et al., 2019). Credit is never guessed from shapes: every
entry of a site is credited with the whole cost, whatever its entries mix;
independence comes only from plates, whose dimension a cost inside keeps
(see ``plates.py``). Each term is averaged over the cost's own entries, then
every batch dimension is reduced by its :class:`~.plates.Plate` (mean over
samples, sum over enumerated outcomes, a plated estimator's own reduction);
the terms are summed over costs. Because the baseline term carries
``box(l_w)`` only through ``1 - box`` (never multiplied by the site's own box
a second time) its second derivative has expectation zero: baselines keep
higher derivatives unbiased.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import StoryError
from ..estimators.base import first_order_only
from .devices import placed_like
from .execute import Execution
from .multisample import dreg_term, vimco_term
from .plates import CostView, Variants, outside_error


def _sum(xs: list) -> torch.Tensor | None:
    if not xs:
        return None
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def _box(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x - x.detach())


def joint_log_prob(lp: torch.Tensor, r: int, m: int, k: int, outside: frozenset[int]) -> torch.Tensor:
    """A site's log-probability (batch rank ``r``) summed over all its own entries
    and over the plate dims in ``outside``, viewed against a cost of batch rank
    ``m`` and own rank ``k``."""
    if lp.dim() > r:
        lp = lp.sum(tuple(range(r, lp.dim())))
    for d in outside:
        if lp.shape[d] > 1:
            lp = lp.sum(d, keepdim=True)
    pad = m - r + k
    return lp.reshape(lp.shape + (1,) * pad) if pad else lp


@dataclass
class _Parts:
    """What the sites upstream of one cost contribute to its term."""

    scored: list = field(default_factory=list)  # (site op, estimator, joint log-prob in the cost's shape)
    multi: list = field(default_factory=list)  # vimco/dreg sites whose particles the cost reduces: (site, est, term)
    enumerated: list = field(default_factory=list)  # (site op, log-probability of the outcome in the cost's shape)
    baselines: list = field(default_factory=list)  # (site op, log-prob, baseline, enumerated ancestors, has rest)


def _parts(ex: Execution, op, c: torch.Tensor) -> _Parts:
    r, k = op.fn.rank, c.dim() - op.fn.rank
    parts = _Parts()
    for name in op.sites:
        site, est, lp = ex.sites[name]
        outside = site.plates - op.plates
        if op.reduced:  # a logmeanexp over particles: each one is credited with the whole cost
            outside = outside | {d for d in op.reduced if d < site.rank}
            if est.multi_sample and site.plate in op.reduced:
                parts.multi.append((site, est, _multi_term(ex, op, c, site, est, lp, outside)))
                continue
        if est.enumerates:
            if outside:
                raise outside_error(site.node, est.name, op.lineno).located(op.lineno, op.line)
            parts.enumerated.append((site, joint_log_prob(lp, site.rank, r, k, frozenset())))
        elif est.scored:
            parts.scored.append((site, est, joint_log_prob(lp, site.rank, r, k, outside)))
    return parts


def _multi_term(ex: Execution, op, c: torch.Tensor, site, est, aux, outside: frozenset[int]) -> torch.Tensor | None:
    r, k = op.fn.rank, c.dim() - op.fn.rank
    if est.scored:
        lp = joint_log_prob(aux, site.rank, r, k, frozenset(outside - {site.plate}))
        return vimco_term(ex, op, c, site, lp)
    return dreg_term(ex, op, c, site, aux, lambda t: joint_log_prob(t, site.rank, r, k, frozenset(outside)))


def _baseline_state(state: dict, site, op, ex: Execution, keep: int) -> dict:
    """Baseline state (moving averages) per site, cost and run, on the run's device in its dtype."""
    key = (site.node, op.node)
    st = state.get(key)
    if st is None or st.get("sizes") != ex.sizes[:keep] or not placed_like(st, ex.device, ex.dtype):
        st = state[key] = {"sizes": ex.sizes[:keep], "run_dims": keep, "device": ex.device, "dtype": ex.dtype}
    return st


def _signal(ex: Execution, op, c: torch.Tensor, site, enumerated: list) -> tuple[torch.Tensor, list, bool]:
    """The site's learning signal: the cost, summed over the enumerated outcomes
    that do not come before the site (its expectation over them); where a plated
    site downstream of it evaluates variants, reduced to its value over every
    batch dim that came after the site (a variant's weight may depend on this
    site's draw: a baseline taken per variant would then not be independent of
    it); the enumerated ancestors' weights; whether any outcome was summed."""
    anc = [w for u, w in enumerated if u.node in site.ancestors]
    rest = [(u, w) for u, w in enumerated if u.node not in site.ancestors]
    signal = c.detach()
    if rest:
        signal = signal * torch.exp(_sum([w for _, w in rest])).detach()
        signal = signal.sum(tuple(u.plate for u, _ in rest), keepdim=True)
    r, k = op.fn.rank, c.dim() - op.fn.rank
    later = range(r - 1, site.rank - 1, -1)  # the batch dims made after the site (its own kept)
    if not any(isinstance(ex.plates[d], Variants) and signal.shape[d] > 1 for d in later if d < len(ex.plates)):
        return signal, anc, bool(rest)
    value = signal.mean(tuple(range(r, signal.dim()))) if k else signal  # a reduction sees the entries averaged
    for d in later:  # the last first, as the surrogate reduces them (a plate sees the later dims gone)
        value = ex.plates[d].value(value, d, op.site_set)
    return value.reshape(value.shape + (1,) * (r - site.rank + k)), anc, bool(rest)


def _add_baselines(ex: Execution, op, c, parts: _Parts, state: dict, keep: int, updates: list) -> list:
    """Each scored site's baseline (recorded in ``parts``) and learning signal (returned)."""
    signals = []
    for site, est, lp in parts.scored:
        st = _baseline_state(state, site, op, ex, keep)
        own = site.plate is not None and est.n is not None and site.plate not in op.reduced
        dim = site.plate if own else site.sample_dim  # a logmeanexp over the particles: the story's samples
        signal, anc, has_rest = _signal(ex, op, c, site, parts.enumerated)
        try:
            b = est.baseline(signal, dim, st)
        except StoryError as exc:
            raise exc.located(site.lineno, site.line) from None
        updates.append((est, signal, dim, st))
        signals.append(signal)
        if b is not None:
            parts.baselines.append((site, lp, b, anc, has_rest))
    return signals


def _scored_term(c, parts: _Parts, signals: list, first_order: bool):
    """The cost with its scored sites' boxes and baselines: (term, baseline terms that
    enumeration plates must not sum over, or None)."""
    if first_order and not parts.enumerated:
        # c + sum_w (l_w - stop_grad(l_w)) * (stop_grad(c) - b_w): the DiCE form's value and first derivative
        term = c
        with_b = {id(site): b for site, _, b, _, _ in parts.baselines}
        for (site, _, lp), signal in zip(parts.scored, signals):
            b = with_b.get(id(site))
            term = term + (lp - lp.detach()) * (signal if b is None else signal - b)
        return term, None
    if len(parts.scored) == 1 and len(parts.baselines) == 1 and not parts.enumerated:
        b = parts.baselines[0][2]  # (1 - box) * b + box * c, with one product fewer
        return b + _box(parts.scored[0][2]) * (c - b), None
    term = _box(_sum([lp for _, _, lp in parts.scored])) * c
    extra = None
    for site, lp, b, anc, has_rest in parts.baselines:
        bt = (1 - _box(lp)) * b
        up = [lp2 for s2, _, lp2 in parts.scored if s2.node in site.ancestors]
        if up:
            bt = bt * _box(_sum(up))
        if anc:
            bt = bt * torch.exp(_sum(anc))
        if has_rest:
            extra = bt if extra is None else extra + bt
        else:
            term = term + bt
    return term, extra


def _reduce(term: torch.Tensor, k: int, ex: Execution, view, stop: int, averaging: bool) -> torch.Tensor:
    """Average the cost's own ``k`` entries, then reduce the batch dims after ``stop``
    (``view()`` makes the :class:`CostView` the plates need)."""
    if averaging and stop == 0:
        return term.mean()
    view = view()
    if k:
        term = term.mean(tuple(range(term.dim() - k, term.dim())))
    for d in range(term.dim() - 1, stop - 1, -1):
        term = ex.plates[d].reduce(term, d, view)
    return term


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
    updates: list = []
    sizes = tuple(ex.sizes)
    averaging = all(p.averages for p in ex.plates)
    for op, c in ex.costs:
        k = c.dim() - op.fn.rank
        parts = _parts(ex, op, c)
        extra = None
        if parts.scored:
            signals = _add_baselines(ex, op, c, parts, state, keep, updates)
            term, extra = _scored_term(c, parts, signals, first_order)
        else:
            term = c
        for _, est, extra_term in parts.multi:
            if extra_term is not None:
                term = term + (extra_term if first_order else first_order_only(extra_term, est.name, ex.guard))
        if parts.enumerated:
            term = term * torch.exp(_sum([w for _, w in parts.enumerated]))
        def view(op=op) -> CostView:
            return CostView(op.node, op.lineno, op.line, op.site_set, op.plates, sizes, first_order, ex.guard)

        term = _reduce(term, k, ex, view, stop, averaging)
        if extra is not None:
            term = term + _reduce(extra, k, ex, view, stop, averaging)
        total = term if total is None else total + term
    for est, signal, dim, st in updates:
        est.update(signal, dim, st)
    return total
