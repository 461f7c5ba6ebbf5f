"""Compiling a parsed story into a plan: loops unrolled, names resolved, the
graph built, every expression compiled for batched values.

A plan depends on the story text, the namespace values the story reads, the
estimator choice, device, dtype and whether parameters are batched (``runs >
1``, or per-sample standard errors); it does not depend on the sample count,
so one plan serves every call of ``run``/``surrogate`` with the same setting.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributions import Distribution

from ..errors import EstimatorError, StoryError, StoryNameError
from ..estimators import Estimator, make_estimator
from ..graph import Graph, Node
from ..story.statements import Assign, Cost, Expr, Loop, Param, Plate, Program, Site, Statement
from ..story.walk import defined_names, walk
from .checks import check_arguments, random_call
from .helpers import BUILTINS, HELPERS
from .plates import AVERAGE, Data
from .vectorize import Compiled, has_scope, is_elementwise, own_reduce, reduced_form

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

    def __post_init__(self) -> None:
        self.site_set = frozenset(self.sites)

    def run(self, ex) -> None:
        v = self.fn(ex.env)
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
            self.check(d, ())
            return d
        try:
            d = cls(*args, **kwargs, validate_args=False)
        except (ValueError, TypeError) as exc:
            raise StoryError(
                f"invalid arguments for {cls.__name__}: {exc}",
                hint=f"see help(torch.distributions.{cls.__name__}) for its arguments and their constraints",
            ) from None
        # arguments are checked on every pass (a scale trained below zero stops at that step);
        # those given as Python numbers only on the plan's first
        self.check(d, () if ex.validate else numbers, cls)
        return d

    def check(self, d: Distribution, numbers, cls: Any = None) -> None:
        """Check the distribution's arguments; put the caret under the offending one."""
        names = dist_args(cls)[0] if cls is not None else ()
        skip = {names[i] if isinstance(i, int) and i < len(names) else i for i in numbers} if numbers else ()
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
            est.check(dist, self.node)
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
    lead = (runs,) + (1,) * (dim - 1) if run_dim else (1,) * dim
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


@dataclass
class Plan:
    ops: list
    graph: Graph
    params: dict[str, ParamRef]
    site_ops: dict[str, SiteOp]
    cost_ops: list[CostOp]
    modules: dict[str, nn.Module]
    run_dim: bool
    batched_params: bool
    validated: bool = False
    #: the globals every compiled expression reads (helpers and namespace values)
    globals: dict = field(default_factory=dict, repr=False)
    #: namespace tensors read as constants: name -> the user's tensor
    constants: dict = field(default_factory=dict, repr=False)
    #: their copies on the plan's device: name -> (the tensor's version when copied, copy)
    placed: dict = field(default_factory=dict, repr=False)
    #: memory probes (Story._probe): (runs, device, dtype, leaf shapes) -> (bytes per sample, coupled sites)
    probes: dict = field(default_factory=dict, repr=False)

    @property
    def param_rank(self) -> int:
        return 1 if self.batched_params else 0


