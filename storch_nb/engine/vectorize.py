"""Running an expression written for one draw on batched values.

Every value of a run carries a static *batch rank* ``r``: its first ``r``
dimensions are batch dimensions (runs, samples, nested plates, in that order;
a dimension the value does not depend on has size 1), the rest are its *own*
shape, the shape the story sees for one draw.

Two ways to evaluate a step:

* elementwise steps (arithmetic, the helpers in ``ELEMENTWISE``, and
  ``nn.Module``s built only of layers that act on the last dimension, such as
  an MLP of ``Linear`` and ``Tanh``) run on the batched tensors directly, after
  each batched operand is padded so that its own dimensions line up
  (right-aligned) with everyone else's;
* any other step (reductions, indexing, modules, unknown functions) runs under
  ``torch.func.vmap`` over the flattened batch dimensions.
"""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .helpers import ELEMENTWISE, ELEMENTWISE_METHODS, HELPERS


def pad(v: torch.Tensor, r: int, m: int, own: int, k: int) -> torch.Tensor:
    """View ``v`` (batch rank ``r``, own rank ``own``) at batch rank ``m`` and own rank ``k``."""
    if r == m and own == k:
        return v
    shape = v.shape
    return v.reshape(shape[:r] + (1,) * (m - r) + (1,) * (k - own) + shape[r:])


def is_elementwise(node: ast.AST, resolve) -> bool:
    """True if the expression acts entry by entry.

    ``resolve(name)`` gives the object a free name stands for (or None for a
    story value).
    """
    if isinstance(node, ast.Expression):
        node = node.body
    if isinstance(node, (ast.Name, ast.Constant)):
        return True
    if isinstance(node, ast.BinOp):
        return not isinstance(node.op, ast.MatMult) and is_elementwise(node.left, resolve) and is_elementwise(node.right, resolve)
    if isinstance(node, ast.UnaryOp):
        return not isinstance(node.op, ast.Not) and is_elementwise(node.operand, resolve)
    if isinstance(node, ast.Compare):
        return len(node.ops) == 1 and all(is_elementwise(x, resolve) for x in (node.left, *node.comparators))
    if isinstance(node, ast.Call):
        args_ok = all(is_elementwise(a, resolve) for a in node.args) and all(
            isinstance(k.value, ast.Constant) for k in node.keywords
        )
        if not args_ok:
            return False
        f = node.func
        if isinstance(f, ast.Name):
            obj = resolve(f.id)
            if isinstance(obj, nn.Module):
                return len(node.args) == 1 and not node.keywords and rowwise(obj)
            return id(obj) in ELEMENTWISE
        if isinstance(f, ast.Attribute):
            if isinstance(f.value, ast.Name) and f.value.id == "torch" and resolve("torch") is torch:
                return id(getattr(torch, f.attr, None)) in ELEMENTWISE
            # tensor method on an elementwise operand
            return f.attr in ELEMENTWISE_METHODS and is_elementwise(f.value, resolve)
    return False


#: module types that act on the last dimension(s) of their input and treat every
#: leading dimension as a batch: a story calls them on batched values directly
ROWWISE_MODULES = (
    nn.Sequential, nn.Linear, nn.Identity, nn.LayerNorm, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Softplus, nn.ELU,
    nn.LeakyReLU, nn.GELU, nn.SiLU, nn.LogSigmoid, nn.Hardtanh, nn.ReLU6, nn.Mish, nn.CELU, nn.SELU, nn.Softsign,
    nn.Tanhshrink,
)


def rowwise(module: nn.Module) -> bool:
    """Whether ``module`` is built only of :data:`ROWWISE_MODULES` (exact types:
    a subclass may override ``forward``), so that calling it on a batched value
    equals calling it once per draw (``vmap``), only faster."""
    return all(type(m) in ROWWISE_MODULES for m in module.modules())


_REDUCTIONS = ("sum", "mean")


def own_reduce(x: torch.Tensor, m: int, how: str) -> torch.Tensor:
    """``x.sum()`` / ``x.mean()`` of one draw, on a batched ``x`` (batch rank ``m``):
    over its own dims only (none: ``x`` itself; ``sum(dim=())`` would reduce all)."""
    if x.dim() <= m:
        return x
    dims = tuple(range(m, x.dim()))
    return x.sum(dims) if how == "sum" else x.mean(dims)


