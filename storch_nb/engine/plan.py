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
from ..story.statements import Assign, Cost, Expr, Loop, Param, Program, Site, Statement
from .helpers import BUILTINS, HELPERS
from .vectorize import Compiled, has_scope, is_elementwise

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
        for i, a in enumerate(args):
            if type(a) in (float, int):
                args[i] = self.number(a, ex)
        for k, a in kwargs.items():
            if type(a) in (float, int):
                kwargs[k] = self.number(a, ex)
        if not (isinstance(cls, type) and issubclass(cls, Distribution)):
            d = cls(*args, **kwargs)
            if not isinstance(d, Distribution):
                raise StoryError(
                    f"`~` needs a distribution, got {type(d).__name__}",
                    hint="write e.g. `x ~ Normal(0, 1)`; any torch.distributions class works",
                )
            return d
        try:
            return cls(*args, **kwargs, validate_args=ex.validate)
        except (ValueError, TypeError) as exc:
            raise StoryError(
                f"invalid arguments for {cls.__name__}: {exc}",
                hint=f"see help(torch.distributions.{cls.__name__}) for its arguments and their constraints",
            ) from None

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
            ex.new_plate(self, est.n, "mean")
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
        self.constants: dict[str, torch.Tensor] = {}  # namespace tensors read as constants
        self.n_plates = 0
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

    def compile(self, expr: Expr, loopvars: set[str]) -> tuple[Compiled, list[str]]:
        """Compile one expression; return it with the graph nodes it reads."""
        parents: list[str] = []
        batched: list[tuple[str, int]] = []
        unbatched: list[str] = []
        rank = 0
        dims: set[int] = set()
        const_own = 0
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
        fn = Compiled(
            code=expr.code,
            globals=self.globals,
            rank=rank,
            batched=tuple(batched),
            unbatched=tuple(unbatched),
            const_own=const_own,
            elementwise=is_elementwise(expr.node, self.resolve_object),
            scoped=has_scope(expr.node),
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
        if isinstance(st, Cost):
            fn, parents = self.compile(st.expr, lv)
            k = self.cost_names.setdefault(id(st), len(self.cost_names) + 1)
            base = "cost" if self.n_costs == 1 else f"cost{k}"
            name = self.unique(base + suffix)
            self.add_node(name, "cost", st.lineno, parents)
            op = CostOp(name, st.lineno, st.line, fn, self.upstream_sites(name))
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
            rank = max(arg_rank, self.base_rank)
        dims |= set(range(self.base_rank))  # every site draws for every run and sample
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
        )
        if static_dist is not None and est is not None and isinstance(static_dist, type) and issubclass(static_dist, Distribution):
            est.check_class(static_dist, name)  # refuse `pathwise` on Bernoulli before running
        self.site_ops[name] = op
        self.site_index[name] = len(self.site_index)
        self.ops.append(op)
        self.scope[st.target] = (name, rank, frozenset(dims))
        self.static.pop(st.target, None)


#: the most statements a story may unroll into (loops included)
MAX_UNROLLED = 10_000


def _count_costs(statements) -> int:
    n = 0
    for st in statements:
        if isinstance(st, Cost):
            n += 1
        elif isinstance(st, Loop):
            n += _count_costs(st.body)
    return n
