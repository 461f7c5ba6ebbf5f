"""Runs in bounded memory: the memory a pass needs per sample (measured once per
plan by a small probe pass), and the estimate from chunks of samples where a
whole pass would not fit.

Chunks are independent estimates of the same estimator, combined with weights
``chunk / samples``. Estimators that compare samples with each other
(leave-one-out, batch-average and moving-average baselines without ``n``,
learned control variates) cannot be split: such a run is refused before it
allocates, with the memory it would need.
"""

from __future__ import annotations

import math

import torch

from ..errors import StoryError
from .result import Result

__all__ = ["CHUNK_CHECK", "chunk_size", "refuse_unless_chunkable", "merge_chunks"]

#: samples x runs from which a run's memory is estimated first
CHUNK_CHECK = 1 << 22
_PROBE_SAMPLES = 256
#: bytes a run may take without checking the device's free memory
_SURELY_FITS = 256 * 2**20


def default_budget(dev: torch.device) -> float:
    """2 GiB on the CPU; half the free memory on a GPU."""
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free / 2
    return float(2 << 30)


def coupled(ex) -> list[str]:
    """The sites whose estimators compare samples with each other (not chunkable)."""
    return [
        f"{node} ({est.text()})"
        for node, (_, est, _) in ex.sites.items()
        if est.trainable or (est.scored and est.n is None and est.opts.get("baseline") not in (None,))
    ]


def _refuse_if_coupled(found: list[str], need: float, budget: float, samples: int) -> None:
    if found:
        raise StoryError(
            f"{samples:,} samples would need about {need / 2**30:.1f} GiB, over the budget of {budget / 2**30:.1f} GiB, "
            f"and the run cannot be split into chunks because {', '.join(found)} compare samples with each other",
            hint="use fewer samples (or runs > 1 with fewer samples each), the option n=K for the baseline, "
            "or raise max_memory",
        )


def probe(runner, plan, leaves, runs, dev, dt, max_outcomes) -> tuple[float, list[str]]:
    """Bytes per sample of a pass (its tensors, times 3 for what autograd keeps
    and the backward pass), from a small pass that leaves the RNG and the
    estimator state as they were, and the sites whose estimators compare
    samples; measured once per plan, runs, device, dtype and leaf shapes."""
    key = (runs, str(dev), dt, tuple((k, tuple(v.shape)) for k, v in leaves.items()))
    found = plan.probes.get(key)
    if found is None:
        found = plan.probes[key] = _measure(runner, plan, leaves, runs, dev, dt, max_outcomes)
    return found


def _measure(runner, plan, leaves, runs, dev, dt, max_outcomes) -> tuple[float, list[str]]:
    n = _PROBE_SAMPLES
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in runner.state.items()}
    try:
        total, _, ex = runner.run_pass(plan, leaves, n, runs, dev, dt, max_outcomes, False, True)
        seen: set[int] = set()
        size = 0
        tensors = list(ex.env.values()) + [v for _, v in ex.costs] + [rec[2] for rec in ex.sites.values()]
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                size += t.numel() * t.element_size()
        del total
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, dev)
        runner.state.clear()
        runner.state.update(saved)
    return 3.0 * size / n, coupled(ex)


def chunk_size(runner, plan, leaves, samples, runs, dev, dt, max_outcomes, max_memory) -> int:
    """How many samples one pass may take (``samples`` where the whole run fits)."""
    if samples < 2 or (samples * runs < CHUNK_CHECK and max_memory is None):
        return samples
    per_sample, found = probe(runner, plan, leaves, runs, dev, dt, max_outcomes)
    if max_memory is None and per_sample * samples <= _SURELY_FITS:
        return samples  # no need to ask the device how much memory is free (a driver call)
    budget = max_memory if max_memory is not None else default_budget(dev)
    if per_sample * samples <= budget:
        return samples
    _refuse_if_coupled(found, per_sample * samples, budget, samples)
    return max(1, int(budget // per_sample))


def refuse_unless_chunkable(runner, plan, leaves, samples, runs, dev, dt, max_outcomes) -> None:
    """After an out-of-memory error: refuse a run whose estimators compare samples."""
    per_sample, found = probe(runner, plan, leaves, runs, dev, dt, max_outcomes)
    _refuse_if_coupled(found, per_sample * samples, default_budget(dev), samples)


def merge_chunks(parts: list[tuple[float, Result]], samples: int, runs: int, stderr: bool, dt, seconds: float) -> Result:
    """One estimate from independent chunk estimates ``(weight, result)``."""
    first = parts[0][1]
    grads = {k: sum(w * r.grads[k] for w, r in parts) for k in first.grads}
    err = None
    if runs > 1:
        err = {k: g.std(0, unbiased=True) / math.sqrt(runs) for k, g in grads.items()}
    elif stderr and all(r.stderr is not None for _, r in parts):
        err = {k: torch.sqrt(sum((w * r.stderr[k]) ** 2 for w, r in parts)) for k in first.grads}
    costs = sum(w * r.costs for w, r in parts)
    cost_se = None
    if all(r.cost_stderr is not None for _, r in parts):
        cost_se = math.sqrt(sum((w * r.cost_stderr) ** 2 for w, r in parts))
    return Result(grads=grads, cost=float(costs.mean()), params=first.params, estimators=first.estimators,
                  samples=samples, runs=runs, device=first.device, seconds=seconds, dtype=dt, stderr=err,
                  cost_stderr=cost_se, costs=costs)
