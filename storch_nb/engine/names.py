"""Names for the planner: where each name of a story comes from (the story, the
namespace, the helpers), the graph node it stands for, the errors for names
that are not there (yet), and each expression compiled for batched values."""

from __future__ import annotations

import difflib
import re
from typing import Any

import torch
from torch import nn

from ..errors import StoryError, StoryNameError
from ..graph import Graph, Node
from ..story.statements import Cost, Expr, Program
from ..story.walk import defined_names, walk
from .checks import random_call
from .helpers import BUILTINS, HELPERS
from .ops import CostOp, ParamRef, SiteOp
from .vectorize import Compiled, has_scope, is_elementwise, own_reduce, reduced_form

__all__ = ["Resolver"]


class Resolver:
    """The planner's names: the graph it grows, the story names in scope (with
    their batch rank and dims), the namespace values it reads, and every
    expression compiled for batched values (:meth:`compile`)."""

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
        self.reduced_sites: set[str] = set()  # sites whose particles a cost's logmeanexp reduces

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


def _count_costs(statements) -> int:
    return sum(isinstance(st, Cost) for st in walk(statements))
