"""Capturing one pass of a planned story into an FX graph (``compile=True``, see
:mod:`.compiled`): the leaves, modules' tensors, namespace tensors and estimator
state as the graph's inputs; the surrogate, its gradient, one flag and the
estimator state's new tensors as its outputs.

The estimator state is a dict of dicts (moving averages, per-site settings): the
capture runs the pass on a copy (:class:`_Recording` notes which top-level keys it
reads), so the story's own state is untouched; afterwards each compiled call
writes the state the pass left (:func:`write_back`): the same Python values, and
its tensors from the graph's outputs (or unchanged inputs).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from . import surrogate as _surrogate
from .checks import FLAGS
from .cvfit import learners
from .execute import execute, place_constants
from .leaves import differentiated
from .plan import Plan

__all__ = ["Uncompilable", "capture", "prepare", "slim", "signature", "write_back", "at"]

_IMMUTABLE = (int, float, bool, str, bytes, type(None), torch.device, torch.dtype, frozenset, range)


# ------------------------------------------------------------ estimator state
class _In:
    """A state tensor the pass left as it was (the graph input at ``path``)."""

    __slots__ = ("path",)

    def __init__(self, path: tuple) -> None:
        self.path = path


class _Out:
    """A state tensor the pass made: graph output ``i`` (after the fixed ones)."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i


_ABSENT = object()


class Uncompilable(Exception):
    """This pass cannot be compiled (the message says why)."""


class _Recording(dict):
    """The estimator state as a pass sees it, remembering which top-level keys it used."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.used: set = set()

    def get(self, key, default=None):
        self.used.add(key)
        return super().get(key, default)

    def setdefault(self, key, default=None):
        self.used.add(key)
        return super().setdefault(key, default)

    def pop(self, key, *default):
        self.used.add(key)
        return super().pop(key, *default)

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)

    def __setitem__(self, key, value) -> None:
        self.used.add(key)
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self.used.add(key)
        super().__delitem__(key)

    def __contains__(self, key) -> bool:
        self.used.add(key)
        return super().__contains__(key)

    def __iter__(self):
        raise Uncompilable("an estimator walks the whole estimator state")


def _tensors(obj: Any, path: tuple, out: list) -> list:
    """The tensors in dicts, lists and tuples of ``obj``: (path, tensor) pairs, in order."""
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, path + (k,), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, path + (i,), out)
    return out


def _copy(obj: Any, path: tuple, swap: dict) -> Any:
    """``obj`` with fresh dicts, lists and tuples, and the tensors at ``swap``'s paths swapped."""
    if isinstance(obj, torch.Tensor):
        return swap.get(path, obj)
    if isinstance(obj, dict):
        return {k: _copy(v, path + (k,), swap) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(v, path + (i,), swap) for i, v in enumerate(obj))
    return obj