def _scalar_constant(node: ast.AST, resolve) -> bool:
    """A number known before the run: a literal, a namespace number, arithmetic and
    elementwise helpers of those (``LATENT * log(2.0)``)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    if isinstance(node, ast.Name):
        v = resolve(node.id)
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _scalar_constant(node.operand, resolve)
    if isinstance(node, ast.BinOp) and not isinstance(node.op, ast.MatMult):
        return _scalar_constant(node.left, resolve) and _scalar_constant(node.right, resolve)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords and len(node.args) == 1:
        return id(resolve(node.func.id)) in ELEMENTWISE and _scalar_constant(node.args[0], resolve)
    return False


def _full_reduction(node: ast.AST, resolve) -> tuple[ast.expr, str] | None:
    """``(X, "sum")`` for ``X.sum()``, ``sum(X)``, ``torch.sum(X)`` (and mean) of an
    elementwise ``X``, with no other arguments; else None."""
    if not isinstance(node, ast.Call) or node.keywords:
        return None
    f = node.func
    if isinstance(f, ast.Attribute) and f.attr in _REDUCTIONS and not node.args:
        if isinstance(f.value, ast.Name) and resolve(f.value.id) is torch:
            return None
        return (f.value, f.attr) if is_elementwise(f.value, resolve) else None
    if len(node.args) != 1 or not is_elementwise(node.args[0], resolve):
        return None
    for how in _REDUCTIONS:
        if isinstance(f, ast.Name) and f.id == how and resolve(f.id) is HELPERS[how]:
            return node.args[0], how
        if (isinstance(f, ast.Attribute) and f.attr == how and isinstance(f.value, ast.Name)
                and resolve(f.value.id) is torch):
            return node.args[0], how
    return None


def reduced_form(node: ast.expr, resolve, rank: int, filename: str):
    """Code that evaluates ``node`` directly on batched values (batch rank ``rank``),
    where ``node`` adds, subtracts, multiplies or divides full reductions of
    elementwise expressions (``(a - b).sum() + LATENT * log(2.0)``, the usual shape
    of a cost) and numbers: each reduction over one draw's own dims
    (:func:`own_reduce`), so the step needs no ``vmap``. None for any other form."""
    tree = copy.deepcopy(node)  # rewritten in place: the story's own AST stays as it is
    found: list[ast.Call] = []

    def combo(n: ast.AST) -> bool:
        if isinstance(n, ast.BinOp) and isinstance(n.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            return combo(n.left) and combo(n.right)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            return combo(n.operand)
        if _full_reduction(n, resolve) is not None:
            found.append(n)  # type: ignore[arg-type]
            return True
        return _scalar_constant(n, resolve)

    if not combo(tree) or not found:
        return None

    class Rewrite(ast.NodeTransformer):
        def visit_Call(self, n: ast.Call) -> ast.AST:
            if any(n is f for f in found):
                x, how = _full_reduction(n, resolve)
                call = ast.Call(func=ast.Name(id="__own_reduce__", ctx=ast.Load()),
                                args=[x, ast.Constant(rank), ast.Constant(how)], keywords=[])
                return ast.copy_location(call, n)
            return self.generic_visit(n)

    body = Rewrite().visit(tree)
    expr = ast.Expression(body=body)
    ast.fix_missing_locations(expr)
    return compile(expr, filename, "eval")


def has_scope(node: ast.AST) -> bool:
    """True if the expression opens a scope of its own (comprehension, lambda)."""
    return any(isinstance(n, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)) for n in ast.walk(node))


@dataclass
class Compiled:
    """One story expression, ready to run on batched values."""

    code: object
    globals: dict = field(repr=False)
    rank: int  # batch rank of the result
    batched: tuple[tuple[str, int], ...]  # (name, batch rank) of batched story values it reads
    unbatched: tuple[str, ...]  # unbatched story values it reads
    const_own: int  # largest own rank among the namespace constants it reads
    elementwise: bool
    scoped: bool  # needs the story values as globals (comprehensions, lambdas)
    #: the code the elementwise path runs where it differs from ``code``
    #: (full reductions over own dims: :func:`reduced_form`)
    direct: object = None

    def __call__(self, env: dict) -> object:
        if self.scoped:
            g = dict(self.globals)
            g.update(env)
            env = g
        if not self.batched:
            return eval(self.code, self.globals, env)
        m = self.rank
        if self.elementwise:
            k = self.const_own
            for name in self.unbatched:
                v = env[name]
                if isinstance(v, torch.Tensor) and v.dim() > k:
                    k = v.dim()
            owns = []
            for name, r in self.batched:
                o = env[name].dim() - r
                owns.append(o)
                if o > k:
                    k = o
            local = None
            for (name, r), o in zip(self.batched, owns):
                if r != m or o != k:
                    if local is None:
                        local = dict(env)
                    local[name] = pad(env[name], r, m, o, k)
            return eval(self.direct or self.code, self.globals, env if local is None else local)
        return self.vmapped(env)

    def vmapped(self, env: dict) -> torch.Tensor:
        m = self.rank
        vals = []
        shapes = []
        for name, r in self.batched:
            v = env[name]
            v = v.reshape(v.shape[:r] + (1,) * (m - r) + v.shape[r:])
            vals.append(v)
            shapes.append(v.shape[:m])
        batch = torch.broadcast_shapes(*shapes)
        n = 1
        for s in batch:
            n *= s
        flat = [v.expand(batch + v.shape[m:]).reshape((n,) + v.shape[m:]) for v in vals]
        names = [name for name, _ in self.batched]
        code, glob = self.code, self.globals

        def one(*xs):
            local = dict(env)
            local.update(zip(names, xs))
            if self.scoped:
                g = dict(glob)
                g.update(local)
                return eval(code, g, g)
            return eval(code, glob, local)

        out = torch.func.vmap(one, in_dims=0, out_dims=0)(*flat)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"a batched step must give a tensor, not {type(out).__name__}")
        return out.reshape(batch + out.shape[1:])
