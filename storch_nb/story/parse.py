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
import io
import tokenize
from functools import lru_cache

from ..errors import StorySyntaxError
from .statements import Assign, Cost, Expr, Loop, Param, Plate, Program, Site, Statement

__all__ = ["parse"]

_SITE = "__storch_site__"
_COST = "__storch_cost__"
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
    source, usings, edits = _rewrite(text, lines)
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


def _python_message(msg: str) -> str:
    msg = msg.replace(_SITE, "~").replace(_COST, "cost")
    return msg[0].lower() + msg[1:] if msg else "invalid syntax"


def _rewrite(text: str, lines: tuple[str, ...]):
    """Rewrite the story forms into Python calls, keeping every line in place.

    Returns the Python source, the ``using`` texts by line, and the edits made
    (row -> list of (col, removed length, inserted length)) to map columns back.
    """
    tokens: list[tokenize.TokenInfo] = []
    opened: list[tokenize.TokenInfo] = []  # brackets not closed yet
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            tokens.append(tok)
            if tok.type == tokenize.OP and tok.string in "([{":
                opened.append(tok)
            elif tok.type == tokenize.OP and tok.string in ")]}" and opened:
                opened.pop()
    except tokenize.TokenError as exc:
        msg, (row, col) = exc.args
        if "multi-line" in msg and opened:
            row, col = opened[-1].start
            msg = f"this `{opened[-1].string}` is never closed"
        row = min(row, len(lines)) or 1
        raise StorySyntaxError(
            "a bracket is never closed" if "multi-line" in msg else msg,
            lineno=row,
            line=lines[row - 1] if lines else None,
            col=col,
            hint="close every '(', '[' and '{' that the statement opens",
        ) from None
    except (IndentationError, SyntaxError) as exc:
        row = exc.lineno or 1
        raise StorySyntaxError(
            _python_message(exc.msg),
            lineno=row,
            line=lines[row - 1] if 0 < row <= len(lines) else None,
            col=(exc.offset or 1) - 1,
            hint="indent only the block of a `for` loop, by the same amount on every line",
        ) from None

    skip = {tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.COMMENT, tokenize.ENCODING}
    logical: list[list[tokenize.TokenInfo]] = []
    current: list[tokenize.TokenInfo] = []
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            if current:
                logical.append(current)
            current = []
        elif tok.type not in skip:
            current.append(tok)

    replacements: list[tuple[tuple[int, int], tuple[int, int], str]] = []
    usings: dict[int, tuple[str, int]] = {}
    for toks in logical:
        first = toks[0]
        if len(toks) >= 2 and toks[1].type == tokenize.OP and toks[1].string == "~":
            if first.type != tokenize.NAME:
                raise StorySyntaxError(
                    "the left side of `~` must be a name",
                    lineno=first.start[0],
                    line=lines[first.start[0] - 1],
                    col=first.start[1],
                    hint="write `x ~ Normal(0, 1)`",
                )
            rest = toks[2:]
            if not rest:
                raise StorySyntaxError(
                    "`~` needs a distribution on its right",
                    lineno=first.start[0],
                    line=lines[first.start[0] - 1],
                    col=toks[1].end[1],
                    hint="write `x ~ Normal(0, 1)`",
                )
            depth = 0
            using_at = None
            for i, tok in enumerate(rest):
                if tok.type == tokenize.OP and tok.string in "([{":
                    depth += 1
                elif tok.type == tokenize.OP and tok.string in ")]}":
                    depth -= 1
                elif depth == 0 and tok.type == tokenize.NAME and tok.string == "using":
                    using_at = i
                    break
            last = rest[-1]
            replacements.append((toks[1].start, toks[1].end, f"= {_SITE}("))
            if using_at is not None:
                utok = rest[using_at]
                est = rest[using_at + 1 :]
                if not est:
                    raise StorySyntaxError(
                        "`using` needs an estimator",
                        lineno=utok.start[0],
                        line=lines[utok.start[0] - 1],
                        col=utok.end[1],
                        hint="write e.g. `using score(baseline='rloo')`; storch_nb.estimators() lists the names",
                    )
                est_text = _span(lines, est[0].start, est[-1].end)
                usings[first.start[0]] = (est_text, est[0].start[1])
                newlines = "\n" * (last.end[0] - utok.start[0])
                replacements.append((utok.start, last.end, ")" + newlines))
            else:
                replacements.append((last.end, last.end, ")"))
        elif (
            first.type == tokenize.NAME
            and first.string == "cost"
            and not (len(toks) >= 2 and toks[1].type == tokenize.OP and toks[1].string in ("=", ".", "[", ",", "+=", "-=", "*=", "/="))
        ):
            if len(toks) == 1:
                raise StorySyntaxError(
                    "`cost` needs an expression",
                    lineno=first.start[0],
                    line=lines[first.start[0] - 1],
                    col=first.end[1],
                    hint="write `cost f` with the quantity whose expectation you want",
                )
            replacements.append((first.start, first.end, f"{_COST}("))
            replacements.append((toks[-1].end, toks[-1].end, ")"))

    # apply from the end so earlier positions stay valid
    src_lines = [ln + "\n" for ln in text.split("\n")]
    edits: dict[int, list[tuple[int, int, int]]] = {}
    for (r0, c0), (r1, c1), new in sorted(replacements, reverse=True):
        if r0 == r1:
            ln = src_lines[r0 - 1]
            src_lines[r0 - 1] = ln[:c0] + new + ln[c1:]
            edits.setdefault(r0, []).append((c0, c1 - c0, len(new)))
        else:  # a `using` clause spanning lines: keep the line count
            head = src_lines[r0 - 1][:c0] + new.rstrip("\n")
            tail = src_lines[r1 - 1][c1:]
            n_new = r1 - r0
            src_lines[r0 - 1 : r1] = [head + "\n"] + ["\n"] * (n_new - 1) + [tail]
    return "".join(src_lines), usings, edits


