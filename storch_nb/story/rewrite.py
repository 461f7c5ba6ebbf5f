"""The story forms Python lacks, rewritten into Python calls token by token.

``x ~ DIST`` becomes ``x = __storch_site__(DIST)``, ``... using EST`` is cut
off (its text kept by line), and ``cost EXPR`` becomes ``__storch_cost__(EXPR)``.
Every line stays in place and the edits are recorded, so that a column of the
rewritten source maps back to the column the user wrote (:func:`map_col`).
"""

from __future__ import annotations

import io
import tokenize
from dataclasses import dataclass, field

from ..errors import StorySyntaxError

__all__ = ["SITE", "COST", "Rewritten", "rewrite", "map_col"]

SITE = "__storch_site__"
COST = "__storch_cost__"
_NOT_A_COST = ("=", ".", "[", ",", "+=", "-=", "*=", "/=")  # `cost = ...`, `cost.x`: a name called cost


@dataclass
class Rewritten:
    """The Python source, the ``using`` texts by line (text, column) and the edits
    (row -> [(column, removed length, inserted length)])."""

    source: str
    usings: dict[int, tuple[str, int]] = field(default_factory=dict)
    edits: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)


def rewrite(text: str, lines: tuple[str, ...]) -> Rewritten:
    """Rewrite the story forms into Python calls, keeping every line in place."""
    replacements: list[tuple[tuple[int, int], tuple[int, int], str]] = []
    usings: dict[int, tuple[str, int]] = {}
    for toks in _logical_lines(_tokens(text, lines)):
        first = toks[0]
        if len(toks) >= 2 and toks[1].type == tokenize.OP and toks[1].string == "~":
            replacements += _site(toks, lines, usings)
        elif first.type == tokenize.NAME and first.string == "cost" and not (
            len(toks) >= 2 and toks[1].type == tokenize.OP and toks[1].string in _NOT_A_COST
        ):
            replacements += _cost(toks, lines)
    source, edits = _apply(text, replacements)
    return Rewritten(source, usings, edits)


def _tokens(text: str, lines: tuple[str, ...]) -> list[tokenize.TokenInfo]:
    """Python's tokens of the story; a StorySyntaxError for an unclosed bracket or bad indentation."""
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
        if opened:  # the text ended inside a bracket: point at the bracket
            row, col = opened[-1].start
            msg = f"this `{opened[-1].string}` is never closed"
        row = min(row, len(lines)) or 1
        raise StorySyntaxError(
            msg,
            lineno=row,
            line=lines[row - 1] if lines else None,
            col=col,
            hint="close every '(', '[' and '{' that the statement opens",
        ) from None
    except (IndentationError, SyntaxError) as exc:
        row = exc.lineno or 1
        raise StorySyntaxError(
            python_message(exc.msg),
            lineno=row,
            line=lines[row - 1] if 0 < row <= len(lines) else None,
            col=(exc.offset or 1) - 1,
            hint="indent only the block of a `for` loop, by the same amount on every line",
        ) from None
    return tokens


def _logical_lines(tokens: list[tokenize.TokenInfo]) -> list[list[tokenize.TokenInfo]]:
    """The tokens of each logical line (a bracket may span lines), without layout tokens."""
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
    return logical


def _error(message: str, tok: tokenize.TokenInfo, lines, col: int | None = None, hint: str = "") -> StorySyntaxError:
    row = tok.start[0]
    return StorySyntaxError(message, lineno=row, line=lines[row - 1], col=tok.start[1] if col is None else col,
                            hint=hint)


def _site(toks: list[tokenize.TokenInfo], lines, usings: dict) -> list:
    """``x ~ DIST [using EST]`` -> ``x = __storch_site__(DIST)``, the ``using`` text kept."""
    first = toks[0]
    if first.type != tokenize.NAME:
        raise _error("the left side of `~` must be a name", first, lines, hint="write `x ~ Normal(0, 1)`")
    rest = toks[2:]
    if not rest:
        raise _error("`~` needs a distribution on its right", first, lines, col=toks[1].end[1],
                     hint="write `x ~ Normal(0, 1)`")
    using_at = _top_level_using(rest)
    last = rest[-1]
    out = [(toks[1].start, toks[1].end, f"= {SITE}(")]
    if using_at is None:
        return [*out, (last.end, last.end, ")")]
    utok = rest[using_at]
    est = rest[using_at + 1 :]
    if not est:
        raise _error("`using` needs an estimator", utok, lines, col=utok.end[1],
                     hint="write e.g. `using score(baseline='rloo')`; storch_nb.estimators() lists the names")
    usings[first.start[0]] = (_span(lines, est[0].start, est[-1].end), est[0].start[1])
    newlines = "\n" * (last.end[0] - utok.start[0])
    return [*out, (utok.start, last.end, ")" + newlines)]


def _top_level_using(rest: list[tokenize.TokenInfo]) -> int | None:
    """The position of ``using`` outside any bracket, or None."""
    depth = 0
    for i, tok in enumerate(rest):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif depth == 0 and tok.type == tokenize.NAME and tok.string == "using":
            return i
    return None


def _cost(toks: list[tokenize.TokenInfo], lines) -> list:
    """``cost EXPR`` -> ``__storch_cost__(EXPR)``."""
    first = toks[0]
    if len(toks) == 1:
        raise _error("`cost` needs an expression", first, lines, col=first.end[1],
                     hint="write `cost f` with the quantity whose expectation you want")
    return [(first.start, first.end, f"{COST}("), (toks[-1].end, toks[-1].end, ")")]


def _apply(text: str, replacements: list) -> tuple[str, dict[int, list[tuple[int, int, int]]]]:
    """Apply the replacements from the end (earlier positions stay valid); return the
    source and the edits made per row."""
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
            src_lines[r0 - 1 : r1] = [head + "\n"] + ["\n"] * (r1 - r0 - 1) + [tail]
    return "".join(src_lines), edits


def _span(lines, start, end) -> str:
    (r0, c0), (r1, c1) = start, end
    if r0 == r1:
        return lines[r0 - 1][c0:c1]
    parts = [lines[r0 - 1][c0:]] + list(lines[r0 : r1 - 1]) + [lines[r1 - 1][:c1]]
    return " ".join(p.strip() for p in parts)


def map_col(edits, row: int, col: int) -> int:
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


def python_message(msg: str) -> str:
    """Python's syntax error message, in the story's words."""
    msg = msg.replace(SITE, "~").replace(COST, "cost")
    return msg[0].lower() + msg[1:] if msg else "invalid syntax"
