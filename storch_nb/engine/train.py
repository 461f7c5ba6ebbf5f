"""Training: gradient descent on a story's expected cost with any estimator.

Each step runs the story (``Story.run``: one gradient estimate, which also
trains learned control variates such as RELAX's), puts the estimator's
gradient into the parameters' ``.grad`` and takes one optimizer step::

    hist = story.train(steps=500, lr=0.05, estimator="rloo", optimizer="adam", seed=0)
    hist.cost       # per-step cost estimates (floats)
    hist.params     # final values, name -> tensor

What is optimised: the story's own ``param(...)`` leaves, the tensors of the
namespace that the story reads and that have ``requires_grad=True`` (leaf
tensors, ``nn.Parameter`` included) and the parameters of the ``nn.Module``
objects it calls. The story's own parameters are created by the first
run, so the optimizer is built after it; the optimizer then lives for the whole run, so Adam's moments
carry over between steps as they should.

``seed`` makes a run reproducible: torch's generator is seeded once at the
start (``torch.default_generator.manual_seed``) and the per-step runs
draw from it in turn; torch's global generator state is put back afterwards,
so the code around ``train`` sees the same random numbers as without it.
Estimator state (moving-average baselines) lives on the story and carries
over, as for ``run`` and ``surrogate``; ``story.reset()`` clears it and puts the
story's parameters back to their ``param(...)`` values.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import settings
from ..errors import StoryError
from .rng import Seeded

__all__ = ["History", "train", "train_compare", "trainable", "OPTIMIZERS"]

#: optimizer names ``train`` accepts (case-insensitive)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


@dataclass
class History:
    """What ``Story.train`` gives back.

    Attributes
    ----------
    cost : per-step cost estimates (the surrogate's value before the step).
    params : final parameter values, name -> detached tensor.
    grad_norm : per-step Euclidean norm of the estimated gradient over every
        trained parameter.
    trace : per-step values of every scalar parameter (name -> list of floats,
        the value *before* each step; ``params`` has the final one).
    estimator, optimizer, lr, samples, steps : what was run (``steps`` is the
        number of steps actually taken).
    seconds : wall time of the whole run.
    stopped : why training ended early (non-finite cost, callback), or None.
    compile_seconds : ``compile=True``: seconds spent capturing and compiling the
        steps' pass (the first step's, and any later recompilation); None without.
    """

    cost: list[float] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_norm: list[float] = field(default_factory=list)
    trace: dict[str, list[float]] = field(default_factory=dict)
    estimator: str = "auto"
    optimizer: str = "adam"
    lr: float = 0.05
    samples: int = 100
    steps: int = 0
    seconds: float = 0.0
    stopped: str | None = None
    compile_seconds: float | None = None

    def final_cost(self, window: int | None = None) -> float:
        """The mean cost estimate over the last ``window`` steps (default: the
        last tenth of the run, at least one step); nan before any step."""
        if not self.cost:
            return math.nan
        if window is None:
            window = max(1, len(self.cost) // 10)
        tail = self.cost[-window:]
        return sum(tail) / len(tail)

    def __repr__(self) -> str:
        lines = [
            f"History({self.steps} steps, estimator={self.estimator}, optimizer={self.optimizer}, "
            f"lr={self.lr:g}, samples={self.samples}, {self.seconds:.3g} s)"
        ]
        if self.cost:
            lines.append(f"  cost: {self.cost[0]:.6g} -> {self.final_cost():.6g} (mean of the last steps)")
        for name, value in self.params.items():
            v = value.detach().cpu()
            text = f"{v.item():.6g}" if v.numel() == 1 else f"tensor of shape {tuple(v.shape)}"
            lines.append(f"  {name} = {text}")
        if self.stopped:
            lines.append(f"  stopped: {self.stopped}")
        return "\n".join(lines)


def _estimator_text(estimator: Any) -> str:
    if estimator is None:
        return "auto"
    if isinstance(estimator, str):
        return estimator
    if isinstance(estimator, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in estimator.items())
    return str(estimator)


def _make_optimizer(optimizer: Any, params: list[torch.Tensor], lr: float) -> tuple[torch.optim.Optimizer, str]:
    if isinstance(optimizer, str):
        cls = OPTIMIZERS.get(optimizer.strip().lower())
        if cls is None:
            raise StoryError(
                f"unknown optimizer {optimizer!r}",
                hint=f"use one of {', '.join(OPTIMIZERS)} or a torch.optim.Optimizer class",
            )
        return cls(params, lr=lr), optimizer.strip().lower()
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer(params, lr=lr), optimizer.__name__
    if isinstance(optimizer, torch.optim.Optimizer):
        # the user's instance, its state carried over; tensors it does not hold yet join as a new group
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in params if id(p) not in held]
        if missing:
            optimizer.add_param_group({"params": missing})
        return optimizer, type(optimizer).__name__.lower()
    raise StoryError(
        f"optimizer must be a name, a torch.optim.Optimizer class or instance, not {type(optimizer).__name__}",
        hint=f"use one of {', '.join(OPTIMIZERS)}",
    )


def trainable(runner: Any, namespace: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``train`` optimises, name -> leaf tensor: the story's own
    parameters, and the namespace leaf tensors with ``requires_grad`` and the
    parameters of the ``nn.Module`` objects that the story's last plan reads
    (call a run or a surrogate first so that the story's parameters exist).
    ``runner`` is the story's :class:`~.run.Runner` (``Story._runner``)."""
    out: dict[str, torch.Tensor] = dict(runner.params)
    ns = namespace if namespace is not None else {}
    for node in runner.graph.nodes:
        if node.kind != "param" or node.name in out or node.name not in ns:
            continue
        value = ns[node.name]
        if isinstance(value, nn.Module):
            for pname, p in value.named_parameters():
                if p.requires_grad:
                    out[f"{node.name}.{pname}"] = p
        elif isinstance(value, torch.Tensor) and value.requires_grad:
            if value.is_leaf:
                out[node.name] = value
            else:
                warnings.warn(
                    f"`{node.name}` requires grad but is not a leaf tensor (it was computed from others): "
                    "it is not trained; make it a leaf with .detach().requires_grad_()",
                    stacklevel=3,
                )
    return out


