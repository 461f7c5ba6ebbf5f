"""One estimate of a story: the runner behind ``Story``.

A :class:`Runner` holds what a story keeps between calls: its plans (one per
setting), its own ``param(...)`` leaves and its estimators' state (moving
averages, learned control variates). :meth:`Runner.estimate` is one call of
``Story.run``: plan, leaves, one vectorized pass (or chunks of samples in
bounded memory, or one pass per run for stories that call ``nn.Module``s),
the gradients, a fit of learned control variates, standard errors, the
:class:`~.result.Result`. Arguments arrive checked (``storch_nb.settings``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import EstimatorError, StoryError
from ..graph import Graph
from ..settings import EstimatorSpec
from ..story.statements import Program
from ..story.walk import free_names
from . import compiled, memory
from . import surrogate as _surrogate
from .cvfit import fit_control_variates, fit_on_pass, learners
from .diagnose import check_finite, read_checked
from .execute import execute
from .helpers import BUILTINS, HELPERS
from .leaves import differentiated
from .leaves import leaves as make_leaves
from .plan import Plan, Planner
from .result import Result, make_result
from .rng import Seeded

__all__ = ["Runner"]

_MISSING = object()


class Runner:
    """Plans, parameters and estimator state of one story, and its estimates."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.free = tuple(sorted(free_names(program.statements)))
        self.plans: dict[tuple, Plan] = {}
        self.state: dict = {}  # estimator state: baselines, control variates
        self.params: dict[str, torch.Tensor] = {}  # the story's own param(...) leaves
        self.last_plan: Plan | None = None
        #: a training loop's cache (module checks and parameter lists per plan), None outside one
        self.steady: dict | None = None

    def reset(self) -> None:
        """Estimator state cleared, the story's own parameters back to their ``param(...)``."""
        self.state.clear()
        self.params.clear()

    # ---------------------------------------------------------------- plans
    def plan(self, ns: Mapping[str, Any], spec: EstimatorSpec, run_dim: bool, batched: bool, device, dtype,
             tolerant: bool = False, override: str | None = None) -> Plan:
        """The plan for these settings (cached by the namespace values the story reads)."""
        key = (id(ns), tuple(id(ns.get(n, _MISSING)) for n in self.free), spec.key, run_dim, batched, device, dtype,
               tolerant, override)
        plan = self.plans.get(key)
        if plan is None:
            if tolerant:  # every outside name an input: the graph before any run
                ns = {n: torch.zeros(()) for n in self.free if n not in ns and n not in HELPERS and n not in BUILTINS}
            plan = Planner(self.program, ns, dict(spec.per_site), spec.default, run_dim, batched, override).build()
            if len(self.plans) > 32:
                self.plans.clear()
            self.plans[key] = plan
        if not tolerant:
            self.last_plan = plan
        return plan

    @property
    def graph(self) -> Graph:
        """The graph of the last run; before any run, with every outside name an input."""
        if self.last_plan is not None:
            return self.last_plan.graph
        return self.plan({}, EstimatorSpec(), False, False, torch.device("cpu"), torch.float32, tolerant=True).graph

    def leaves(self, plan: Plan, ns: Mapping[str, Any], device, dtype) -> dict[str, torch.Tensor]:
        return make_leaves(plan, self.params, ns, device, dtype, self.steady)

    # ------------------------------------------------------------ one pass
    def run_pass(self, plan: Plan, leaves: dict[str, torch.Tensor], samples: int, runs: int, device, dtype,
                 max_outcomes: int = 10**6, per_sample: bool = False, first_order: bool = False):
        """One vectorized pass: (surrogate per run, leaves as used, the execution)."""
        used = leaves
        if plan.batched_params:
            n = runs if plan.run_dim else samples
            used = {k: v.detach().unsqueeze(0).expand((n,) + v.shape).clone().requires_grad_(True)
                    for k, v in leaves.items()}
        sizes = [runs, samples] if plan.run_dim else [samples]
        ex = execute(plan, dict(used), sizes, dtype, device, validate=not plan.validated, max_outcomes=max_outcomes,
                     state=self.state)
        keep = 1 if plan.run_dim else 0
        total = _surrogate.build(ex, self.state, keep, stop=keep + 1 if per_sample else keep, first_order=first_order)
        plan.validated = True
        return total, used, ex

    # ------------------------------------------------------------ estimates
    def estimate(self, samples: int, spec: EstimatorSpec, seed: int | None, device, runs: int, ns, dtype,
                 stderr: bool = False, max_outcomes: int = 10**6, max_memory: float | None = None,
                 compile: bool = False) -> Result:
        """``Story.run``: the gradient estimate of ``samples`` samples, ``runs`` times
        (``compile``: the pass compiled, see :mod:`.compiled`)."""
        t0 = time.perf_counter()
        run_dim = runs > 1
        # learned control variates (RELAX, REBAR, LAX) fit on per-sample gradients where they can
        fit_cv = not run_dim and samples > 1 and spec.learns_cv
        with Seeded(seed, device):
            plan = self.plan(ns, spec, run_dim, run_dim or stderr or fit_cv, device, dtype)
            if plan.modules and (run_dim or stderr):
                from .module_runs import estimate_per_run

                if compile:
                    compiled.note_eager(self, "a story that calls modules runs one pass per run")
                return estimate_per_run(self, ns, spec, samples, runs, device, dtype, t0, max_outcomes)
            if plan.modules and fit_cv:  # module weights are not batched per sample
                fit_cv = False
                plan = self.plan(ns, spec, run_dim, False, device, dtype)
            leaves = self.leaves(plan, ns, device, dtype)
            chunk = memory.chunk_size(self, plan, leaves, samples, runs, device, dtype, max_outcomes, max_memory)
            if chunk < samples:
                if compile:
                    compiled.note_eager(self, "a run split into chunks of samples (memory) is not compiled")
                return self._chunked(chunk, samples, spec, device, runs, ns, dtype, stderr, max_outcomes, t0)
            per_sample = (stderr or fit_cv) and not run_dim
            try:
                got = compiled.run_pass(self, plan, leaves, samples, runs, device, dtype, max_outcomes,
                                        per_sample) if compile else None
                total, used, ex = (got.total, got.used, got.ex) if got is not None else \
                    self.run_pass(plan, leaves, samples, runs, device, dtype, max_outcomes, per_sample, True)
            except torch.cuda.OutOfMemoryError:
                if samples < 2:
                    raise
                torch.cuda.empty_cache()
                memory.refuse_unless_chunkable(self, plan, leaves, samples, runs, device, dtype, max_outcomes)
                return self._chunked(max(1, samples // 4), samples, spec, device, runs, ns, dtype, stderr,
                                     max_outcomes, t0)
            res = self._result(plan, ex, total, used, leaves, samples, runs, device, dtype, per_sample, stderr, t0)
            if got is not None:
                res.compile_seconds = got.seconds
            return res

    def _gradients(self, plan: Plan, ex, total: torch.Tensor, used: dict) -> tuple[dict, list]:
        """The gradient of the pass (per run or per sample where ``total`` has entries), after
        one fit of the learned control variates; and the modules' parameters."""
        names, inputs, mod_params = differentiated(plan, used, self.steady)
        trainable = learners(ex)
        if inputs and total.requires_grad:
            gs = torch.autograd.grad(total if total.dim() == 0 else total.sum(), inputs, allow_unused=True,
                                     create_graph=bool(trainable))
        else:
            gs = [None] * len(inputs)
        if trainable:
            gs = fit_control_variates(self.state, trainable, gs)
        grads = {name: torch.zeros_like(x) if g is None else g for name, g, x in zip(names, gs, inputs)}
        return grads, mod_params

    def _result(self, plan, ex, total, used, leaves, samples, runs, device, dtype, per_sample, stderr, t0) -> Result:
        cost_se = None
        if per_sample:
            terms = total.detach()
            total = total.mean() if total.dim() else total
            if stderr and terms.dim() and samples > 1:
                cost_se = (terms.expand(samples).std() / math.sqrt(samples)).item()
        grads, mod_params = self._gradients(plan, ex, total, used)
        err = None
        if per_sample:
            # per-sample contributions g_i (their sum is the estimate): SE = sqrt(S) * std(g_i).
            # With leave-one-out or batch-average baselines this is the first-order (delta
            # method) standard error: it understates the error where that first-order term
            # vanishes (the Bernoulli toy at p = 1/2) and at a handful of samples; runs > 1
            # gives the exact spread.
            if stderr:
                err = {k: math.sqrt(samples) * g.std(0, unbiased=True) if samples > 1
                       else torch.full_like(g[0], float("nan")) for k, g in grads.items()}
            grads = {k: g.sum(0) for k, g in grads.items()}
        elif runs > 1:
            err = {k: g.std(0, unbiased=True) / math.sqrt(runs) for k, g in grads.items()}
        costs = total.detach()
        if runs > 1:  # one read of the device for the cost, its spread and the gradients' finiteness
            (cost, spread), grads_ok = read_checked([costs.mean(), costs.std()], grads, device.type == "cpu")
            cost_se = spread / math.sqrt(runs)
        else:
            (cost,), grads_ok = read_checked([costs], grads, device.type == "cpu")
        check_finite(cost, grads, ex, grads_ok)
        params = {**leaves, **dict(mod_params)} if mod_params else dict(leaves)
        return make_result(ex, grads, cost, params, samples, runs, device, dtype, t0, err, cost_se, costs)

    def _chunked(self, chunk, samples, spec, device, runs, ns, dtype, stderr, max_outcomes, t0) -> Result:
        """The estimate from chunks of samples, each an independent estimate of the
        same estimator, combined with weights ``chunk / samples``."""
        parts: list[tuple[float, Result]] = []
        done = 0
        while done < samples:
            n = min(chunk, samples - done)
            res = self.estimate(n, spec, None, device, runs, ns, dtype, stderr, max_outcomes, float("inf"))
            parts.append((n / samples, res))
            done += n
        return memory.merge_chunks(parts, samples, runs, stderr, dtype, time.perf_counter() - t0)

    def surrogate(self, samples: int, spec: EstimatorSpec, seed, ns, device, dtype, compile: bool = False) -> torch.Tensor:
        """``Story.surrogate``: a scalar whose gradient is the estimator's; learned control
        variates are fitted on its draws (the surrogate keeps the coefficients it was made with)."""
        with Seeded(seed, device):
            plan = self.plan(ns, spec, False, False, device, dtype)
            leaves = self.leaves(plan, ns, device, dtype)
            got = compiled.run_pass(self, plan, leaves, samples, 1, device, dtype) if compile else None
            if got is not None:
                return got.total
            total, used, ex = self.run_pass(plan, leaves, samples, 1, device, dtype)
            fit_on_pass(self.state, ex, differentiated(plan, used)[1], total)
        return total

    def exact(self, ns, max_outcomes: int, device, dtype) -> Result:
        """``Story.exact``: every site enumerated."""
        t0 = time.perf_counter()
        try:
            plan = self.plan(ns, EstimatorSpec("enumerate"), False, False, device, dtype, override="enumerate")
            leaves = self.leaves(plan, ns, device, dtype)
            total, used, ex = self.run_pass(plan, leaves, 1, 1, device, dtype, max_outcomes)
        except EstimatorError as exc:
            raise _exact_error(exc) from None
        grads, mod_params = self._gradients(plan, ex, total, used)  # no learned control variate: enumerated
        check_finite(total.item(), grads, ex)
        return make_result(ex, grads, total.item(), {**leaves, **dict(mod_params)}, 1, 1, device, dtype, t0,
                           {k: torch.zeros_like(v) for k, v in grads.items()}, exact=True)


def _exact_error(exc: EstimatorError) -> StoryError:
    """Enumeration refused a site: say it as ``exact()``'s problem."""
    unfit = getattr(exc, "unfit", None)
    if unfit is None:  # enumeration cannot credit a cost outside a plate
        return StoryError(f"exact() cannot sum this story: {exc.message}", lineno=exc.lineno, line=exc.line,
                          col=exc.col, hint="compute that cost inside the plate, one datapoint's part of it")
    site, dist, _ = unfit
    return StoryError(
        f"exact() needs every site to have a finite support, but site `{site}` ({dist}) has none",
        lineno=exc.lineno,
        line=exc.line,
        hint="exact() works for discrete stories (Bernoulli, Categorical, ...); use run() for continuous ones",
    )