def _template(obj: Any, inputs: dict[int, tuple], new: list) -> Any:
    """The state after the pass, tensors replaced by markers (``new`` gets those it made)."""
    if isinstance(obj, torch.Tensor):
        path = inputs.get(id(obj))
        if path is not None:
            return _In(path)
        new.append(obj.detach())
        return _Out(len(new) - 1)
    if isinstance(obj, dict):
        return {k: _template(v, inputs, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_template(v, inputs, new) for v in obj)
    if isinstance(obj, _IMMUTABLE):
        return obj
    raise Uncompilable(f"the estimator state holds a {type(obj).__name__}")


def _fill(tpl: Any, outs, state: dict) -> Any:
    if isinstance(tpl, _Out):
        return outs[tpl.i]
    if isinstance(tpl, _In):
        return at(state, tpl.path)
    if isinstance(tpl, dict):
        return {k: _fill(v, outs, state) for k, v in tpl.items()}
    if isinstance(tpl, (list, tuple)):
        return type(tpl)(_fill(v, outs, state) for v in tpl)
    return tpl


def at(state: dict, path: tuple) -> Any:
    obj = state
    for k in path:
        obj = obj[k]
    return obj


def signature(state: dict, keys: tuple) -> tuple:
    """The layout of the tensors under ``keys``: paths, shapes, dtypes, devices (an entry
    without tensors, such as a leave-one-out baseline's, reads as an absent one)."""
    out: list = []
    for k in keys:
        if k in state:
            _tensors(state[k], (k,), out)
    return tuple((p, t.shape, t.dtype, t.device) for p, t in out)


def write_back(template: dict, outs, state: dict) -> None:
    """The estimator state after a compiled call: ``template`` (made by the capture) filled in."""
    filled = {k: (tpl if tpl is _ABSENT else _fill(tpl, outs, state)) for k, tpl in template.items()}
    for k, v in filled.items():
        if v is _ABSENT:
            state.pop(k, None)
        else:
            state[k] = v


# ------------------------------------------------------------------ capture
@contextlib.contextmanager
def _rebound(plan: Plan, consts: dict[str, torch.Tensor], frozen: list, mod_params: list):
    """The namespace tensors and module tensors of ``plan`` replaced by the capture's inputs."""
    from torch.nn.utils.stateless import _reparametrize_module

    saved = {n: (plan.constants[n], plan.globals.get(n)) for n in consts}
    per_module: dict[int, tuple[Any, dict]] = {}
    for (mod, attr), t in [*frozen, *mod_params]:
        per_module.setdefault(id(mod), (mod, {}))[1][attr] = t
    try:
        for n, t in consts.items():
            plan.constants[n] = plan.globals[n] = t
        with contextlib.ExitStack() as stack:
            for mod, tensors in per_module.values():
                stack.enter_context(_reparametrize_module(mod, tensors))
            yield
    finally:
        for n, (src, placed) in saved.items():
            plan.constants[n] = src
            plan.globals[n] = placed


def _module_tensors(plan: Plan, diff_names: list[str]) -> tuple[list, list]:
    """The modules' trainable parameters as ((module, attr), index into the diff inputs),
    and their other parameters and buffers as ((module, attr), tensor)."""
    trained, frozen = [], []
    index = {n: i for i, n in enumerate(diff_names)}
    for mname, mod in plan.modules.items():
        for attr, t in [*mod.named_parameters(), *mod.named_buffers()]:
            i = index.get(f"{mname}.{attr}")
            if i is not None and isinstance(t, torch.nn.Parameter):
                trained.append(((mod, attr), i))
            else:
                frozen.append(((mod, attr), t))
    return trained, frozen


def capture(runner, plan: Plan, used: dict, samples: int, runs: int, device, dtype, max_outcomes: int,
             per_sample: bool):
    """Trace one pass and its gradient into a graph: (graph, example inputs, their sources,
    info about the pass). Runs the pass once (the caller restores the random state)."""
    names, diff, _ = differentiated(plan, used)
    if plan.constants:
        place_constants(plan, device)
    consts = {n: plan.globals[n] for n in plan.constants}
    trained, frozen = _module_tensors(plan, names)
    state_items = _tensors(runner.state, (), [])
    sources = ([("diff", i) for i in range(len(diff))] + [("const", n) for n in consts]
               + [("frozen", key) for key, _ in frozen] + [("state", p) for p, _ in state_items])
    flat = [t.detach() for t in (*diff, *consts.values(), *(t for _, t in frozen), *(t for _, t in state_items))]
    n_diff, n_used, n_const, n_frozen = len(diff), len(used), len(consts), len(frozen)
    sizes = [runs, samples] if plan.run_dim else [samples]
    keep = 1 if plan.run_dim else 0
    info: dict = {}

    def one_pass(*xs):
        d = [x.detach().requires_grad_(True) for x in xs[:n_diff]]
        c = dict(zip(consts, xs[n_diff : n_diff + n_const]))
        fz = [(key, x) for (key, _), x in zip(frozen, xs[n_diff + n_const : n_diff + n_const + n_frozen])]
        st_in = xs[n_diff + n_const + n_frozen :]
        state = _Recording(_copy(runner.state, (), {p: x for (p, _), x in zip(state_items, st_in)}))
        flags: list = []
        token = FLAGS.set(flags)
        try:
            with _rebound(plan, c, fz, [(key, d[i]) for key, i in trained]):
                ex = execute(plan, dict(zip(names[:n_used], d[:n_used])), list(sizes), dtype, device,
                             validate=not plan.validated, max_outcomes=max_outcomes, state=state)
                total = _surrogate.build(ex, state, keep, stop=keep + 1 if per_sample else keep, first_order=True)
        finally:
            FLAGS.reset(token)
        if learners(ex):
            raise Uncompilable("learned control variates are fitted with second derivatives, which a compiled "
                                "pass does not give")
        target = total if total.dim() == 0 else total.sum()
        gs = torch.autograd.grad(target, d, allow_unused=True) if d and target.requires_grad else [None] * n_diff
        gs = [torch.zeros_like(x) if g is None else g for g, x in zip(gs, d)]
        total = total.detach()
        ok = torch.stack([torch.isfinite(total).all(), *(torch.isfinite(g).all() for g in gs), *flags]).all()
        inputs = {id(x): p for (p, _), x in zip(state_items, st_in)}
        new: list = []
        keys = tuple(state.used)
        info.update(ex=ex, keys=keys,
                    template={k: _template(dict.get(state, k), inputs, new) if dict.__contains__(state, k)
                              else _ABSENT for k in keys})
        return (total, *gs, ok, *new)

    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(one_pass, tracing_mode="real")(*flat)
    return gm, flat, sources, info, n_diff


def prepare(gm: torch.fx.GraphModule, flat: list, sources: list) -> tuple[list, list]:
    """Drop the graph inputs that nothing reads (estimator state of other sites), and
    write ``bernoulli(p)`` as ``empty_like(p).bernoulli_(p)`` (what ATen runs for it):
    Inductor would otherwise decompose it into ``rand(float32) < p``, other numbers
    than torch's own kernel draws for float64 and on a GPU."""
    aten = torch.ops.aten
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.bernoulli.default and not node.kwargs:
            with graph.inserting_before(node):
                out = graph.call_function(aten.empty_like.default, (node.args[0],),
                                          {"memory_format": torch.contiguous_format})
                drawn = graph.call_function(aten.bernoulli.Tensor, (out, node.args[0]))
            node.replace_all_uses_with(drawn)
            graph.erase_node(node)
    keep_flat, keep_src = [], []
    for node, x, src in zip([n for n in graph.nodes if n.op == "placeholder"], flat, sources):
        if node.users or src[0] == "diff":
            keep_flat.append(x)
            keep_src.append(src)
        else:
            graph.erase_node(node)
    gm.recompile()
    return keep_flat, keep_src


def slim(ex) -> Any:
    """The execution as a result needs it afterwards: its sites and estimators only."""
    ex.sites = {k: (op, est, None) for k, (op, est, _) in ex.sites.items()}
    ex.env, ex.costs, ex.reductions, ex.cost_inputs, ex.state = {}, [], {}, {}, {}
    return ex
