"""One vectorized pass of a plan: every sample of every run at once."""

from __future__ import annotations

import torch
from torch.distributions import Distribution

from ..errors import EstimatorError, StoryError, StoryNameError
from ..estimators import Estimator, auto_estimator
from ..estimators.base import Guard
from .devices import on_device, placed_like, same_device
from .ops import SiteOp
from .plan import Plan
from .plates import AVERAGE, ENUMERATED, Plate, Variants


class Execution:
    """The state of one pass: the values, the batch sizes and what each site and cost left."""

    __slots__ = ("env", "sizes", "plates", "sites", "costs", "validate", "dtype", "device", "plan", "max_outcomes",
                 "_auto", "state", "guard", "reductions", "cost_inputs")

    def __init__(self, plan: Plan, env: dict, sizes: list[int], dtype, device, validate: bool, max_outcomes: int = 10**6,
                 state: dict | None = None):
        self.state = state if state is not None else {}
        self.plan = plan
        self.env = env
        self.sizes = sizes  # full size of each batch dim: [runs?], samples, plates...
        self.plates: list[Plate] = [AVERAGE] * len(sizes)  # how the surrogate reduces each batch dim
        self.sites: dict[str, tuple] = {}
        self.costs: list = []
        self.validate = validate
        self.dtype = dtype
        self.device = device
        self.max_outcomes = max_outcomes
        self._auto: dict = {}
        self.guard = Guard()  # first-order-only parts of this pass's surrogate (see estimators.base)
        self.reductions: dict = {}  # logmeanexp: hidden name -> (op, the particles' values, result, probe)
        self.cost_inputs: dict = {}  # cost node -> the batched values it read (costs with reductions)

    def auto(self, op: SiteOp, dist: Distribution) -> Estimator:
        particles = self.sizes[op.sample_dim]
        key = (op.node, type(dist), particles >= 2)
        est = self._auto.get(key)
        if est is None:
            est = self._auto[key] = auto_estimator(dist, particles)
        return est

    def open_plate(self, dim: int, size: int, plate: Plate, node: str = "") -> None:
        """Batch dim ``dim`` gets ``size`` entries, reduced as ``plate`` says."""
        while len(self.sizes) <= dim:
            self.sizes.append(1)
            self.plates.append(AVERAGE)
        self.sizes[dim] = size
        self.plates[dim] = plate
        if plate is ENUMERATED:
            total = 1  # joint outcomes of the enumerated sites (samples, runs and datapoints do not count)
            for s, p in zip(self.sizes, self.plates):
                if p is ENUMERATED:
                    total *= s
            if total > self.max_outcomes:
                raise StoryError(
                    f"enumerating site `{node}` makes {total:,} joint outcomes, over the budget of {self.max_outcomes:,}",
                    hint="raise max_outcomes, or use a sampling estimator for some sites",
                )

    def plated_site(self, op: SiteOp, dist: Distribution, est: Estimator):
        """Variants of the site along its own plate, drawn by the estimator."""
        size = est.plate_size(dist)
        self.open_plate(op.plate, size, AVERAGE)
        base = tuple(self.sizes[d] if d in op.dims and d != op.plate else 1 for d in range(op.rank))
        own = tuple(dist.batch_shape[op.rank :]) if op.arg_rank else tuple(dist.batch_shape)
        if tuple(dist.batch_shape) != base + own:
            dist = dist.expand(base + own)
        key = (op.node, "estimator", est.text())  # each estimator keeps its own state per site
        state = self.state.setdefault(key, {})
        runs = self.sizes[0] if self.plan.run_dim else None
        if (est.state_per_run and state.get("runs", 0) != runs) or not placed_like(state, self.device, self.dtype):
            # state made for another number of runs (where it holds one entry per run), device or dtype:
            # start afresh
            state.clear()
            state["device"], state["dtype"] = self.device, self.dtype
        state["runs"] = runs
        state["sample_dim"] = op.sample_dim  # where the story's samples lie (sample-comparing estimators)
        try:
            value, aux = est.sample_variants(dist, op.plate, size, state)
        except EstimatorError as exc:
            exc.message = f"site `{op.node}`: {exc.message}"
            raise
        self.plates[op.plate] = Variants(op.node, est, aux, op.plates)
        return value, aux

    def enumerate_site(self, op: SiteOp, dist: Distribution, est: Estimator):
        """All outcomes of the site's own entries, jointly, along its plate."""
        nb_total = len(dist.batch_shape)
        own_rank = nb_total - (op.rank if op.arg_rank else 0)
        own_batch = tuple(dist.batch_shape[nb_total - own_rank :]) if own_rank > 0 else ()
        support = dist.enumerate_support(expand=False)
        k = support.shape[0]
        event = tuple(support.shape[1 + nb_total :])
        flat = support.reshape((k,) + event)
        n_entries = 1
        for s in own_batch:
            n_entries *= s
        outcomes = k**n_entries
        budget = min(self.max_outcomes, est.opts.get("max_outcomes", self.max_outcomes))
        if outcomes > budget:
            raise StoryError(
                f"site `{op.node}` has {outcomes:,} joint outcomes, over the budget of {budget:,}",
                hint="use a sampling estimator for this site, or raise max_outcomes",
            )
        self.open_plate(op.plate, outcomes, ENUMERATED, op.node)
        if n_entries == 1:
            values = flat.reshape((outcomes,) + own_batch + event)
        else:
            idx = torch.cartesian_prod(*[torch.arange(k, device=flat.device)] * n_entries).reshape(outcomes, n_entries)
            values = flat[idx].reshape((outcomes,) + own_batch + event)
        value = values.reshape((1,) * op.plate + values.shape)
        lp = dist.log_prob(value)
        # joint log-probability of the outcome: sum over the site's own entries
        if own_rank:
            lp = lp.sum(tuple(range(lp.dim() - own_rank, lp.dim())))
        return value, lp


