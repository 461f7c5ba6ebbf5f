"""``logmeanexp(EXPR, over=z)``: the story form of a multi-sample objective.

A cost such as ``cost -logmeanexp(log_w, over=z)`` (the IWAE bound) reduces
over the K particles of site ``z``. The parser cuts every such call out of the
cost into a :class:`~.statements.Reduction` (innermost first, so that one may
be nested in another) and leaves a hidden name in its place; the engine
computes the reduction as a step of its own, where estimators built for
multi-sample objectives (``vimco``, ``dreg``) can see the particles' values.
Anywhere but a cost the call is an error.
"""

from __future__ import annotations

import ast
from collections.abc import Callable

from .statements import Expr, Reduction

__all__ = ["LOGMEANEXP", "FORM_HINT", "calls", "cut"]

LOGMEANEXP = "logmeanexp"
FORM_HINT = ("write `cost -logmeanexp(EXPR, over=z)`, EXPR the value of one particle and z a site drawn with "
             "`using EST(n=K)`")


def calls(node: ast.AST) -> list[ast.Call]:
    """The ``logmeanexp(...)`` calls in an expression."""
    return [n for n in ast.walk(node)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == LOGMEANEXP]


def cut(node: ast.expr, make_expr: Callable[[ast.expr], Expr], error: Callable, col: Callable[[ast.AST], int],
        counter: list[int]) -> tuple[ast.expr, tuple[Reduction, ...]]:
    """``node`` with each ``logmeanexp`` call replaced by a hidden name, and the
    reductions those names stand for. ``error(message, node, hint)`` makes the
    syntax error; ``counter`` numbers the hidden names across the story."""
    found: list[Reduction] = []

    class Cut(ast.NodeTransformer):
        def visit_Call(self, call: ast.Call) -> ast.AST:
            self.generic_visit(call)  # the innermost reductions first
            if not (isinstance(call.func, ast.Name) and call.func.id == LOGMEANEXP):
                return call
            over = [k for k in call.keywords if k.arg == "over"]
            if len(call.args) != 1 or len(over) != 1 or len(call.keywords) != 1:
                raise error("`logmeanexp` takes one expression and `over=` a site", call, FORM_HINT)
            if not isinstance(over[0].value, ast.Name):
                raise error("`over=` names a site, as a plain name", over[0].value, FORM_HINT)
            counter[0] += 1
            name = f"__logmeanexp{counter[0]}__"
            found.append(Reduction(name=name, expr=make_expr(call.args[0]), over=over[0].value.id,
                                   over_col=col(over[0].value), col=col(call)))
            return ast.copy_location(ast.Name(id=name, ctx=ast.Load()), call)

    body = Cut().visit(node)
    ast.fix_missing_locations(body)
    return body, tuple(found)