class Planner:
    """Walks a program once, unrolling loops, and produces a :class:`Plan`."""

    def __init__(
        self,
        program: Program,
        namespace: dict,
        estimators: dict[str, str],
        default: str,
        run_dim: bool,
        batched_params: bool,
        override: str | None = None,
    ) -> None:
        self.program = program
        self.override = override  # an estimator for every site, ignoring `using` (exact())
        self.ns = namespace
        self.est_texts = estimators
        self.default = default
        self.run_dim = run_dim
        self.batched_params = batched_params
        self.sample_dim = 1 if run_dim else 0
        self.base_rank = self.sample_dim + 1
        self.graph = Graph()  # grown node by node (rebuilding it per node made unrolling quadratic)
        self.nodes: list[Node] = self.graph.nodes
        self.edges: list[tuple[str, str]] = self.graph.edges
        self.site_index: dict[str, int] = {}  # site node -> its position among the sites
        self.up: dict[str, tuple[str, ...]] = {}  # node -> the sites it depends on, in story order
        self.node_names: set[str] = set()
        # story variable -> (node, rank, dims)
        self.scope: dict[str, tuple[str, int, frozenset[int]]] = {}
        self.static: dict[str, Any] = {}
        self.params: dict[str, ParamRef] = {}
        self.modules: dict[str, nn.Module] = {}
        self.leaves: dict[str, str] = {}  # namespace name -> node
        self.ops: list = []
        self.site_ops: dict[str, SiteOp] = {}
        self.cost_ops: list[CostOp] = []
        self.globals: dict[str, Any] = dict(HELPERS)
        self.globals["__builtins__"] = BUILTINS
        self.globals["__own_reduce__"] = own_reduce  # reductions over one draw's entries (reduced_form)
        self.constants: dict[str, torch.Tensor] = {}  # namespace tensors read as constants
        self.n_plates = 0
        self.open_plates: list[int] = []  # batch dims of the data plates around the statement being planned
        self.defined = defined_names(program.statements)  # story name -> the first line defining it
        self.ended: dict[str, tuple[int, str]] = {}  # a plate's datapoint name after its block -> (line, data)
        self.n_costs = _count_costs(program.statements)
        self.cost_k = 0
        self.cost_names: dict[int, int] = {}
        self.unrolled = 0

    # ------------------------------------------------------------- helpers
    def unique(self, name: str) -> str:
        if name not in self.node_names:
            self.node_names.add(name)
            return name
        k = 2
        while f"{name}#{k}" in self.node_names:
            k += 1
        self.node_names.add(f"{name}#{k}")
        return f"{name}#{k}"

    def add_node(self, name: str, kind: str, line: int | None, parents) -> None:
        self.graph.add(Node(name, kind, line), parents)
        # the sites upstream, from the parents' (a chain of sites extends one tuple:
        # no walk over the whole graph per node)
        parts = []
        for p in dict.fromkeys(parents):
            t = self.up.get(p, ())
            if p in self.site_index:
                t = (*t, p)
            if t:
                parts.append(t)
        if len(parts) > 1:
            merged = set().union(*parts)
            longest = max(parts, key=len)
            parts = [longest] if len(merged) == len(longest) else [
                tuple(sorted(merged, key=self.site_index.__getitem__))]
        self.up[name] = parts[0] if parts else ()

    def upstream_sites(self, name: str) -> tuple[str, ...]:
        """The sites ``name`` depends on, in story order."""
        return self.up[name]

    def resolve_object(self, name: str) -> Any:
        if name in self.scope:
            return None
        if name in self.ns:
            return self.ns[name]
        if name in HELPERS:
            return HELPERS[name]
        return BUILTINS.get(name)

    def name_error(self, name: str, expr: Expr) -> StoryNameError:
        line = self.program.lines[expr.lineno - 1] if expr.lineno <= len(self.program.lines) else None
        col = None
        if line is not None:
            m = re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", line)
            col = m.start() if m else None
        pool = [*self.scope, *(k for k in self.ns if not k.startswith("_")), *HELPERS]
        close = difflib.get_close_matches(name, pool, n=1)
        hint = f"did you mean `{close[0]}`?" if close else (
            "define it earlier in the story, or in the notebook before running the cell"
        )
        return StoryNameError(f"name `{name}` is not defined", lineno=expr.lineno, line=line, col=col, hint=hint)

    def _locate(self, name: str, expr: Expr) -> tuple[str | None, int | None]:
        line = self.program.lines[expr.lineno - 1] if expr.lineno <= len(self.program.lines) else None
        m = re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", line) if line is not None else None
        return line, m.start() if m else None

    def early_error(self, name: str, expr: Expr) -> StoryNameError:
        """A story name read on a line before the line that defines it."""
        line, col = self._locate(name, expr)
        at = self.defined[name]
        if at <= expr.lineno:  # a loop variable after its loop
            return StoryNameError(
                f"`{name}` exists only inside the block of line {at}",
                lineno=expr.lineno, line=line, col=col,
                hint="use it inside that block, or keep what you need in a name defined there",
            )
        return StoryNameError(
            f"`{name}` is used before line {at} defines it",
            lineno=expr.lineno, line=line, col=col,
            hint=f"move line {at} above this one (a story runs top to bottom), or rename one of them",
        )

    def ended_error(self, name: str, expr: Expr) -> StoryNameError:
        """A plate's datapoint name read after the plate's block."""
        line, col = self._locate(name, expr)
        at, data = self.ended[name]
        return StoryNameError(
            f"`{name}` is one datapoint of the plate on line {at} and exists only inside its block",
            lineno=expr.lineno, line=line, col=col,
            hint=f"after the plate use `{data}` (every datapoint), or a name defined inside the block "
            "(stacked: one entry per datapoint)",
        )

    def compile(self, expr: Expr, loopvars: set[str]) -> tuple[Compiled, list[str]]:
        """Compile one expression; return it with the graph nodes it reads."""
        parents: list[str] = []
        batched: list[tuple[str, int]] = []
        unbatched: list[str] = []
        rank = 0
        dims: set[int] = set()
        const_own = 0
        rng = random_call(expr.node, self.resolve_object)
        if rng is not None:
            line = self.program.lines[expr.lineno - 1] if expr.lineno <= len(self.program.lines) else None
            col = line.find(rng.lstrip(".")) if line else None
            raise StoryError(
                f"`{rng}(...)` draws random numbers outside `~`",
                lineno=expr.lineno, line=line, col=col if col is not None and col >= 0 else None,
                hint="draw randomness as a site, e.g. `eps ~ Normal(0, 1)`, so that the estimator sees it "
                "(a hidden draw is shared by all samples, or makes the gradient wrong)",
            )
        for name in expr.names:
            if name in self.scope:
                node, r, d = self.scope[name]
                parents.append(node)
                if r:
                    batched.append((name, r))
                    rank = max(rank, r)
                    dims |= d
                else:
                    unbatched.append(name)
            elif name in loopvars:
                continue
            elif name in self.ended:
                raise self.ended_error(name, expr)
            elif name in self.defined:
                raise self.early_error(name, expr)
            elif name in self.ns:
                value = self.ns[name]
                node = self.namespace_leaf(name, value)
                if node is not None:
                    parents.append(node)
                if name in self.params:
                    r = self.param_rank
                    if r:
                        batched.append((name, r))
                        rank = max(rank, r)
                        dims |= {0}
                    else:
                        unbatched.append(name)
                else:
                    self.globals[name] = value
                    if isinstance(value, torch.Tensor):
                        const_own = max(const_own, value.dim())
                        self.constants[name] = value  # put on the run's device by execute()
            elif name in HELPERS or name in BUILTINS:
                continue
            else:
                raise self.name_error(name, expr)
        elementwise = is_elementwise(expr.node, self.resolve_object)
        scoped = has_scope(expr.node)
        direct = None
        if not elementwise and not scoped and batched:
            direct = reduced_form(expr.node, self.resolve_object, rank, f"<story line {expr.lineno}>")
        fn = Compiled(
            code=expr.code,
            globals=self.globals,
            rank=rank,
            batched=tuple(batched),
            unbatched=tuple(unbatched),
            const_own=const_own,
            elementwise=elementwise or direct is not None,
            scoped=scoped,
            direct=direct,
        )
        fn.dims = frozenset(dims)  # type: ignore[attr-defined]
        return fn, parents

    @property
    def param_rank(self) -> int:
        return 1 if self.batched_params else 0

    def namespace_leaf(self, name: str, value: Any) -> str | None:
        """The graph node of a namespace value (a param or an input), or None for functions."""
        if name in self.leaves:
            return self.leaves[name]
        if isinstance(value, nn.Module):
            self.modules[name] = value
            self.add_node(self.unique(name), "param", None, ())
            self.leaves[name] = name
            return name
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                if not value.is_leaf and not isinstance(value, nn.Parameter):
                    pass  # a non-leaf with grad: still differentiate with respect to it
                self.params[name] = ParamRef(name, "namespace", value=value)
                self.add_node(self.unique(name), "param", None, ())
            else:
                self.add_node(self.unique(name), "input", None, ())
            self.leaves[name] = name
            return name
        if isinstance(value, (int, float)) and not isinstance(value, bool) or type(value).__module__ == "numpy":
            self.add_node(self.unique(name), "input", None, ())
            self.leaves[name] = name
            return name
        return None

    def static_eval(self, expr: Expr, loopvars: dict[str, int]) -> Any:
        env = dict(self.globals)
        env.update(self.static)
        env.update(loopvars)
        for name in expr.names:
            if name not in env and name not in self.ns and name not in HELPERS and name not in BUILTINS:
                if name in self.scope:
                    raise StoryError(
                        f"a loop bound must be known before the story runs; `{name}` depends on parameters or samples",
                        lineno=expr.lineno,
                        line=self.program.lines[expr.lineno - 1],
                        hint="use an int from the story (e.g. `T = 5`) or the notebook",
                    )
                raise self.name_error(name, expr)
            if name in self.ns:
                env.setdefault(name, self.ns[name])
        return eval(expr.code, env)

    # -------------------------------------------------------------- walking
    def build(self) -> Plan:
        self.block(self.program.statements, {}, "")
        self.prune_stacks()
        if not self.cost_ops:
            raise StoryError(
                "no cost is ever computed (every `cost` line is in a loop that runs zero times)",
                hint="check the loop bounds",
            )
        known = set(self.site_ops) | {op.var for op in self.site_ops.values()}
        unknown = sorted(set(self.est_texts) - known)
        if unknown:
            names = ", ".join(dict.fromkeys(op.var for op in self.site_ops.values())) or "none"
            raise EstimatorError(
                f"the estimator mapping names {', '.join(map(repr, unknown))}, which is not a site of this story",
                hint=f"the sites are: {names}",
            )
        graph = self.graph
        # parameters that no cost reaches
        reached = graph.ancestors(*(op.node for op in self.cost_ops))
        lost = [p for p in [*self.params, *self.modules] if p not in reached]
        if lost:
            warnings.warn(
                f"no cost depends on {', '.join(lost)}: their gradient is zero",
                stacklevel=4,
            )
        return Plan(
            ops=self.ops,
            graph=graph,
            params=self.params,
            site_ops=self.site_ops,
            cost_ops=self.cost_ops,
            modules=self.modules,
            run_dim=self.run_dim,
            batched_params=self.batched_params,
            globals=self.globals,
            constants=self.constants,
        )

    def block(self, statements: tuple[Statement, ...], loopvars: dict[str, int], suffix: str) -> None:
        for st in statements:
            try:
                self.statement(st, loopvars, suffix)
            except StoryError as exc:
                raise exc.located(st.lineno, st.line) from None

    def statement(self, st: Statement, loopvars: dict[str, int], suffix: str) -> None:
        lv = set(loopvars)
        if isinstance(st, Loop):
            args = [self.static_eval(a, loopvars) for a in st.range_args]
            for a in args:
                if not isinstance(a, int) or isinstance(a, bool):
                    raise StoryError(
                        f"range() needs ints, got {type(a).__name__}",
                        hint="loop over `range(K)` with K an int from the story or the notebook",
                    )
            try:
                steps = range(*args)
            except ValueError as exc:  # range(0, 5, 0)
                raise StoryError(f"range() cannot run: {exc}", hint="give range a non-zero step") from None
            try:
                self.unrolled += len(steps) * len(st.body)
            except OverflowError:  # more iterations than fit in a C ssize_t
                self.unrolled = MAX_UNROLLED + 1
            if self.unrolled > MAX_UNROLLED:
                raise StoryError(
                    f"the loop would unroll into {self.unrolled:,} steps, over the limit of {MAX_UNROLLED:,}",
                    hint="storch_nb unrolls loops into one graph: use fewer iterations, or vectorize "
                    "(e.g. one site with a batch of K values instead of K sites)",
                )
            for i in steps:
                inner = {**loopvars, st.var: i}
                self.ops.append(SetOp(st.var, i, st.lineno, st.line))
                self.block(st.body, inner, f"{suffix}[{i}]")
            return
        if isinstance(st, Param):
            if self.open_plates:
                raise StoryError(
                    "a param inside a plate would be one parameter shared by every datapoint",
                    hint="declare it before the plate (parameters are global), e.g. `w = param(0.0)`",
                )
            name = self.unique(st.target + suffix)
            for n in st.expr.names:
                if n in self.scope:
                    raise StoryError(
                        "a param's initial value cannot depend on other story values",
                        hint="give a number or a tensor, e.g. `x = param(torch.zeros(3))`",
                        col=st.line.find(n),
                    )
            self.params[st.target] = ParamRef(name, "story", st.lineno, st.expr, line=st.line)
            self.add_node(name, "param", st.lineno, ())
            self.scope[st.target] = (name, self.param_rank, frozenset({0}) if self.param_rank else frozenset())
            self.static.pop(st.target, None)
            return
        if isinstance(st, Assign):
            fn, parents = self.compile(st.expr, lv)
            name = self.unique(st.target + suffix)
            self.add_node(name, "deterministic", st.lineno, parents)
            self.ops.append(StepOp(st.target, name, st.lineno, st.line, fn))
            self.scope[st.target] = (name, fn.rank, fn.dims)
            # values known before the run (loop bounds may use them)
            if not fn.batched and not fn.unbatched and all(n not in self.params for n in st.expr.names):
                try:
                    self.static[st.target] = self.static_eval(st.expr, loopvars)
                except Exception:
                    self.static.pop(st.target, None)
            else:
                self.static.pop(st.target, None)
            return
        if isinstance(st, Site):
            self.site(st, lv, suffix)
            return
        if isinstance(st, Plate):
            self.plate(st, loopvars, suffix)
            return
        if isinstance(st, Cost):
            fn, parents = self.compile(st.expr, lv)
            k = self.cost_names.setdefault(id(st), len(self.cost_names) + 1)
            base = "cost" if self.n_costs == 1 else f"cost{k}"
            name = self.unique(base + suffix)
            self.add_node(name, "cost", st.lineno, parents)
            op = CostOp(name, st.lineno, st.line, fn, self.upstream_sites(name), frozenset(self.open_plates))
            self.cost_ops.append(op)
            self.ops.append(op)
            return
        raise StoryError(f"unknown statement {type(st).__name__}")  # pragma: no cover

    def site(self, st: Site, lv: set[str], suffix: str) -> None:
        name = self.unique(st.target + suffix)
        text = self.override or st.using or self.est_texts.get(name) or self.est_texts.get(st.target) or self.default
        try:
            est = make_estimator(text)
        except EstimatorError as exc:
            if st.using:
                exc.col = st.line.find("using")
            raise
        dist_fn, parents = self.compile(st.dist, lv)
        args, kwargs = [], []
        for a in st.args:
            fn, ps = self.compile(a, lv)
            args.append(fn)
            parents += ps
        for k, a in st.kwargs:
            fn, ps = self.compile(a, lv)
            kwargs.append((k, fn))
            parents += ps
        static_dist = None
        if st.is_call and not dist_fn.batched and not dist_fn.unbatched:
            try:
                static_dist = eval(dist_fn.code, dist_fn.globals, {})
            except Exception:
                static_dist = None
        arg_rank = max([f.rank for f in (*args, *(f for _, f in kwargs))] + [dist_fn.rank])
        dims: set[int] = set(dist_fn.dims)
        for f in (*args, *(f for _, f in kwargs)):
            dims |= f.dims
        plate = None
        new_plate = est is not None and (est.enumerates or est.plated or est.n is not None)
        if new_plate:
            plate = self.base_rank + self.n_plates
            self.n_plates += 1
            rank = plate + 1
            dims |= {plate}
        else:
            rank = max(arg_rank, self.base_rank, *(d + 1 for d in self.open_plates))
        dims |= set(range(self.base_rank))  # every site draws for every run and sample
        dims |= set(self.open_plates)  # and, inside a plate, for every datapoint
        parents = list(dict.fromkeys(parents))
        self.add_node(name, "stochastic", st.lineno, parents)
        op = SiteOp(
            var=st.target,
            node=name,
            lineno=st.lineno,
            line=st.line,
            dist=dist_fn,
            args=tuple(args),
            kwargs=tuple(kwargs),
            is_call=st.is_call,
            static_dist=static_dist,
            estimator=est,
            arg_rank=arg_rank,
            rank=rank,
            dims=frozenset(dims),
            plate=plate,
            sample_dim=self.sample_dim,
            ancestors=self.upstream_sites(name),
            plates=frozenset(self.open_plates),
            cols=tuple((i, a.col) for i, a in enumerate(st.args)) + tuple((k, a.col) for k, a in st.kwargs),
        )
        if static_dist is not None and est is not None and isinstance(static_dist, type) and issubclass(static_dist, Distribution):
            est.check_class(static_dist, name)  # refuse `pathwise` on Bernoulli before running
        self.site_ops[name] = op
        self.site_index[name] = len(self.site_index)
        self.ops.append(op)
        self.scope[st.target] = (name, rank, frozenset(dims))
        self.static.pop(st.target, None)


    def prune_stacks(self) -> None:
        """Stack after a plate only the names that a later op reads (a VAE's
        per-datapoint values are rarely read after the block)."""
        read_later: set[str] = set()
        for i in range(len(self.ops) - 1, -1, -1):
            op = self.ops[i]
            if isinstance(op, StackOp):
                op.names = tuple((name, r) for name, r in op.names if name in read_later)
            else:
                for fn in _compiled(op):
                    read_later.update(name for name, _ in fn.batched)
                    read_later.update(fn.unbatched)
        self.ops = [op for op in self.ops if not (isinstance(op, StackOp) and not op.names)]

    def plate(self, st: Plate, loopvars: dict[str, int], suffix: str) -> None:
        """A data plate: its datapoint names get a new batch dim for the block;
        after it, every name the block defined is stacked along a first own dim."""
        lv = set(loopvars)
        compiled = [self.compile(a, lv) for a in st.args]
        batch = None
        if st.batch is not None:
            batch = self.static_eval(st.batch, loopvars)
            if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
                raise StoryError(
                    f"a plate's batch must be a positive int, not {batch!r}",
                    col=st.batch.col,
                    hint="give the number of datapoints drawn per run, e.g. `plate(x, batch=32)`",
                )
        if self.override == "enumerate":
            batch = None  # exact(): the expectation over the full data, not over one drawn minibatch
        dim = self.base_rank + self.n_plates
        self.n_plates += 1
        saved = {t: self.scope.get(t) for t in st.targets}
        for t, (fn, parents) in zip(st.targets, compiled):
            node = self.unique(t + suffix)
            self.add_node(node, "deterministic", st.lineno, parents)
            self.scope[t] = (node, dim + 1, frozenset(fn.dims) | {dim})
            self.static.pop(t, None)
            self.ended.pop(t, None)
        self.ops.append(PlateOp(
            targets=st.targets, lineno=st.lineno, line=st.line, col=st.col, fns=tuple(fn for fn, _ in compiled),
            texts=tuple(a.text for a in st.args), dim=dim, batch=batch, reduce=st.reduce, run_dim=self.run_dim,
        ))
        before = dict(self.scope)
        self.open_plates.append(dim)
        try:
            self.block(st.body, loopvars, suffix)
        finally:
            self.open_plates.pop()
        for t, a in zip(st.targets, st.args):
            if saved[t] is None:
                self.scope.pop(t, None)
                self.ended[t] = (st.lineno, a.text)
            else:
                self.scope[t] = saved[t]
        stacked = []
        for name, (node, r, dims) in list(self.scope.items()):
            if before.get(name) is not self.scope[name] and name not in st.targets:
                stacked.append((name, r))
                self.scope[name] = (node, max(r, dim + 1), dims - {dim})
                self.static.pop(name, None)
        if stacked:
            self.ops.append(StackOp(tuple(stacked), dim, st.lineno, st.line))


#: the most statements a story may unroll into (loops included)
MAX_UNROLLED = 10_000


def _compiled(op) -> tuple[Compiled, ...]:
    """The compiled expressions an op evaluates."""
    if isinstance(op, (StepOp, CostOp)):
        return (op.fn,)
    if isinstance(op, SiteOp):
        return (op.dist, *op.args, *(f for _, f in op.kwargs))
    if isinstance(op, PlateOp):
        return op.fns
    return ()


def _count_costs(statements) -> int:
    return sum(isinstance(st, Cost) for st in walk(statements))
