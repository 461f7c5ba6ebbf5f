"""Compiling a parsed story into a plan: loops unrolled, names resolved, the
graph built, every expression compiled for batched values.

A plan depends on the story text, the namespace values the story reads, the
estimator choice, device, dtype and whether parameters are batched (``runs >
1``, or per-sample standard errors); it does not depend on the sample count,
so one plan serves every call of ``run``/``surrogate`` with the same setting.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn
from torch.distributions import Distribution

from ..errors import EstimatorError, StoryError
from ..estimators import make_estimator
from ..graph import Graph
from ..story.statements import Assign, Cost, Loop, Param, Plate, Reduction, Site, Statement
from .names import Resolver
from .ops import CostOp, ParamRef, PlateOp, ReduceOp, SetOp, SiteOp, StackOp, StepOp, dist_args
from .vectorize import Compiled

__all__ = ["Plan", "Planner", "dist_args", "MAX_UNROLLED"]


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


class Planner(Resolver):
    """Walks a program once, unrolling loops, and produces a :class:`Plan`."""

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
        for op in self.site_ops.values():
            est = op.estimator
            if est is not None and est.multi_sample and op.node not in self.reduced_sites:
                raise EstimatorError(
                    f"`{est.name}` estimates the gradient of a multi-sample objective, but no cost reduces over "
                    f"the particles of site `{op.var}`",
                    lineno=op.lineno, line=op.line, col=op.line.find("using"),
                    hint=f"write the cost with `logmeanexp(EXPR, over={op.var})` (the IWAE bound), or use "
                    f"rloo(n=K) or pathwise(n=K) for a cost per particle")
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
        handler = {Loop: self.loop, Param: self.param, Assign: self.assign, Site: self.site, Plate: self.plate,
                   Cost: self.cost}.get(type(st))
        if handler is None:  # pragma: no cover
            raise StoryError(f"unknown statement {type(st).__name__}")
        handler(st, loopvars, suffix)

    def loop(self, st: Loop, loopvars: dict[str, int], suffix: str) -> None:
        """``for i in range(K):``, unrolled."""
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

    def param(self, st: Param, loopvars: dict[str, int], suffix: str) -> None:
        """``x = param(VALUE)``: a learnable leaf."""
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

    def assign(self, st: Assign, loopvars: dict[str, int], suffix: str) -> None:
        """``x = EXPR``: a deterministic step."""
        fn, parents = self.compile(st.expr, set(loopvars))
        name = self.unique(st.target + suffix)
        self.add_node(name, "deterministic", st.lineno, parents)
        self.ops.append(StepOp(st.target, name, st.lineno, st.line, fn))
        self.scope[st.target] = (name, fn.rank, fn.dims)
        self.static.pop(st.target, None)
        # values known before the run (loop bounds may use them)
        if not fn.batched and not fn.unbatched and all(n not in self.params for n in st.expr.names):
            try:
                self.static[st.target] = self.static_eval(st.expr, loopvars)
            except Exception:  # not known before the run after all: a value of the run, as any other
                pass

    def cost(self, st: Cost, loopvars: dict[str, int], suffix: str) -> None:
        """``cost EXPR``; its ``logmeanexp`` reductions first, each a step of its own."""
        saved = {r.name: self.scope.get(r.name) for r in st.reductions}
        try:
            reductions = tuple(self.reduction(r, st, loopvars, suffix) for r in st.reductions)
            fn, parents = self.compile(st.expr, set(loopvars))
        finally:
            for hidden, before in saved.items():
                if before is None:
                    self.scope.pop(hidden, None)
        k = self.cost_names.setdefault(id(st), len(self.cost_names) + 1)
        base = "cost" if self.n_costs == 1 else f"cost{k}"
        name = self.unique(base + suffix)
        self.add_node(name, "cost", st.lineno, parents)
        op = CostOp(name, st.lineno, st.line, fn, self.upstream_sites(name), frozenset(self.open_plates), reductions)
        for _, site, _ in reductions:
            self.reduced_sites.add(site)
        self.cost_ops.append(op)
        self.ops.append(op)

    def reduction(self, r: Reduction, st: Cost, loopvars: dict[str, int], suffix: str) -> tuple[str, str, int]:
        """``logmeanexp(EXPR, over=z)``: a :class:`ReduceOp` over ``z``'s particles."""
        op = self.site_ops.get(self.scope[r.over][0]) if r.over in self.scope else None
        if op is None:
            what = "a value, not a site" if r.over in self.scope else "not a name of the story"
            raise StoryError(f"`over={r.over}`: `{r.over}` is {what}", col=r.over_col,
                             hint="name the site whose particles to average over, drawn with `using EST(n=K)`, "
                             "e.g. `z ~ Normal(mu, 1) using pathwise(n=5)`")
        est = op.estimator
        if self.override == "enumerate":
            raise StoryError(
                f"exact() does not enumerate the K-tuples of particles that `logmeanexp(..., over={r.over})` averages",
                col=r.col, hint="estimate the objective and its gradient with run(samples=..., runs=...) instead, "
                f"e.g. estimator='pathwise(n=5)' or vimco(n=5) for `{r.over}`")
        if est is not None and (est.plated or est.enumerates):
            raise EstimatorError(
                f"site `{r.over}` uses `{est.text()}`, which draws variants of its own, not K particles to average",
                col=r.over_col, hint=f"draw `{r.over}` with vimco(n=K), dreg(n=K), score(n=K) or pathwise(n=K)")
        if est is None or est.n is None or op.plate is None:
            raise StoryError(
                f"`logmeanexp(..., over={r.over})` needs the particles of site `{r.over}`, drawn once per sample now",
                col=r.over_col, hint=f"draw it with option n: `{r.over} ~ ... using pathwise(n=5)` (or score, vimco, "
                "dreg with n=K)")
        fn, parents = self.compile(r.expr, set(loopvars))
        node = self.unique(f"logmeanexp_{r.over}" + suffix)
        self.add_node(node, "deterministic", st.lineno, parents)
        self.ops.append(ReduceOp(r.name, node, st.lineno, st.line, fn, site=op.node, dim=op.plate))
        self.scope[r.name] = (node, fn.rank, frozenset(fn.dims) - {op.plate})
        return r.name, op.node, op.plate

    def site(self, st: Site, loopvars: dict[str, int], suffix: str) -> None:
        """``x ~ DIST(ARGS) [using EST]``: a stochastic step."""
        lv = set(loopvars)
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
            try:
                est.check_class(static_dist, name)  # refuse `pathwise` on Bernoulli before running
            except EstimatorError as exc:
                if exc.col is None and st.using:
                    exc.col = st.line.find("using")
                raise
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


