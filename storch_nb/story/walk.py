"""The one walker over a program's statements (blocks of loops and plates included)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .statements import Assign, Cost, Expr, Loop, Param, Plate, Site, Statement

__all__ = ["walk", "expressions", "defined_names", "free_names"]


def walk(statements: Iterable[Statement]) -> Iterator[Statement]:
    """Every statement, depth first in story order: a loop or a plate, then its block."""
    for st in statements:
        yield st
        if isinstance(st, (Loop, Plate)):
            yield from walk(st.body)


def expressions(st: Statement) -> Iterator[Expr]:
    """The expressions a statement holds itself (not those of its block)."""
    if isinstance(st, Cost):
        for r in st.reductions:
            yield r.expr
        yield st.expr
    elif isinstance(st, (Assign, Param)):
        yield st.expr
    elif isinstance(st, Site):
        yield st.dist
        yield from st.args
        for _, a in st.kwargs:
            yield a
    elif isinstance(st, Loop):
        yield from st.range_args
    elif isinstance(st, Plate):
        yield from st.args
        if st.batch is not None:
            yield st.batch


def defined_names(statements: Iterable[Statement]) -> dict[str, int]:
    """Each name the story defines (steps, params, sites, loop and plate names) -> the first line defining it."""
    out: dict[str, int] = {}
    for st in walk(statements):
        if isinstance(st, (Assign, Param, Site)):
            out.setdefault(st.target, st.lineno)
        elif isinstance(st, Loop):
            out.setdefault(st.var, st.lineno)
        elif isinstance(st, Plate):
            for t in st.targets:
                out.setdefault(t, st.lineno)
    return out


def free_names(statements: Iterable[Statement]) -> set[str]:
    """Every name the story's expressions read."""
    return {n for st in walk(statements) for e in expressions(st) for n in e.names}
