"""The operations a plan runs, one per statement of the story (loops unrolled):
steps, sites, costs, loop variables, and the opening and closing of data plates.
Each op runs on an :class:`~.execute.Execution` (``op.run(ex)``) and keeps its
story line for errors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributions import Distribution

from ..errors import StoryError
from ..estimators import Estimator
from ..story.statements import Expr
from .checks import check_arguments, constrained
from .plates import AVERAGE, Data
from .vectorize import Compiled

__all__ = ["dist_args", "ParamRef", "StepOp", "ReduceOp", "SetOp", "CostOp", "SiteOp", "PlateOp", "StackOp", "datapoint",
           "stack"]

_ARGS_CACHE: dict[type, tuple[tuple[str, ...], dict[str, int]]] = {}


def dist_args(cls: type) -> tuple[tuple[str, ...], dict[str, int]]:
    """Positional parameter names of a distribution class and the event rank of each argument."""
    got = _ARGS_CACHE.get(cls)
    if got is None:
        import inspect

        try:
            params = [p for p in inspect.signature(cls.__init__).parameters.values()][1:]
            names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        except (TypeError, ValueError):
            names = ()
        events: dict[str, int] = {}
        constraints = cls.__dict__.get("arg_constraints") or getattr(cls, "arg_constraints", {})
        if isinstance(constraints, dict):
            for k, c in constraints.items():
                events[k] = getattr(c, "event_dim", 0)
        got = (names, events)
        _ARGS_CACHE[cls] = got
    return got


@dataclass
class ParamRef:
    """A learnable leaf: declared by ``param(...)`` in the story, or a namespace tensor."""

    name: str
    source: str  # "story" | "namespace" | "module"
    lineno: int | None = None
    expr: Expr | None = None
    value: Any = None  # the namespace tensor or module
    line: str | None = None  # the story line of a param(...)


@dataclass
class StepOp:
    """``x = EXPR``."""

    var: str
    node: str
    lineno: int
    line: str
    fn: Compiled

    def run(self, ex) -> None:
        ex.env[self.var] = self.fn(ex.env)


@dataclass
class ReduceOp(StepOp):
    """``logmeanexp(EXPR, over=z)`` cut out of a cost: the log of the mean of
    ``exp(EXPR)`` over batch dim ``dim``, site ``site``'s particles (kept, size 1).
    The particles' values and the result are recorded for the estimators of
    multi-sample objectives; for ``dreg`` the result carries a zero probe whose
    gradient is the cost's derivative in it."""

    site: str = ""
    dim: int = 0

    def run(self, ex) -> None:
        x = self.fn(ex.env)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            x = torch.as_tensor(x, dtype=ex.dtype, device=ex.device)
        if x.dim() > self.dim and self.fn.rank > self.dim and x.shape[self.dim] > 1:
            value = torch.logsumexp(x, self.dim, keepdim=True) - math.log(x.shape[self.dim])
        else:  # EXPR is the same for every particle
            value = x
        probe = None
        est = ex.sites[self.site][1]
        if est.multi_sample and est.reparameterized:
            probe = torch.zeros_like(value, requires_grad=True)
            value = value + (probe - probe.detach())
        ex.reductions[self.var] = (self, x, value, probe)
        ex.env[self.var] = value


@dataclass
class SetOp:
    """Binds a loop variable."""

    var: str
    value: int
    lineno: int
    line: str

    def run(self, ex) -> None:
        ex.env[self.var] = self.value


@dataclass
class CostOp:
    node: str
    lineno: int
    line: str
    fn: Compiled
    sites: tuple[str, ...]  # the sites upstream of this cost, in execution order
    plates: frozenset[int] = frozenset()  # the data plates the cost is inside (their batch dims)
    #: the logmeanexp reductions it reads: (hidden name, site node, the site's particle dim)
    reductions: tuple[tuple[str, str, int], ...] = ()

    def __post_init__(self) -> None:
        self.site_set = frozenset(self.sites)
        self.reduced = frozenset(d for _, _, d in self.reductions)  # particle dims it averages in a logmeanexp

    def run(self, ex) -> None:
        v = self.fn(ex.env)
        if self.reductions:  # what its inputs were, for a baseline that evaluates it again
            ex.cost_inputs[self.node] = {n: ex.env[n] for n in (*(m for m, _ in self.fn.batched), *self.fn.unbatched)}
        if not isinstance(v, torch.Tensor):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = torch.tensor(float(v), dtype=ex.dtype, device=ex.device)
            else:
                raise StoryError(
                    f"a cost must be a number or a tensor, not {type(v).__name__}",
                    hint="write `cost EXPR` with a numeric expression",
                )
        elif v.is_complex():
            raise StoryError(
                f"a cost must be real, not {v.dtype}",
                hint="take the real part, the absolute value or abs(x)**2 of the complex quantity",
            )
        elif not v.is_floating_point():
            v = v.to(ex.dtype)
        ex.costs.append((self, v))


