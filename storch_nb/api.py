"""The Python API: :class:`Story`."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from .engine import surrogate as _surrogate
from .engine.devices import on_device, same_device
from .engine.diagnose import check_finite, read_checked
from .engine.execute import execute
from .engine.plan import Plan, Planner
from .engine.result import Comparison, Result
from .engine.rng import Seeded
from .errors import EstimatorError, StoryError
from .estimators import make_estimator, parse_spec
from .graph import Graph
from .story.parse import parse
from .story.walk import free_names

__all__ = ["Story"]

_MISSING = object()
_EMPTY: dict = {}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float": torch.float32, "double": torch.float64,
           "float16": torch.float16, "bfloat16": torch.bfloat16, "half": torch.float16}  # fmt: skip


def _dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise StoryError(f"dtype must be a floating point type, not {dtype}", hint="use float32 or float64")
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise StoryError(f"unknown dtype {dtype!r}", hint="use float32 or float64")


_DEVICES: dict = {}


def _device(device: Any) -> torch.device:
    dev = _DEVICES.get(device) if isinstance(device, (str, torch.device)) else None
    if dev is None:
        dev = _resolve_device(device)
        if isinstance(device, (str, torch.device)) and device != "auto":
            _DEVICES[device] = dev
    return dev


def _resolve_device(device: Any) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise StoryError(f"unknown device {device!r}", hint="use 'cpu', 'cuda' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StoryError("device 'cuda' was asked for but no CUDA GPU is available", hint="use device='cpu' or 'auto'")
    return dev


#: samples x runs above this cannot be indexed by torch (int64) nor finished in a lifetime
MAX_DRAWS = 2**53


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StoryError(f"{name} must be a positive int, not {value!r}", hint=f"give e.g. {name}=1000")
    if value > MAX_DRAWS:
        raise StoryError(f"{name}={value:,} is more than can ever be run (at most 2**53)",
                         hint=f"use a smaller {name}; runs=R with fewer samples each shows the spread")
    return value


def _namespace(namespace: Any) -> Mapping[str, Any]:
    if namespace is None:
        return _EMPTY
    if not isinstance(namespace, Mapping):
        raise StoryError(f"namespace must be a mapping (a dict) from name to value, not {type(namespace).__name__}",
                         hint="pass e.g. namespace=globals() or namespace={'w': w}")
    return namespace


class Story:
    """A generative story: parsed once, then run with any estimator.

    >>> story = Story('''
    ... c = param(0.5)
    ... e ~ Normal(c, 1)
    ... cost e**2
    ... ''')
    >>> res = story.run(samples=1000, seed=0)
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.program = parse(text)
        self._free = tuple(sorted(free_names(self.program.statements)))
        self._plans: dict[tuple, Plan] = {}
        self._state: dict = {}
        self._params: dict[str, torch.Tensor] = {}
        self._last_plan: Plan | None = None

    def __repr__(self) -> str:
        return f"Story({len(self.program.lines)} lines)"

    # ------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to the just-parsed state: estimator state (moving averages) and
        the story's own parameters (re-initialised from their ``param(...)``)."""
        self._state.clear()
        self._params.clear()

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The story's own ``param(...)`` leaves, once a run has created them."""
        return dict(self._params)

    def parameters(self) -> list[torch.Tensor]:
        """The story's own parameter tensors (for an optimizer)."""
        return list(self._params.values())

    @property
    def graph(self) -> Graph:
        """The graph of the last run (loops unrolled); before any run, the graph
        with every outside name treated as an input."""
        if self._last_plan is not None:
            return self._last_plan.graph
        return self._plan({}, "auto", {}, False, False, torch.device("cpu"), torch.float32, tolerant=True).graph

    # ------------------------------------------------------------- plans
    def _plan(self, ns, default, per_site, run_dim, batched, device, dtype, tolerant=False, override=None) -> Plan:
        key = (
            id(ns),
            tuple(id(ns.get(n, _MISSING)) for n in self._free),
            default,
            tuple(sorted(per_site.items())),
            run_dim,
            batched,
            device,
            dtype,
            tolerant,
            override,
        )
        plan = self._plans.get(key)
        if plan is None:
            if tolerant:
                ns = {n: torch.zeros(()) for n in self._free if n not in ns and not _is_known(n)}
            plan = Planner(self.program, ns, per_site, default, run_dim, batched, override).build()
            if len(self._plans) > 32:
                self._plans.clear()
            self._plans[key] = plan
        if not tolerant:
            self._last_plan = plan
        return plan

    def _leaves(self, plan: Plan, ns, device, dtype) -> dict[str, torch.Tensor]:
        """The parameter tensors a run differentiates: name -> tensor as used.

        The story's own parameters live on the run's device in its dtype. A
        namespace tensor there in that dtype is used itself; one elsewhere (or a
        float tensor of another dtype) through a differentiable copy
        ``t.to(device, dtype)``, made afresh each run: the run's gradients are
        the copy's (``train`` puts them on the tensor's own device and dtype) and
        ``backward()`` through a surrogate reaches the user's tensor, which is
        never moved. ``nn.Module``s are not moved either (that would change the
        user's module): one that is not on the run's device is refused."""
        for mname, mod in plan.modules.items():
            for t in (*mod.parameters(), *mod.buffers()):
                if not same_device(t.device, device):
                    where = device.type if device.index is None else str(device)
                    raise StoryError(
                        f"module `{mname}` has tensors on {t.device}, but the story runs on {where}",
                        hint=f"move the module there first with `{mname}.to('{where}')`, "
                        f"or run with device='{t.device}'",
                    )
        out = {}
        for var, ref in plan.params.items():
            if ref.source == "story":
                leaf = self._params.get(var)
                if leaf is None or not same_device(leaf.device, device) or leaf.dtype != dtype:
                    if leaf is not None:
                        value = leaf.detach()
                    else:
                        with on_device(device):  # param(torch.zeros(3)) made on the run's device
                            value = _eval_param(ref, ns, dtype)
                    leaf = value.to(device=device, dtype=dtype).detach().requires_grad_(True)
                    self._params[var] = leaf
                out[var] = leaf
            else:
                t = ref.value
                want = dtype if t.is_floating_point() else t.dtype
                if not same_device(t.device, device) or t.dtype != want:
                    t = t.to(device=device, dtype=want)  # differentiable: gradients reach the user's tensor
                out[var] = t
        return out

    @staticmethod
    def _estimator_spec(estimator: Any) -> tuple[str, dict[str, str]]:
        if estimator is None:
            return "auto", _EMPTY
        if isinstance(estimator, str):
            parse_spec(estimator)  # validate now, with a clear error
            return estimator, _EMPTY
        if isinstance(estimator, Mapping):
            per = {}
            for k, v in estimator.items():
                if not isinstance(v, str):
                    raise EstimatorError(f"the estimator for site {k!r} must be text, not {type(v).__name__}",
                                         hint="e.g. estimator={'e': 'pathwise', 'b': 'score(baseline=\"rloo\")'}")
                parse_spec(v)
                per[str(k)] = v
            return per.pop("*", "auto") if "*" in per else "auto", per
        raise EstimatorError(
            f"estimator must be text or a mapping from site name to text, not {type(estimator).__name__}",
            hint="e.g. estimator='score(baseline=\"rloo\")' or estimator={'e': 'pathwise'}",
        )

    # --------------------------------------------------------------- core
    def _pass(
        self,
        plan: Plan,
        leaves: dict[str, torch.Tensor],
        samples: int,
        runs: int,
        device,
        dtype,
        max_outcomes: int = 10**6,
        per_sample: bool = False,
        first_order: bool = False,
    ):
        """One vectorized pass: returns (surrogate per run, leaves as used)."""
        used = leaves
        if plan.batched_params:
            n = runs if plan.run_dim else samples
            used = {k: v.detach().unsqueeze(0).expand((n,) + v.shape).clone().requires_grad_(True) for k, v in leaves.items()}
        env = dict(used)
        sizes = [runs, samples] if plan.run_dim else [samples]
        ex = execute(plan, env, sizes, dtype, device, validate=not plan.validated, max_outcomes=max_outcomes,
                     state=self._state)
        keep = 1 if plan.run_dim else 0
        total = _surrogate.build(ex, self._state, keep, stop=keep + 1 if per_sample else keep, first_order=first_order)
        plan.validated = True
        return total, used, ex

    def run(
        self,
        samples: int = 1000,
        estimator: str | Mapping[str, str] | None = "auto",
        seed: int | None = None,
        device: str | torch.device | None = "cpu",
        runs: int = 1,
        namespace: Mapping[str, Any] | None = None,
        dtype: torch.dtype | str | None = None,
        stderr: bool = False,
        max_outcomes: int = 10**6,
        max_memory: float | None = None,
    ) -> Result:
        """Estimate the gradient of the expected cost.

        ``runs=R`` repeats the whole estimate R times independently, in one
        vectorized pass, and ``grads`` then has a leading dimension R.
        ``stderr=True`` also gives the standard error of each gradient
        estimate. ``seed`` makes the run reproducible and leaves torch's
        global generator as it was.

        Sample counts whose tensors would not fit in ``max_memory`` bytes
        (default: 2 GiB on the CPU, half the free memory on a GPU) run in
        chunks of samples whose estimates are combined with weights
        ``chunk / samples`` (the same estimator, in bounded memory); where an
        estimator compares samples with each other (leave-one-out,
        batch-average or moving-average baselines without ``n``, learned
        control variates) the run is refused before allocating, with the memory
        it would need.
        """
        t0 = time.perf_counter()
        samples = _positive_int("samples", samples)
        runs = _positive_int("runs", runs)
        _positive_int("samples x runs", samples * runs)
        if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, (int, float))
                                       or not max_memory > 0):
            raise StoryError(f"max_memory must be a positive number of bytes, not {max_memory!r}",
                             hint="e.g. max_memory=4 * 2**30 for 4 GiB, or None for the default budget")
        dev = _device(device)
        dt = _dtype(dtype)
        ns = _namespace(namespace)
        default, per_site = self._estimator_spec(estimator)
        run_dim = runs > 1
        # learned control variates (RELAX, REBAR, LAX) fit on per-sample gradients where they can
        fit_cv = not run_dim and samples > 1 and _learns_cv(default, per_site)
        with Seeded(seed, dev):
            probe = self._plan(ns, default, per_site, run_dim, run_dim or stderr or fit_cv, dev, dt)
            if probe.modules and (run_dim or stderr):
                return self._run_modules(ns, default, per_site, samples, runs, dev, dt, t0, max_outcomes)
            if probe.modules and fit_cv:  # module weights are not batched per sample
                fit_cv = False
                probe = self._plan(ns, default, per_site, run_dim, False, dev, dt)
            leaves = self._leaves(probe, ns, dev, dt)
            if (samples * runs >= _CHUNK_CHECK or max_memory is not None) and samples > 1:
                chunk = self._chunk_size(probe, leaves, samples, runs, dev, dt, max_outcomes, max_memory)
                if chunk < samples:
                    return self._run_chunked(chunk, samples, estimator, dev, runs, ns, dt, stderr, max_outcomes, t0)
            per_sample = (stderr or fit_cv) and not run_dim
            try:
                total, used, ex = self._pass(probe, leaves, samples, runs, dev, dt, max_outcomes, per_sample, True)
            except torch.cuda.OutOfMemoryError:
                if samples < 2:
                    raise
                torch.cuda.empty_cache()
                self._refuse_unless_chunkable(probe, leaves, samples, runs, dev, dt, max_outcomes, None)
                return self._run_chunked(max(1, samples // 4), samples, estimator, dev, runs, ns, dt, stderr,
                                         max_outcomes, t0)
            cost_se = None
            if per_sample:
                terms = total.detach()
                total = total.mean() if total.dim() else total
                if stderr and terms.dim() and samples > 1:
                    cost_se = (terms.expand(samples).std() / math.sqrt(samples)).item()
            names = list(used)
            inputs = list(used.values())
            mod_params = _module_params(probe)
            inputs += [p for _, p in mod_params]
            trainable = [(node, est) for node, (_, est, _) in ex.sites.items() if est.trainable]
            if inputs and total.requires_grad:
                gs = torch.autograd.grad(total if total.dim() == 0 else total.sum(), inputs, allow_unused=True,
                                         create_graph=bool(trainable))
            else:
                gs = [None] * len(inputs)
            if trainable:
                gs = self._train_control_variates(trainable, gs)
        grads = {}
        for name, g, x in zip(names + [n for n, _ in mod_params], gs, inputs):
            grads[name] = torch.zeros_like(x) if g is None else g
        err = None
        if per_sample:
            # per-sample contributions g_i (their sum is the estimate): SE = sqrt(S) * std(g_i).
            # With leave-one-out or batch-average baselines this is the first-order (delta
            # method) standard error: it understates the error where that first-order term
            # vanishes (the Bernoulli toy at p = 1/2) and at a handful of samples; runs > 1
            # gives the exact spread.
            if stderr:
                err = {k: math.sqrt(samples) * g.std(0, unbiased=True) if samples > 1 else torch.full_like(g[0], float("nan"))
                       for k, g in grads.items()}
            grads = {k: g.sum(0) for k, g in grads.items()}
        elif run_dim:
            err = {k: g.std(0, unbiased=True) / math.sqrt(runs) for k, g in grads.items()}
        costs = total.detach()
        if run_dim:  # one read of the device for the cost, its spread and the gradients' finiteness
            (cost, spread), grads_ok = read_checked([costs.mean(), costs.std()], grads, dev.type == "cpu")
            cost_se = spread / math.sqrt(runs)
        else:
            (cost,), grads_ok = read_checked([costs], grads, dev.type == "cpu")
        check_finite(cost, grads, ex, grads_ok)
        return _result(grads, cost, cost_se, err, costs, leaves, mod_params, ex, samples, runs, dev, dt, t0)

    def _probe(self, plan, leaves, runs, dev, dt, max_outcomes) -> tuple[float, list[str]]:
        """Bytes per sample of a pass (its tensors, times 3 for what autograd keeps
        and the backward pass), from a small pass that leaves the RNG and the
        estimator state as they were, and the sites whose estimators compare
        samples; measured once per plan, runs, device, dtype and leaf shapes."""
        key = (runs, str(dev), dt, tuple((k, tuple(v.shape)) for k, v in leaves.items()))
        found = plan.probes.get(key)
        if found is None:
            found = plan.probes[key] = self._measure(plan, leaves, runs, dev, dt, max_outcomes)
        return found

    def _measure(self, plan, leaves, runs, dev, dt, max_outcomes) -> tuple[float, list[str]]:
        n = _PROBE_SAMPLES
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
        saved = {k: dict(v) if isinstance(v, dict) else v for k, v in self._state.items()}
        try:
            total, _, ex = self._pass(plan, leaves, n, runs, dev, dt, max_outcomes, False, True)
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
            self._state.clear()
            self._state.update(saved)
        return 3.0 * size / n, _coupled(ex)

    def _chunk_size(self, plan, leaves, samples, runs, dev, dt, max_outcomes, max_memory) -> int:
        per_sample, coupled = self._probe(plan, leaves, runs, dev, dt, max_outcomes)
        if max_memory is None and per_sample * samples <= _SURELY_FITS:
            return samples  # no need to ask the device how much memory is free (a driver call)
        budget = max_memory if max_memory is not None else _default_budget(dev)
        if per_sample * samples <= budget:
            return samples
        _refuse_if_coupled(coupled, per_sample * samples, budget, samples)
        return max(1, int(budget // per_sample))

    def _refuse_unless_chunkable(self, plan, leaves, samples, runs, dev, dt, max_outcomes, budget) -> None:
        per_sample, coupled = self._probe(plan, leaves, runs, dev, dt, max_outcomes)
        _refuse_if_coupled(coupled, per_sample * samples, budget or _default_budget(dev), samples)

    def _run_chunked(self, chunk, samples, estimator, dev, runs, ns, dt, stderr, max_outcomes, t0) -> Result:
        """The estimate from chunks of samples, each an independent estimate of the
        same estimator, combined with weights ``chunk / samples``."""
        parts: list[tuple[float, Result]] = []
        done = 0
        while done < samples:
            n = min(chunk, samples - done)
            res = self.run(samples=n, estimator=estimator, device=dev, runs=runs, namespace=ns, dtype=dt,
                           stderr=stderr, max_outcomes=max_outcomes, max_memory=float("inf"))
            parts.append((n / samples, res))
            done += n
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
                      samples=samples, runs=runs, device=first.device, seconds=time.perf_counter() - t0,
                      dtype=dt, stderr=err, cost_stderr=cost_se, costs=costs)

    def _train_control_variates(self, trainable, gs, retain: bool = False):
        """One variance-minimising step for the estimators' control variates
        (RELAX, REBAR): the gradient of sum(g^2) is that of the variance of g,
        because E[g] does not depend on them. Returns the gradients, detached."""
        owners, cv_params = [], []
        for node, est in trainable:
            st = self._state.get((node, "estimator", est.text()), {})
            ps = est.cv_parameters(st)
            owners.append((est, st, len(ps)))
            cv_params += ps
        proxy = sum((g**2).sum() for g in gs if g is not None and g.requires_grad)
        if cv_params and isinstance(proxy, torch.Tensor) and proxy.requires_grad:
            # estimators that fit part of their control variate by least squares
            # differentiate these gradients once more (the proxy's Hessian)
            second = any(est.cv_second_order for est, _, k in owners if k)
            cv_grads = torch.autograd.grad(proxy, cv_params, allow_unused=True, create_graph=second,
                                           retain_graph=second or retain)
            i, prepared = 0, []
            for est, st, k in owners:  # every estimator reads the graph before any changes its parameters
                prepared.append(est.cv_prepare(st, list(cv_grads[i : i + k])))
                i += k
            for (est, st, _), prep in zip(owners, prepared):
                est.cv_step(st, prep)
        return [None if g is None else g.detach() for g in gs]

    def _run_modules(self, ns, default, per_site, samples, runs, dev, dt, t0, max_outcomes) -> Result:
        """Stories that call ``nn.Module``s: one pass per run (module weights are not batched).

        With ``runs == 1`` and standard errors asked for, the estimate is the mean
        of 10 independent batches of ``samples / 10`` samples and its standard
        error their spread divided by sqrt(10) (batch means)."""
        batches = 1
        if runs == 1 and samples >= 20:
            batches = 10
        plan = self._plan(ns, default, per_site, False, False, dev, dt)
        leaves = self._leaves(plan, ns, dev, dt)
        mod_params = _module_params(plan)
        names = list(leaves) + [n for n, _ in mod_params]
        inputs = list(leaves.values()) + [p for _, p in mod_params]
        per_run: list[list[torch.Tensor]] = []
        costs = []
        ex = None
        trains_cv = _learns_cv(default, per_site)
        for _ in range(runs * batches):
            total, _, ex = self._pass(plan, leaves, samples // batches, 1, dev, dt, max_outcomes, first_order=True)
            gs = torch.autograd.grad(total, inputs, allow_unused=True, create_graph=trains_cv) if total.requires_grad \
                else [None] * len(inputs)
            if trains_cv:  # learned control variates fit after each pass, as in a plain run
                trainable = [(node, est) for node, (_, est, _) in ex.sites.items() if est.trainable]
                gs = self._train_control_variates(trainable, gs) if trainable else [
                    None if g is None else g.detach() for g in gs]
            per_run.append([torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)])
            costs.append(total.detach())
        grads = {n: torch.stack([r[i] for r in per_run]) for i, n in enumerate(names)}
        c = torch.stack(costs)
        if batches > 1:
            err = {k: g.std(0) / math.sqrt(batches) for k, g in grads.items()}
            grads = {k: g.mean(0) for k, g in grads.items()}
            cost_se = c.std().item() / math.sqrt(batches)
        elif runs == 1:
            grads = {k: v[0] for k, v in grads.items()}
            err = None
        else:
            err = {k: g.std(0) / math.sqrt(runs) for k, g in grads.items()}
        if runs > 1:
            cost_se = c.std().item() / math.sqrt(runs)
        elif batches == 1:
            cost_se = None
        check_finite(c.mean().item(), grads, ex)
        return _result(grads, c.mean().item(), cost_se, err, c, leaves, mod_params, ex, samples, runs, dev, dt, t0)

    def surrogate(
        self,
        samples: int = 1000,
        estimator: str | Mapping[str, str] | None = "auto",
        seed: int | None = None,
        namespace: Mapping[str, Any] | None = None,
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype | str | None = None,
    ) -> torch.Tensor:
        """A scalar tensor whose value is the cost estimate and whose gradient
        (``loss.backward()``, or ``torch.autograd.grad`` with ``create_graph=True``
        for higher orders) is the estimator's gradient."""
        samples = _positive_int("samples", samples)
        dev, dt = _device(device), _dtype(dtype)
        ns = namespace if namespace is not None else _EMPTY
        default, per_site = self._estimator_spec(estimator)
        with Seeded(seed, dev):
            plan = self._plan(ns, default, per_site, False, False, dev, dt)
            leaves = self._leaves(plan, ns, dev, dt)
            total, used, ex = self._pass(plan, leaves, samples, 1, dev, dt)
            self._fit_control_variates(ex, plan, used, total)
        return total

    def _fit_control_variates(self, ex, plan: Plan, used: dict[str, torch.Tensor], total: torch.Tensor) -> None:
        """One fit of the learned control variates (RELAX, REBAR, LAX) on this estimate's
        gradients; the estimate itself keeps the coefficients it was made with."""
        trainable = [(node, est) for node, (_, est, _) in ex.sites.items() if est.trainable]
        inputs = list(used.values()) + [p for _, p in _module_params(plan)]
        if not trainable or not inputs or not total.requires_grad:
            return
        ex.guard.fitting = True
        try:
            gs = torch.autograd.grad(total.sum(), inputs, allow_unused=True, create_graph=True, retain_graph=True)
            self._train_control_variates(trainable, gs, retain=True)  # the caller still differentiates total
        finally:
            ex.guard.fitting = False

    def exact(self, namespace: Mapping[str, Any] | None = None, max_outcomes: int = 10**6,
              device: str | torch.device | None = "cpu", dtype: torch.dtype | str | None = None) -> Result:
        """Exact cost and gradients, by summing over the joint finite support of every site."""
        t0 = time.perf_counter()
        dev, dt = _device(device), _dtype(dtype)
        ns = namespace if namespace is not None else _EMPTY
        try:
            plan = self._plan(ns, "enumerate", {}, False, False, dev, dt, override="enumerate")
            leaves = self._leaves(plan, ns, dev, dt)
            total, used, ex = self._pass(plan, leaves, 1, 1, dev, dt, max_outcomes)
        except EstimatorError as exc:
            unfit = getattr(exc, "unfit", None)
            if unfit is None:  # enumeration cannot credit a cost outside a plate
                raise StoryError(f"exact() cannot sum this story: {exc.message}", lineno=exc.lineno, line=exc.line,
                                 col=exc.col, hint="compute that cost inside the plate, one datapoint's part of it") from None
            site, dist, _ = unfit
            raise StoryError(
                f"exact() needs every site to have a finite support, but site `{site}` ({dist}) has none",
                lineno=exc.lineno,
                line=exc.line,
                hint="exact() works for discrete stories (Bernoulli, Categorical, ...); use run() for continuous ones",
            ) from None
        mod_params = _module_params(plan)
        names = list(used) + [n for n, _ in mod_params]
        inputs = list(used.values()) + [p for _, p in mod_params]
        gs = torch.autograd.grad(total, inputs, allow_unused=True) if inputs and total.requires_grad else [None] * len(inputs)
        grads = {n: torch.zeros_like(x) if g is None else g for n, g, x in zip(names, gs, inputs)}
        check_finite(total.item(), grads, ex)
        return Result(
            grads=grads,
            cost=total.item(),
            params={**leaves, **dict(mod_params)},
            estimators={k: "enumerate" for k in ex.sites},
            samples=1,
            runs=1,
            device=str(dev),
            seconds=time.perf_counter() - t0,
            dtype=dt,
            stderr={k: torch.zeros_like(v) for k, v in grads.items()},
            exact=True,
        )

    def compare(
        self,
        estimators: Sequence[str],
        samples: int = 100,
        runs: int = 500,
        seed: int | None = 0,
        namespace: Mapping[str, Any] | None = None,
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype | str | None = None,
        fit_steps: int = 10,
    ) -> Comparison:
        """Run each estimator ``runs`` times and tabulate mean, std, variance,
        bias (against ``exact()`` where the story is enumerable) and time.

        Each estimator starts from fresh state. One that learns a control
        variate (``relax``, ``rebar``, ``lax``) first fits it on ``fit_steps``
        calls of ``samples`` samples and up to 100 runs, drawn with other
        seeds, so the table measures the fitted estimator (``fit_steps=0``: as
        it starts); it stays unbiased, since the measured draws are new."""
        if isinstance(fit_steps, bool) or not isinstance(fit_steps, int) or fit_steps < 0:
            raise StoryError(f"fit_steps must be a non-negative int, not {fit_steps!r}", hint="e.g. fit_steps=10")
        if isinstance(estimators, str):
            estimators = [e.strip() for e in estimators.split(",") if e.strip()]
        if not estimators:
            raise EstimatorError("compare needs at least one estimator")
        try:
            reference = self.exact(namespace=namespace, device=device, dtype=dtype)
        except StoryError:
            reference = None
        results: dict[str, Result] = {}
        table: list[dict] = []
        for est in estimators:
            self.reset_state()
            if fit_steps and _learns_cv(*self._estimator_spec(est)):
                for i in range(fit_steps):
                    self.run(samples=samples, estimator=est, seed=None if seed is None else seed + 1 + i, device=device,
                             runs=min(runs, 100), namespace=namespace, dtype=dtype)
            res = self.run(samples=samples, estimator=est, seed=seed, device=device, runs=runs, namespace=namespace, dtype=dtype)
            results[est] = res
            for name, g in res.grads.items():
                g = g.detach().reshape(runs, -1).double().cpu()
                ref = reference.grads[name].detach().reshape(-1).double().cpu() if reference is not None else None
                for i in range(g.shape[1]):
                    col = g[:, i]
                    label = name if g.shape[1] == 1 else f"{name}[{i}]"
                    var = col.var(unbiased=True).item() if runs > 1 else float("nan")
                    table.append(
                        {
                            "estimator": est,
                            "param": label,
                            "mean": col.mean().item(),
                            "std": math.sqrt(var) if var == var else float("nan"),
                            "variance": var,
                            "bias": (col.mean() - ref[i]).item() if ref is not None else None,
                            "seconds": res.seconds,
                        }
                    )
        self.reset_state()
        return Comparison(table=table, results=results, reference=reference, samples=samples, runs=runs)

    def train(
        self,
        steps: int = 500,
        lr: float = 0.05,
        estimator: str | Mapping[str, str] | None = "auto",
        optimizer: str | type | torch.optim.Optimizer = "adam",
        samples: int = 100,
        seed: int | None = None,
        namespace: Mapping[str, Any] | None = None,
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype | str | None = None,
        callback: Any = None,
    ):
        """Optimise the story's parameters (and those of namespace tensors and
        modules it uses) by gradient descent on the estimated gradient.
        Returns a ``History`` (``.cost``: per-step cost estimates, ``.params``:
        final values). See :mod:`storch_nb.engine.train`."""
        from .engine.train import train

        return train(self, steps=steps, lr=lr, estimator=estimator, optimizer=optimizer, samples=samples,
                     seed=seed, namespace=namespace, device=device, dtype=dtype, callback=callback)

    def draw(self, ax: Any = None):
        """The graph as a matplotlib Figure: rectangles for deterministic steps,
        ellipses for stochastic ones (imports matplotlib on first use)."""
        from .notebook.draw import draw_graph

        return draw_graph(self.graph, ax=ax)

    def reset_state(self) -> None:
        """Clear estimator state only (moving averages), keeping parameters."""
        self._state.clear()


_CHUNK_CHECK = 1 << 22  # samples x runs from which a run's memory is estimated first
_PROBE_SAMPLES = 256
_SURELY_FITS = 256 * 2**20  # bytes a run may take without checking the device's free memory


def _learns_cv(default: str, per_site: Mapping[str, str]) -> bool:
    """Whether an estimator named in the spec learns a control variate."""
    return _texts_learn_cv((default, *per_site.values()))


@lru_cache(maxsize=256)
def _texts_learn_cv(texts: tuple[str, ...]) -> bool:
    return any(getattr(make_estimator(text), "trainable", False) for text in texts)


def _default_budget(dev: torch.device) -> float:
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free / 2
    return float(2 << 30)


def _coupled(ex) -> list[str]:
    """The sites whose estimators compare samples with each other (not chunkable)."""
    return [
        f"{node} ({est.text()})"
        for node, (_, est, _) in ex.sites.items()
        if est.trainable or (est.scored and est.n is None and est.opts.get("baseline") not in (None,))
    ]


def _refuse_if_coupled(coupled: list[str], need: float, budget: float, samples: int) -> None:
    """Chunks are independent estimates: refuse estimators that compare samples."""
    if coupled:
        raise StoryError(
            f"{samples:,} samples would need about {need / 2**30:.1f} GiB, over the budget of {budget / 2**30:.1f} GiB, "
            f"and the run cannot be split into chunks because {', '.join(coupled)} compare samples with each other",
            hint="use fewer samples (or runs > 1 with fewer samples each), the option n=K for the baseline, "
            "or raise max_memory",
        )


def _result(grads, cost, cost_se, err, costs, leaves, mod_params, ex, samples, runs, dev, dt, t0) -> Result:
    return Result(
        grads=grads,
        cost=cost,
        params={**leaves, **dict(mod_params)} if mod_params else dict(leaves),
        estimators={k: v[1].text() for k, v in ex.sites.items()},
        samples=samples,
        runs=runs,
        device=str(dev),
        seconds=time.perf_counter() - t0,
        dtype=dt,
        stderr=err,
        cost_stderr=cost_se,
        costs=costs,
    )


def _is_known(name: str) -> bool:
    from .engine.helpers import BUILTINS, HELPERS

    return name in HELPERS or name in BUILTINS


def _eval_param(ref, ns, dtype: torch.dtype) -> torch.Tensor:
    from .engine.helpers import BUILTINS, HELPERS

    g = dict(HELPERS)
    g["__builtins__"] = BUILTINS
    g.update({n: ns[n] for n in ref.expr.names if n in ns})
    try:
        value = eval(ref.expr.code, g)
    except Exception as exc:
        raise StoryError(f"cannot compute the initial value: {type(exc).__name__}: {exc}", lineno=ref.lineno,
                         line=ref.line, hint="fix the value inside param(...)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise StoryError(
            f"param() needs a number or a float tensor, not {type(value).__name__}",
            lineno=ref.lineno,
            line=ref.line,
            hint="write e.g. `x = param(1.0)` or `x = param(torch.zeros(3))`",
        )
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=dtype)  # the Python number itself, in the run's dtype
    t = value
    if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)):
        raise StoryError(f"param() needs a real number, not {t.dtype}", lineno=ref.lineno, line=ref.line,
                         hint="write e.g. `x = param(torch.zeros(3))` (a float tensor)")
    return t.detach().clone()


def _module_params(plan: Plan) -> list[tuple[str, nn.Parameter]]:
    out = []
    for mname, mod in plan.modules.items():
        for pname, p in mod.named_parameters():
            if p.requires_grad:
                out.append((f"{mname}.{pname}", p))
    return out
