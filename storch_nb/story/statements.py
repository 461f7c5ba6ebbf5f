"""The statements a story is made of, as the parser produces them.

Each statement keeps its 1-based line number within the story text and the
compiled code of its expressions, so that running a story never re-parses it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from types import CodeType


@dataclass(frozen=True)
class Expr:
    """A Python expression of the story: its text, AST, code and free names."""

    text: str
    node: ast.expr
    code: CodeType
    names: tuple[str, ...]  # free names it reads, in order of first use
    lineno: int
    col: int


@dataclass(frozen=True)
class Statement:
    lineno: int
    line: str  # the source text of the statement's first line


@dataclass(frozen=True)
class Assign(Statement):
    """``x = EXPR``: a deterministic step."""

    target: str
    expr: Expr


@dataclass(frozen=True)
class Param(Statement):
    """``x = param(VALUE)``: a learnable leaf."""

    target: str
    expr: Expr  # VALUE


@dataclass(frozen=True)
class Site(Statement):
    """``x ~ DIST(ARGS) [using EST]``: a stochastic step.

    When DIST(ARGS) is a plain call, ``dist`` is the callee and ``args`` /
    ``kwargs`` its arguments, so the engine can pad batched arguments
    correctly; otherwise ``call`` is None and ``dist`` is the whole expression
    (a Distribution instance, or a function returning one).
    """

    target: str
    dist: Expr
    args: tuple[Expr, ...] = ()
    kwargs: tuple[tuple[str, Expr], ...] = ()
    is_call: bool = False
    using: str | None = None  # estimator text after ``using``


@dataclass(frozen=True)
class Reduction:
    """``logmeanexp(EXPR, over=z)`` inside a cost: ``name`` (a hidden story value)
    is the log of the mean of ``exp(EXPR)`` over the particles of site ``over``."""

    name: str  # the hidden value the cost's expression reads in place of the call
    expr: Expr  # EXPR, for one particle
    over: str  # the site's story name
    over_col: int  # column of ``over=...`` (carets)
    col: int  # column of the call


@dataclass(frozen=True)
class Cost(Statement):
    """``cost EXPR``: adds EXPR to the objective. Each ``logmeanexp(...)`` call in
    it is cut out into a :class:`Reduction` (innermost first) and read by name."""

    expr: Expr
    reductions: tuple[Reduction, ...] = ()


@dataclass(frozen=True)
class Loop(Statement):
    """``for VAR in range(ARGS):`` and its indented block."""

    var: str
    range_args: tuple[Expr, ...]
    body: tuple[Statement, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Plate(Statement):
    """``for x_i, y_i in plate(x, y[, batch=B][, reduce="mean"|"sum"]):`` and its block.

    The block is written for ONE datapoint: ``x_i`` is one entry of ``x`` along
    its first dimension. ``batch`` (an expression known before the run) draws
    that many datapoints per run; ``reduce`` says how the costs inside are
    combined over the datapoints (``"mean"`` or ``"sum"``).
    """

    targets: tuple[str, ...]
    args: tuple[Expr, ...]
    batch: Expr | None = None
    reduce: str = "mean"
    body: tuple[Statement, ...] = field(default_factory=tuple)
    col: int = 0  # column of ``plate`` on the line (for carets)


@dataclass(frozen=True)
class Program:
    """A parsed story: its statements and its source lines."""

    statements: tuple[Statement, ...]
    lines: tuple[str, ...]