@dataclass
class SiteOp:
    var: str
    node: str
    lineno: int
    line: str
    dist: Compiled  # the callee (class) or the whole distribution expression
    args: tuple[Compiled, ...]
    kwargs: tuple[tuple[str, Compiled], ...]
    is_call: bool
    static_dist: Any  # the class / instance when known at compile time
    estimator: Estimator | None  # None: auto
    arg_rank: int  # batch rank of the widest argument
    rank: int  # batch rank of the value
    dims: frozenset[int]  # batch dims whose full size the value has
    plate: int | None  # the dim of the site's own plate (n=K or enumerate)
    sample_dim: int  # the story's sample dimension
    ancestors: tuple[str, ...]  # upstream sites
    plates: frozenset[int] = frozenset()  # the data plates the site is inside (their batch dims)
    cols: tuple[tuple[str | int, int], ...] = ()  # argument (position or name) -> its column, for carets
    checked: dict = field(default_factory=dict)
    unchecked: bool = False  # every constrained argument is a Python number, checked on the first pass
    numeric: frozenset = frozenset()  # the arguments given as Python numbers (checked on the first pass only)
    numbers: dict = field(default_factory=dict, repr=False)

    def build(self, ex) -> Distribution:
        env = ex.env
        if not self.is_call:
            d = self.dist(env)
            if not isinstance(d, Distribution):
                raise StoryError(
                    f"`~` needs a distribution, got {type(d).__name__}",
                    hint="write e.g. `x ~ Normal(0, 1)`; any torch.distributions class works",
                )
            return d
        cls = self.static_dist if self.static_dist is not None else self.dist(env)
        args = [a(env) for a in self.args]
        kwargs = {k: a(env) for k, a in self.kwargs}
        if self.arg_rank:
            args, kwargs = self.align(cls, args, kwargs)
        # Python numbers become tensors of the run's dtype and device (cached)
        numbers: list[str | int] = []
        for i, a in enumerate(args):
            if type(a) in (float, int):
                args[i] = self.number(a, ex)
                numbers.append(i)
        for k, a in kwargs.items():
            if type(a) in (float, int):
                kwargs[k] = self.number(a, ex)
                numbers.append(k)
        if not (isinstance(cls, type) and issubclass(cls, Distribution)):
            d = cls(*args, **kwargs)
            if not isinstance(d, Distribution):
                raise StoryError(
                    f"`~` needs a distribution, got {type(d).__name__}",
                    hint="write e.g. `x ~ Normal(0, 1)`; any torch.distributions class works",
                )
            self.check(d)
            return d
        try:
            d = cls(*args, **kwargs, validate_args=False)
        except (ValueError, TypeError) as exc:
            raise StoryError(
                f"invalid arguments for {cls.__name__}: {exc}",
                hint=f"see help(torch.distributions.{cls.__name__}) for its arguments and their constraints",
            ) from None
        # arguments are checked on every pass (a scale trained below zero stops at that step);
        # those given as Python numbers only on the plan's first (a site whose constrained
        # arguments are all numbers is not checked again at all)
        if ex.validate:
            self.check(d, cls)
            self.numeric = _arg_names(numbers, cls)
            self.unchecked = all(name in self.numeric for name, _ in constrained(type(d)))
        elif not self.unchecked:
            self.check(d, cls, self.numeric)
        return d

    def check(self, d: Distribution, cls: Any = None, skip: frozenset[str] = frozenset()) -> None:
        """Check the distribution's arguments but those in ``skip``; put the caret under
        the offending one."""
        names = dist_args(cls)[0] if cls is not None else ()
        try:
            check_arguments(d, skip)
        except StoryError as exc:
            name = getattr(exc, "argument", None)
            for key, col in self.cols:
                if key == name or (isinstance(key, int) and key < len(names) and names[key] == name):
                    exc.col = col
            raise

    def number(self, a: float, ex) -> torch.Tensor:
        key = (a, ex.dtype, ex.device)
        t = self.numbers.get(key)
        if t is None:
            if len(self.numbers) > 64:
                self.numbers.clear()
            t = self.numbers[key] = torch.tensor(a, dtype=ex.dtype, device=ex.device)
        return t

    def align(self, cls, args: list, kwargs: dict) -> tuple[list, dict]:
        """Pad batched arguments so their own dimensions line up as for one draw."""
        names, events = dist_args(cls) if isinstance(cls, type) else ((), {})
        ranks = [a.rank for a in self.args]
        kranks = {k: a.rank for k, a in self.kwargs}
        m = self.rank
        own_batch = 0
        items = [(names[i] if i < len(names) else None, v, ranks[i]) for i, v in enumerate(args)]
        items += [(k, v, kranks[k]) for k, v in kwargs.items()]
        for name, v, r in items:
            if isinstance(v, torch.Tensor):
                ob = v.dim() - r - events.get(name, 0)
                if ob > own_batch:
                    own_batch = ob

        def fix(name, v, r):
            if r == 0 or not isinstance(v, torch.Tensor):
                return v
            own = v.dim() - r
            target = own_batch + events.get(name, 0) if name in events else own
            if r == m and own == target:
                return v
            shape = v.shape
            return v.reshape(shape[:r] + (1,) * (m - r) + (1,) * (target - own) + shape[r:])

        args = [fix(items[i][0], v, ranks[i]) for i, v in enumerate(args)]
        kwargs = {k: fix(k, v, kranks[k]) for k, v in kwargs.items()}
        return args, kwargs

    def run(self, ex) -> None:
        dist = self.build(ex)
        est = self.estimator
        if est is None:
            est = ex.auto(self, dist)
        key = (type(dist), id(est))
        if key not in self.checked:
            try:
                est.check(dist, self.node)
            except StoryError as exc:
                if exc.col is None and "using" in self.line:
                    exc.col = self.line.find("using")  # the caret under the estimator that does not fit
                raise
            self.checked[key] = True
        if est.enumerates:
            value, weight = ex.enumerate_site(self, dist, est)
            ex.env[self.var] = value
            ex.sites[self.node] = (self, est, weight)
            return
        if est.plated:
            value, aux = ex.plated_site(self, dist, est)
            ex.env[self.var] = value
            ex.sites[self.node] = (self, est, aux)
            return
        if self.plate is not None:
            ex.open_plate(self.plate, est.n, AVERAGE)
        sizes = ex.sizes
        target = tuple(sizes[d] if d in self.dims else 1 for d in range(self.rank))
        if self.arg_rank == 0:
            value = est.draw(dist, target)
        else:
            if tuple(dist.batch_shape[: self.rank]) != target:
                dist = dist.expand(target + tuple(dist.batch_shape[self.rank :]))
            value = est.draw(dist, ())
        lp = dist.log_prob(value) if est.scored else None
        if est.multi_sample and est.reparameterized:
            lp = (value, dist)  # dreg: the draw and its distribution, for the surrogate's correction
        ex.env[self.var] = value
        ex.sites[self.node] = (self, est, lp)