def execute(plan: Plan, env: dict, sizes: list[int], dtype, device, validate: bool, max_outcomes: int = 10**6,
            state: dict | None = None) -> Execution:
    """Run every op of the plan; convert errors to StoryErrors that name the line.

    The namespace tensors the story reads are put on the run's device first, and
    the ops run in a ``torch.device`` context, so that the tensors a story line
    makes (``torch.arange(5.0)``) are made there too; torch's default device is
    left as it was."""
    ex = Execution(plan, env, sizes, dtype, device, validate, max_outcomes, state)
    if plan.constants:
        place_constants(plan, device)
    with on_device(device):
        for op in plan.ops:
            try:
                op.run(ex)
            except StoryError as exc:
                raise exc.located(op.lineno, op.line) from None
            except NameError as exc:
                name = getattr(exc, "name", None) or str(exc)
                raise StoryNameError(
                    f"name `{name}` is not defined",
                    lineno=op.lineno,
                    line=op.line,
                    hint="define it earlier in the story or in the notebook",
                ) from None
            except Exception as exc:
                raise step_error(op, exc) from exc
    return ex


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter
        return None


def place_constants(plan: Plan, device) -> None:
    """The namespace tensors the story reads as constants, on the run's device:
    the tensor itself where it is there already (no copy: the CPU run reads the
    user's tensor), else a copy, made again when the tensor was changed in place
    since. Their dtype is kept (torch's type promotion applies, as on the CPU);
    the user's tensors are never moved."""
    for name, src in plan.constants.items():
        if device is None or same_device(src.device, device):
            plan.globals[name] = src
            continue
        version = _version(src)
        got = plan.placed.get(name)
        if got is None or version is None or got[0] != version or not same_device(got[1].device, device):
            copy = src.detach().to(device)
            plan.placed[name] = (version, copy)
            plan.globals[name] = copy


def step_error(op, exc: Exception) -> StoryError:
    msg = str(exc).strip().split("\n")[0] or type(exc).__name__
    text = f"{type(exc).__name__}: {msg}"
    hint = None
    low = msg.lower()
    if "vmap" in low or "batching rule" in low or "data-dependent" in low:
        hint = (
            "this step could not be vectorized over samples; write it with tensor operations "
            "(no Python `if` on values, no .item()), or move the data-dependent part into a distribution"
        )
    elif "size of tensor" in low or "shape" in low or "broadcast" in low or "dimension" in low:
        hint = "shapes do not match for one draw: check the shapes of the values this line combines"
    elif isinstance(exc, EstimatorError):  # pragma: no cover - EstimatorError is a StoryError
        hint = exc.hint
    else:
        hint = "fix the expression on this line"
    return StoryError(f"this step failed: {text}", lineno=op.lineno, line=op.line, hint=hint)
