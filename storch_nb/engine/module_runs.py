"""Stories that call ``nn.Module``s with ``runs > 1`` or standard errors: one pass
per run, because a module's weights are not batched per run or per sample.

With ``runs == 1`` and standard errors asked for, the estimate is the mean of
10 independent batches of ``samples / 10`` samples and its standard error
their spread divided by sqrt(10) (batch means).
"""

from __future__ import annotations

import math

import torch

from .cvfit import fit_control_variates, learners
from .diagnose import check_finite
from .leaves import differentiated
from .result import Result, make_result

__all__ = ["estimate_per_run"]


def estimate_per_run(runner, ns, spec, samples: int, runs: int, dev, dt, t0: float, max_outcomes: int) -> Result:
    batches = 10 if runs == 1 and samples >= 20 else 1
    plan = runner.plan(ns, spec, False, False, dev, dt)
    leaves = runner.leaves(plan, ns, dev, dt)
    names, inputs, mod_params = differentiated(plan, leaves)
    fits = spec.learns_cv
    per_run: list[list[torch.Tensor]] = []
    costs = []
    ex = None
    for _ in range(runs * batches):
        total, _, ex = runner.run_pass(plan, leaves, samples // batches, 1, dev, dt, max_outcomes, first_order=True)
        gs = torch.autograd.grad(total, inputs, allow_unused=True, create_graph=fits) if total.requires_grad \
            else [None] * len(inputs)
        if fits:  # learned control variates fit after each pass, as in a plain run
            gs = fit_control_variates(runner.state, learners(ex), gs)
        per_run.append([torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)])
        costs.append(total.detach())
    grads = {n: torch.stack([r[i] for r in per_run]) for i, n in enumerate(names)}
    c = torch.stack(costs)
    err, cost_se = None, None
    if batches > 1:
        err = {k: g.std(0) / math.sqrt(batches) for k, g in grads.items()}
        grads = {k: g.mean(0) for k, g in grads.items()}
        cost_se = c.std().item() / math.sqrt(batches)
    elif runs == 1:
        grads = {k: v[0] for k, v in grads.items()}
    else:
        err = {k: g.std(0) / math.sqrt(runs) for k, g in grads.items()}
        cost_se = c.std().item() / math.sqrt(runs)
    check_finite(c.mean().item(), grads, ex)
    params = {**leaves, **dict(mod_params)} if mod_params else dict(leaves)
    return make_result(ex, grads, c.mean().item(), params, samples, runs, dev, dt, t0, err, cost_se, c)