@dataclass
class PlateOp:
    """Opens a data plate: binds each name to one datapoint of its tensor (the
    tensor's first own dimension becomes the plate's batch dimension), drawing
    ``batch`` datapoints per run where asked."""

    targets: tuple[str, ...]
    lineno: int
    line: str
    col: int
    fns: tuple[Compiled, ...]
    texts: tuple[str, ...]
    dim: int
    batch: int | None
    reduce: str
    run_dim: bool

    def run(self, ex) -> None:
        values, n, first = [], None, None
        for fn, text in zip(self.fns, self.texts):
            v = fn(ex.env)
            if isinstance(v, (list, tuple)):
                v = torch.as_tensor(v)
            if not isinstance(v, torch.Tensor):
                raise StoryError(f"a plate runs over tensors, but `{text}` is {type(v).__name__}", col=self.col,
                                 hint="give a tensor of N datapoints, shape (N, ...)")
            if v.dim() - fn.rank < 1:
                raise StoryError(
                    f"a plate runs over the first dimension of its tensors, but `{text}` is a scalar",
                    col=self.col,
                    hint="give a tensor of N datapoints, shape (N, ...); for N independent draws "
                    "without data, `for i in plate(torch.arange(N)):`",
                )
            size = v.shape[fn.rank]
            if n is None:
                n, first = size, text
            elif size != n:
                raise StoryError(f"the plate's tensors differ in length: `{first}` has {n} datapoints, `{text}` {size}",
                                 col=self.col, hint="give tensors with the same first dimension")
            values.append(v)
        if not n:
            raise StoryError(f"the plate runs over no datapoints (`{first}` is empty)", col=self.col,
                             hint="give at least one datapoint")
        if self.batch is not None and self.batch > n:
            raise StoryError(f"batch={self.batch} is more than the plate's {n} datapoints", col=self.col,
                             hint=f"use batch={n} or less, or leave batch out to use every datapoint")
        size = n if self.batch is None else self.batch
        ex.open_plate(self.dim, size, Data(self.lineno, size, n, self.reduce))
        idx = None
        if size < n:  # B datapoints drawn uniformly without replacement, afresh for each run
            if self.run_dim:
                idx = torch.rand(ex.sizes[0], n, device=ex.device).argsort(-1)[:, :size]
            else:
                idx = torch.randperm(n, device=ex.device)[:size].unsqueeze(0)
        for name, fn, v in zip(self.targets, self.fns, values):
            ex.env[name] = datapoint(v, fn.rank, self.dim, idx, self.run_dim)