def train(
    runner: Any,
    steps: int = 500,
    lr: float = 0.05,
    estimator: str | Mapping[str, str] | None = "auto",
    optimizer: str | type | torch.optim.Optimizer = "adam",
    samples: int = 100,
    seed: int | None = None,
    namespace: Mapping[str, Any] | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str | None = None,
    callback: Callable[[int, History], Any] | None = None,
    compile: bool = False,
) -> History:
    """Optimise ``story``'s parameters by gradient descent on the estimated gradient.

    Parameters
    ----------
    runner : the story's :class:`~.run.Runner` (``Story.train`` passes it).
    steps : optimizer steps (one surrogate of ``samples`` samples each).
    lr : learning rate.
    estimator : as for ``Story.run`` (text, or a mapping site -> text).
    optimizer : ``"adam"`` (default), ``"sgd"``, ``"adamw"``, ``"rmsprop"``,
        ``"adagrad"``, a ``torch.optim.Optimizer`` subclass, or an optimizer
        instance: it is used as it is (its own learning rate; ``lr`` is
        ignored), so its state (Adam's moments) carries over from one call of
        ``train`` to the next; trained tensors it does not hold yet are added
        as a new parameter group.
    samples : Monte Carlo samples per step.
    seed : makes the run reproducible; torch's global generator state is
        restored afterwards. None draws from torch's global generator.
    namespace : where the story's outside names come from (tensors with
        ``requires_grad`` and modules found there are trained too).
    device, dtype : as for ``Story.run``.
    callback : ``callback(step, history)`` after each step (``step`` counts
        from 1); returning True stops training.
    compile : compile each step's pass (sampling, costs, surrogate and gradient)
        with torch's Inductor, captured once (``Story.run(compile=True)``): the same
        numbers as eager for the same seed; ``History.compile_seconds`` says how
        long compiling took.

    Returns a :class:`History`. A non-finite cost stops training with a
    warning (``history.stopped`` says where).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise StoryError(f"steps must be a non-negative int, not {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise StoryError(f"lr must be a positive number, not {lr!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise StoryError(f"samples must be a positive int, not {samples!r}")
    ns = settings.namespace(namespace)
    run = _Settings(settings.estimator_spec(estimator), settings.as_device(device), settings.as_dtype(dtype),
                    settings.flag("compile", compile))
    opt_name = optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", type(optimizer).__name__)
    hist = History(estimator=_estimator_text(estimator), optimizer=str(opt_name).lower(), lr=float(lr), samples=samples)
    t0 = time.perf_counter()
    saved: dict[str, tuple] = {}
    try:
        _train_steps(runner, steps, run, optimizer, lr, samples, seed, ns, callback, hist, saved)
    except BaseException:
        # a failed or interrupted run puts every trained tensor back (values and .grad)
        with torch.no_grad():
            for p, value, grad in saved.values():
                p.copy_(value)
                p.grad = grad
        raise
    params = {n: p for n, (p, _, _) in saved.items()}
    if not saved and steps == 0:
        params = trainable(runner, ns) if runner.params else {}
    hist.params = {n: p.detach().clone() for n, p in params.items()}
    hist.seconds = time.perf_counter() - t0
    return hist


@dataclass(frozen=True)
class _Settings:
    spec: Any
    device: torch.device
    dtype: torch.dtype
    compile: bool = False


def _train_steps(runner, steps, run: _Settings, optimizer, lr, samples, seed, ns, callback, hist, saved) -> None:
    runner.steady = {}  # the modules and their parameters do not change between steps
    try:
        with Seeded(settings.seed(seed), run.device):
            _loop(runner, steps, run, optimizer, lr, samples, ns, callback, hist, saved)
    finally:
        runner.steady = None


def _loop(runner, steps, run: _Settings, optimizer, lr, samples, ns, callback, hist, saved) -> None:
    opt: torch.optim.Optimizer | None = None
    params: dict[str, torch.Tensor] = {}
    for step in range(1, steps + 1):
        try:
            res = runner.estimate(samples, run.spec, None, run.device, 1, ns, run.dtype, compile=run.compile)
        except StoryError as exc:
            if not getattr(exc, "nonfinite", False):
                exc.message = f"at training step {step}: {exc.message}"
                exc.step = step  # type: ignore[attr-defined]
                raise
            res = None
        if opt is None:
            params = trainable(runner, ns)
            if not params:
                raise StoryError(
                    "there is nothing to train: the story has no parameters",
                    hint="declare one with `x = param(VALUE)`, or use a namespace tensor with requires_grad=True",
                )
            saved.update({n: (p, p.detach().clone(), p.grad) for n, p in params.items()})
            opt, hist.optimizer = _make_optimizer(optimizer, list(params.values()), float(lr))
            hist.lr = float(opt.param_groups[0].get("lr", lr))
            hist.trace = {n: [] for n, p in params.items() if p.numel() == 1}
        if res is not None and res.compile_seconds is not None:
            hist.compile_seconds = (hist.compile_seconds or 0.0) + res.compile_seconds
        value = math.nan if res is None else res.cost
        for n in hist.trace:
            hist.trace[n].append(float(params[n].detach()))
        hist.cost.append(value)
        if not math.isfinite(value):
            hist.stopped = f"the cost estimate became {value} at step {step}"
            hist.grad_norm.append(math.nan)
            warnings.warn(f"training stopped: {hist.stopped} (try a smaller lr)", stacklevel=3)
            break
        # Story.run gives the estimator's gradient (and trains control variates such as RELAX's),
        # on the run's device in its dtype: a namespace tensor elsewhere gets it on its own device
        grads = []
        for n, p in params.items():
            g = res.grads.get(n)
            p.grad = None if g is None else g.detach().to(device=p.device, dtype=p.dtype)
            if g is not None:
                grads.append(g.detach())
        hist.grad_norm.append(_norm(grads))
        opt.step()
        hist.steps = step
        if callback is not None and callback(step, hist) is True:
            hist.stopped = f"the callback stopped training after step {step}"
            break


def _norm(grads: list[torch.Tensor]) -> float:
    """The gradient's total norm, in float64, with one read of the device (one kernel per
    device and dtype: ``torch._foreach_norm``)."""
    if not grads:
        return 0.0
    if len({(g.device, g.dtype) for g in grads}) == 1:
        parts = torch._foreach_norm(grads)
    else:
        parts = [torch.linalg.vector_norm(g) for g in grads]
    return float(torch.linalg.vector_norm(torch.stack([p.to("cpu", torch.float64) for p in parts])))


def _snapshot(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def _restore(params: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in params.items():
            if n in saved:
                p.copy_(saved[n])


def train_compare(
    runner: Any,
    estimators: Sequence[str],
    steps: int = 500,
    lr: float = 0.05,
    optimizer: str | type = "adam",
    samples: int = 100,
    seed: int | None = 0,
    namespace: Mapping[str, Any] | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str | None = None,
    callback: Callable[[str, int, History], Any] | None = None,
) -> dict[str, History]:
    """Train once per estimator, each from the same starting point, and return
    the histories by estimator text.

    Before each estimator the story is ``reset()`` (its own parameters back to
    their ``param(...)`` values, estimator state cleared) and the namespace
    tensors and modules it trains are put back to their values at the start;
    at the end they are put back again, so a comparison leaves the namespace
    as it found it. ``callback(estimator, step, history)`` is called after
    each step.
    """
    if isinstance(estimators, str):
        estimators = [e.strip() for e in estimators.split(",") if e.strip()]
    if not estimators:
        raise StoryError("train_compare needs at least one estimator")
    ns = settings.namespace(namespace)
    runner.reset()
    # find the namespace tensors and modules the story trains (one surrogate builds the plan)
    runner.surrogate(2, settings.EstimatorSpec(), 0, ns, settings.as_device(device), settings.as_dtype(dtype))
    outside = {n: p for n, p in trainable(runner, ns).items() if n not in runner.params}
    saved = _snapshot(outside)
    out: dict[str, History] = {}
    try:
        for est in estimators:
            runner.reset()
            _restore(outside, saved)
            cb = None
            if callback is not None:
                cb = lambda step, h, _e=est: callback(_e, step, h)  # noqa: B023
            out[est] = train(runner, steps=steps, lr=lr, estimator=est, optimizer=optimizer, samples=samples,
                             seed=seed, namespace=ns, device=device, dtype=dtype, callback=cb)
    finally:
        _restore(outside, saved)
    return out
