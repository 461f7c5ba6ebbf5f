"""Text to statements: the story language's parser.

The story language is Python's expression grammar plus three statement forms
Python lacks (``x ~ DIST``, ``... using EST`` and ``cost EXPR``). The parser
tokenizes the text with :mod:`tokenize` (which already knows brackets that span
lines, comments and indentation), rewrites those forms into calls of two
reserved functions, parses the result with :mod:`ast` and walks it into
:mod:`storch_nb.story.statements`. Line numbers survive the rewrite, so every
error points at the line the user wrote. Parsing is cached by text.
"""

from __future__ import annotations

import ast
from functools import lru_cache

from ..errors import StorySyntaxError
from .multisample import FORM_HINT as _LME_HINT
from .multisample import LOGMEANEXP as _LOGMEANEXP
from .multisample import calls as _lme_calls
from .multisample import cut as _cut_reductions
from .rewrite import COST as _COST
from .rewrite import SITE as _SITE
from .rewrite import map_col as _map_col
from .rewrite import python_message as _python_message
from .rewrite import rewrite
from .statements import Assign, Cost, Expr, Loop, Param, Plate, Program, Site, Statement

__all__ = ["parse"]

_FORMS = (
    "a story line is one of: `x = EXPR`, `x ~ DIST(ARGS)`, `x ~ DIST(ARGS) using EST`, "
    "`x = param(VALUE)`, `cost EXPR`, `for i in range(K):` or `for x_i in plate(x):` with an indented block"
)
_PLATE_HINT = "write `for x_i in plate(x):` or `for x_i, y_i in plate(x, y, batch=32):` with an indented block"


@lru_cache(maxsize=512)
def parse(text: str) -> Program:
    """Parse story text into a :class:`Program`; raise :class:`StorySyntaxError`."""
    if not isinstance(text, str):
        raise StorySyntaxError(f"a story is text, not {type(text).__name__}")
    lines = tuple(text.splitlines())
    if "\x00" in text:
        row = next(i for i, ln in enumerate(lines, 1) if "\x00" in ln)
        raise StorySyntaxError(
            "the story contains a NUL byte",
            lineno=row,
            line=lines[row - 1].replace("\x00", "\\0"),
            col=lines[row - 1].index("\x00"),
            hint="remove the NUL character (often pasted from a binary file)",
        )
    try:
        return _parse(text, lines)
    except (RecursionError, MemoryError):
        row = _longest_line(lines)
        raise StorySyntaxError(
            "this expression is too deeply nested or too long to read",
            lineno=row,
            line=lines[row - 1] if lines else None,
            hint="split it into several steps (`x1 = ...`, `x2 = x1 + ...`) or build it with torch (e.g. `sum(...)`)",
        ) from None


def _longest_line(lines) -> int | None:
    if not lines:
        return None
    return max(range(len(lines)), key=lambda i: len(lines[i])) + 1


def _parse(text: str, lines: tuple[str, ...]) -> Program:
    rewritten = rewrite(text, lines)
    source, usings, edits = rewritten.source, rewritten.usings, rewritten.edits
    try:
        module = ast.parse(source, mode="exec")
    except SyntaxError as exc:
        row = min(exc.lineno or 1, max(1, len(lines)))
        col = _map_col(edits, row, (exc.offset or 1) - 1)
        raise StorySyntaxError(
            _python_message(exc.msg),
            lineno=row,
            line=lines[row - 1] if 0 < row <= len(lines) else None,
            col=col,
            hint=_FORMS,
        ) from None
    walker = _Walker(lines, usings, edits)
    statements = walker.block(module.body)
    if not walker.has_cost:
        raise StorySyntaxError(
            "the story has no cost",
            hint="add a line `cost EXPR`: the objective is the expectation of the total cost",
        )
    return Program(statements=tuple(statements), lines=lines)


def _free_names(node: ast.AST) -> tuple[str, ...]:
    bound: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.comprehension):
            for t in ast.walk(sub.target):
                if isinstance(t, ast.Name):
                    bound.add(t.id)
        elif isinstance(sub, ast.Lambda):
            a = sub.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
                if arg is not None:
                    bound.add(arg.arg)
    seen: dict[str, None] = {}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id not in bound:
            seen.setdefault(sub.id, None)
    return tuple(seen)