def datapoint(v: torch.Tensor, r: int, dim: int, idx: torch.Tensor | None, run_dim: bool) -> torch.Tensor:
    """``v`` (batch rank ``r``) with its first own dimension moved to batch dim
    ``dim`` (gathered at ``idx``, shape (runs, B), where given)."""
    shape = v.shape
    e = v.reshape(shape[:r] + (1,) * (dim - r) + shape[r:])
    if idx is None:
        return e
    runs, b = idx.shape
    if not run_dim:  # one draw of datapoints for the whole pass: a plain index (faster than a gather)
        return e.index_select(dim, idx.reshape(b))
    lead = (runs,) + (1,) * (dim - 1)
    iv = idx.reshape(lead + (b,) + (1,) * (e.dim() - dim - 1))
    return torch.take_along_dim(e, iv, dim=dim)


@dataclass
class StackOp:
    """Closes a data plate: each name defined inside it becomes the stack of its
    datapoints' values along a first own dimension (the plate's dim stays, size 1)."""

    names: tuple[tuple[str, int], ...]  # (story name, its batch rank at the end of the block)
    dim: int
    lineno: int
    line: str

    def run(self, ex) -> None:
        n = ex.sizes[self.dim]
        for var, r in self.names:
            v = ex.env.get(var)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v, r = torch.tensor(v, dtype=ex.dtype if isinstance(v, float) else None, device=ex.device), 0
            if isinstance(v, torch.Tensor):
                ex.env[var] = stack(v, r, self.dim, n)


def stack(v: torch.Tensor, r: int, dim: int, n: int) -> torch.Tensor:
    """``v`` (batch rank ``r``) with batch dim ``dim`` (``n`` datapoints) moved to the
    front of its own dims; the result has batch rank ``max(r, dim + 1)``, size 1 at ``dim``."""
    m = max(r, dim + 1)
    shape = v.shape
    v = v.reshape(shape[:r] + (1,) * (m - r) + shape[r:])
    if v.shape[dim] != n:
        v = v.expand(v.shape[:dim] + (n,) + v.shape[dim + 1 :])
    return v.movedim(dim, m - 1).unsqueeze(dim)


def _arg_names(keys, cls: Any) -> frozenset[str]:
    """The argument names of ``cls`` that ``keys`` (positions and names) stand for."""
    names = dist_args(cls)[0] if cls is not None else ()
    return frozenset(names[i] if isinstance(i, int) and i < len(names) else i for i in keys)