def _span(lines, start, end) -> str:
    (r0, c0), (r1, c1) = start, end
    if r0 == r1:
        return lines[r0 - 1][c0:c1]
    parts = [lines[r0 - 1][c0:]] + list(lines[r0 : r1 - 1]) + [lines[r1 - 1][:c1]]
    return " ".join(p.strip() for p in parts)


def _map_col(edits, row: int, col: int) -> int:
    """Map a column of the rewritten source back to the user's line."""
    shift = 0
    for c0, removed, inserted in sorted(edits.get(row, ())):
        new_c0 = c0 + shift
        if col < new_c0:
            break
        if col < new_c0 + inserted:
            return c0
        shift += inserted - removed
    return max(0, col - shift)


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
        row = node.lineno
        line = self.lines[row - 1]
        if isinstance(node, ast.Pass):
            return None
        if isinstance(node, ast.Expr):
            call = node.value
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == _COST:
                if len(call.args) != 1 or call.keywords:
                    raise self.error("`cost` takes one expression", node, hint="write `cost f` or `cost(f)`")
                self.has_cost = True
                return Cost(lineno=row, line=line, expr=self.expr(call.args[0]))
            raise self.error(
                "an expression on its own line does nothing",
                node,
                hint="did you mean `cost EXPR` or `x = EXPR`?",
            )
        if isinstance(node, ast.AugAssign):
            if not isinstance(node.target, ast.Name):
                raise self.error("a step assigns to one plain name", node)
            value = ast.BinOp(left=ast.Name(id=node.target.id, ctx=ast.Load()), op=node.op, right=node.value)
            ast.copy_location(value, node.value)
            ast.copy_location(value.left, node.target)
            return Assign(lineno=row, line=line, target=node.target.id, expr=self.expr(value))
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if len(targets) != 1 or not isinstance(targets[0], ast.Name):
                raise self.error(
                    "a step assigns to one plain name",
                    node,
                    hint="write one step per line, e.g. `x = a + b`",
                )
            target = targets[0].id
            if target in ("param", "cost", "range", "plate", _SITE, _COST):
                raise self.error(f"`{target}` is a reserved word of the story language", targets[0], hint="pick another name")
            value = node.value
            if value is None:
                raise self.error("an annotation alone defines nothing", node)
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == _SITE:
                return self.site(target, value.args[0], row, line) if value.args else None
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "param":
                if len(value.args) != 1 or value.keywords:
                    raise self.error(
                        "`param` takes one value",
                        value,
                        hint="write `x = param(1.0)` or `x = param(torch.zeros(3))`",
                    )
                return Param(lineno=row, line=line, target=target, expr=self.expr(value.args[0]))
            return Assign(lineno=row, line=line, target=target, expr=self.expr(value))
        if isinstance(node, ast.For):
            it = node.iter
            if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "plate":
                return self.plate(node, row, line)
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
        raise self.error(f"`{type(node).__name__.lower()}` statements are not part of the story language", node)

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
            if t in ("param", "cost", "range", "plate", _SITE, _COST):
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
