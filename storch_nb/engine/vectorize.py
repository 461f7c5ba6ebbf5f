"""Running an expression written for one draw on batched values.

Every value of a run carries a static *batch rank* ``r``: its first ``r``
dimensions are batch dimensions (runs, samples, nested plates, in that order;
a dimension the value does not depend on has size 1), the rest are its *own*
shape, the shape the story sees for one draw.

Two ways to evaluate a step:

* elementwise steps (arithmetic and the helpers in ``ELEMENTWISE``) run on
  the batched tensors directly, after each batched operand is padded so that
  its own dimensions line up (right-aligned) with everyone else's;
* any other step (reductions, indexing, modules, unknown functions) runs under
  ``torch.func.vmap`` over the flattened batch dimensions.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

import torch

from .helpers import ELEMENTWISE, ELEMENTWISE_METHODS


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
            return id(resolve(f.id)) in ELEMENTWISE
        if isinstance(f, ast.Attribute):
            if isinstance(f.value, ast.Name) and f.value.id == "torch" and resolve("torch") is torch:
                return id(getattr(torch, f.attr, None)) in ELEMENTWISE
            # tensor method on an elementwise operand
            return f.attr in ELEMENTWISE_METHODS and is_elementwise(f.value, resolve)
    return False


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
            return eval(self.code, self.globals, env if local is None else local)
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