class _Walker:
    """Walks Python's AST of the rewritten story into story statements."""

    def __init__(self, lines: tuple[str, ...], usings: dict[int, tuple[str, int]], edits) -> None:
        self.lines = lines
        self.edits = edits
        self.usings = usings
        self.has_cost = False
        self.loops = 0  # `for range` loops open around the statement being read
        self.reductions = [0]  # `logmeanexp` calls cut out of costs so far (numbers their hidden names)

    def error(self, message: str, node: ast.AST, hint: str | None = _FORMS) -> StorySyntaxError:
        row = getattr(node, "lineno", None)
        return StorySyntaxError(
            message,
            lineno=row,
            line=self.lines[row - 1] if row and row <= len(self.lines) else None,
            col=_map_col(self.edits, row, node.col_offset) if row else None,
            hint=hint,
        )

    def expr(self, node: ast.expr) -> Expr:
        for call in _lme_calls(node):
            raise self.error(f"`{_LOGMEANEXP}(...)` can be used only in a cost", call,
                             hint=f"it reduces over a site's particles: {_LME_HINT}; a step may compute EXPR")
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and sub.id in (_SITE, _COST):
                raise self.error("`~` and `cost` can only start a statement", sub)
            if isinstance(sub, (ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)):
                raise self.error("this construct cannot be used in a story expression", sub)
        tree = ast.Expression(body=node)
        ast.fix_missing_locations(tree)
        try:
            code = compile(tree, f"<story line {node.lineno}>", "eval")
        except SyntaxError as exc:  # e.g. `f = *a`: ast.parse accepts it, compile does not
            raise self.error(_python_message(exc.msg), node) from None
        return Expr(
            text=ast.unparse(node),
            node=node,
            code=code,
            names=_free_names(node),
            lineno=node.lineno,
            col=_map_col(self.edits, node.lineno, node.col_offset),
        )

    def block(self, body: list[ast.stmt]) -> list[Statement]:
        out: list[Statement] = []
        for node in body:
            st = self.statement(node)
            if st is not None:
                out.append(st)
        return out

    def statement(self, node: ast.stmt) -> Statement | None:
        if isinstance(node, ast.Pass):
            return None
        row = node.lineno
        line = self.lines[row - 1]
        if isinstance(node, ast.Expr):
            return self.cost(node, row, line)
        if isinstance(node, ast.AugAssign):
            if not isinstance(node.target, ast.Name):
                raise self.error("a step assigns to one plain name", node)
            value = ast.BinOp(left=ast.Name(id=node.target.id, ctx=ast.Load()), op=node.op, right=node.value)
            ast.copy_location(value, node.value)
            ast.copy_location(value.left, node.target)
            return Assign(lineno=row, line=line, target=node.target.id, expr=self.expr(value))
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            return self.assign(node, row, line)
        if isinstance(node, ast.For):
            it = node.iter
            if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "plate":
                return self.plate(node, row, line)
            return self.loop(node, row, line)
        raise self.error(f"`{type(node).__name__.lower()}` statements are not part of the story language", node)

    def cost(self, node: ast.Expr, row: int, line: str) -> Cost:
        """``cost EXPR`` (rewritten as a call); any other expression alone is an error."""
        call = node.value
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == _COST:
            if len(call.args) != 1 or call.keywords:
                raise self.error("`cost` takes one expression", node, hint="write `cost f` or `cost(f)`")
            self.has_cost = True
            body, reductions = _cut_reductions(
                call.args[0], self.expr, self.error, lambda n: _map_col(self.edits, n.lineno, n.col_offset),
                self.reductions)
            return Cost(lineno=row, line=line, expr=self.expr(body), reductions=reductions)
        raise self.error(
            "an expression on its own line does nothing",
            node,
            hint="did you mean `cost EXPR` or `x = EXPR`?",
        )

    def assign(self, node: ast.Assign | ast.AnnAssign, row: int, line: str) -> Statement | None:
        """``x = EXPR``, ``x = param(VALUE)`` or (rewritten) ``x ~ DIST``."""
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if len(targets) != 1 or not isinstance(targets[0], ast.Name):
            raise self.error(
                "a step assigns to one plain name",
                node,
                hint="write one step per line, e.g. `x = a + b`",
            )
        target = targets[0].id
        if target in ("param", "cost", "range", "plate", _LOGMEANEXP, _SITE, _COST):
            raise self.error(f"`{target}` is a reserved word of the story language", targets[0], hint="pick another name")
        value = node.value
        if value is None:
            raise self.error("an annotation alone defines nothing", node)
        called = value.func.id if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) else None
        if called == _SITE:
            return self.site(target, value.args[0], row, line) if value.args else None
        if called == "param":
            if len(value.args) != 1 or value.keywords:
                raise self.error(
                    "`param` takes one value",
                    value,
                    hint="write `x = param(1.0)` or `x = param(torch.zeros(3))`",
                )
            return Param(lineno=row, line=line, target=target, expr=self.expr(value.args[0]))
        return Assign(lineno=row, line=line, target=target, expr=self.expr(value))

    def loop(self, node: ast.For, row: int, line: str) -> Loop:
        """``for i in range(ARGS):`` and its block."""
        it = node.iter
        if not isinstance(node.target, ast.Name):
            raise self.error("a loop variable is one name", node.target, hint="write `for i in range(K):`")
        if not (
            isinstance(it, ast.Call)
            and isinstance(it.func, ast.Name)
            and it.func.id == "range"
            and 1 <= len(it.args) <= 3
            and not it.keywords
        ):
            raise self.error("a story loop runs over `range(...)`", it, hint="write `for i in range(K):`")
        if node.orelse:
            raise self.error("a story loop has no `else` block", node.orelse[0])
        self.loops += 1
        try:
            body = self.block(node.body)
        finally:
            self.loops -= 1
        return Loop(
            lineno=row,
            line=line,
            var=node.target.id,
            range_args=tuple(self.expr(a) for a in it.args),
            body=tuple(body),
        )

    def plate(self, node: ast.For, row: int, line: str) -> Plate:
        """``for x_i, y_i in plate(x, y, batch=B, reduce="mean"):`` and its block."""
        call = node.iter
        assert isinstance(call, ast.Call)
        if self.loops:
            raise self.error(
                "a plate cannot be inside a `for range` loop",
                node,
                hint="put the loop inside the plate: `for x_i in plate(x):` then, indented, `for t in range(T):`",
            )
        tgt = node.target
        names = tgt.elts if isinstance(tgt, ast.Tuple) else [tgt]
        if not names or not all(isinstance(n, ast.Name) for n in names):
            raise self.error("a plate binds one name per tensor it runs over", tgt, hint=_PLATE_HINT)
        targets = tuple(n.id for n in names)  # type: ignore[attr-defined]
        for n, t in zip(names, targets):
            if t in ("param", "cost", "range", "plate", _LOGMEANEXP, _SITE, _COST):
                raise self.error(f"`{t}` is a reserved word of the story language", n, hint="pick another name")
        if len(set(targets)) != len(targets):
            raise self.error("a plate binds each name once", tgt, hint=_PLATE_HINT)
        if not call.args:
            raise self.error("`plate` needs the data to run over", call, hint=_PLATE_HINT)
        for a in call.args:
            if isinstance(a, ast.Starred):
                raise self.error("`*args` is not supported in a plate", a, hint="name each tensor")
        if len(call.args) != len(targets):
            raise self.error(
                f"the plate runs over {len(call.args)} tensor{'s' * (len(call.args) != 1)} "
                f"but binds {len(targets)} name{'s' * (len(targets) != 1)}",
                tgt,
                hint="bind one name per tensor: `for x_i, y_i in plate(x, y):`",
            )
        batch, reduce = None, "mean"
        for kw in call.keywords:
            if kw.arg == "batch":
                batch = self.expr(kw.value)
            elif kw.arg == "reduce":
                if not (isinstance(kw.value, ast.Constant) and kw.value.value in ("mean", "sum")):
                    raise self.error(
                        "a plate's `reduce` is \"mean\" or \"sum\"",
                        kw.value,
                        hint='`reduce="mean"` averages the costs inside over the datapoints (the default), '
                        '`reduce="sum"` adds them (a log-likelihood over a data set)',
                    )
                reduce = kw.value.value
            else:
                raise self.error(
                    f"`plate` has no option {kw.arg!r}" if kw.arg else "`**kwargs` is not supported in a plate",
                    kw.value,
                    hint="its options are batch=B (datapoints drawn per run) and reduce=\"mean\"|\"sum\"",
                )
        if node.orelse:
            raise self.error("a plate has no `else` block", node.orelse[0])
        body = self.block(node.body)
        return Plate(
            lineno=row,
            line=line,
            targets=targets,
            args=tuple(self.expr(a) for a in call.args),
            batch=batch,
            reduce=reduce,
            body=tuple(body),
            col=_map_col(self.edits, row, call.col_offset),
        )

    def site(self, target: str, dist: ast.expr, row: int, line: str) -> Site:
        using = self.usings.get(row)
        if using is not None:
            try:
                ast.parse(using[0], mode="eval")
            except SyntaxError:
                raise StorySyntaxError(
                    f"cannot read the estimator `{using[0]}`",
                    lineno=row,
                    line=line,
                    col=using[1],
                    hint="write a name or a call with keyword options, e.g. `using score(baseline='rloo')`",
                ) from None
        if isinstance(dist, ast.Call):
            for a in dist.args:
                if isinstance(a, ast.Starred):
                    raise self.error("`*args` is not supported in a distribution", a, hint="pass the arguments one by one")
            for k in dist.keywords:
                if k.arg is None:
                    raise self.error("`**kwargs` is not supported in a distribution", k.value, hint="pass the arguments by name")
            return Site(
                lineno=row,
                line=line,
                target=target,
                dist=self.expr(dist.func),
                args=tuple(self.expr(a) for a in dist.args),
                kwargs=tuple((k.arg, self.expr(k.value)) for k in dist.keywords),
                is_call=True,
                using=using[0] if using else None,
            )
        return Site(lineno=row, line=line, target=target, dist=self.expr(dist), using=using[0] if using else None)
