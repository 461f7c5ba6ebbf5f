"""The Python API: :class:`Story`, the front door. It checks its arguments
(``settings``) and hands the work to the engine's :class:`~.engine.run.Runner`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import settings
from .engine.result import Comparison, Result
from .engine.run import Runner
from .errors import EstimatorError, StoryError
from .experiments import comparison
from .graph import Graph
from .story.parse import parse

__all__ = ["Story"]

Estimator = str | Mapping[str, str] | None
Device = str | torch.device | None
DType = torch.dtype | str | None


class Story:
    """A generative story: parsed once, then run with any estimator.

    >>> story = Story('''
    ... c = param(0.5)
    ... e ~ Normal(c, 1)
    ... cost e**2
    ... ''')
    >>> res = story.run(samples=1000, seed=0)
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.program = parse(text)
        self._runner = Runner(self.program)

    def __repr__(self) -> str:
        return f"Story({len(self.program.lines)} lines)"

    # ------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to the just-parsed state: estimator state (moving averages) and
        the story's own parameters (re-initialised from their ``param(...)``)."""
        self._runner.reset()

    def reset_state(self) -> None:
        """Clear estimator state only (moving averages), keeping parameters."""
        self._runner.state.clear()

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The story's own ``param(...)`` leaves, once a run has created them."""
        return dict(self._runner.params)

    def parameters(self) -> list[torch.Tensor]:
        """The story's own parameter tensors (for an optimizer)."""
        return list(self._runner.params.values())

    @property
    def graph(self) -> Graph:
        """The graph of the last run (loops unrolled); before any run, the graph
        with every outside name treated as an input."""
        return self._runner.graph

    # ------------------------------------------------------------- estimates
    def run(
        self,
        samples: int = 1000,
        estimator: Estimator = "auto",
        seed: int | None = None,
        device: Device = "cpu",
        runs: int = 1,
        namespace: Mapping[str, Any] | None = None,
        dtype: DType = None,
        stderr: bool = False,
        max_outcomes: int = 10**6,
        max_memory: float | None = None,
        compile: bool = False,
    ) -> Result:
        """Estimate the gradient of the expected cost.

        ``runs=R`` repeats the whole estimate R times independently, in one
        vectorized pass, and ``grads`` then has a leading dimension R.
        ``stderr=True`` also gives the standard error of each gradient
        estimate. ``seed`` makes the run reproducible and leaves torch's
        global generator as it was.

        Sample counts whose tensors would not fit in ``max_memory`` bytes
        (default: 2 GiB on the CPU, half the free memory on a GPU) run in
        chunks of samples whose estimates are combined with weights
        ``chunk / samples`` (the same estimator, in bounded memory); where an
        estimator compares samples with each other (leave-one-out,
        batch-average or moving-average baselines without ``n``, learned
        control variates) the run is refused before allocating, with the memory
        it would need.

        ``compile=True`` captures the planned pass (sampling, costs, surrogate and
        its gradient) once per setting and compiles it with torch's Inductor: the
        same numbers as eager for the same seed; ``Result.compile_seconds`` is the
        time the call spent compiling (0.0 once cached). Where it cannot compile
        (no compiler; learned control variates) it warns once and runs eagerly.
        """
        samples = settings.positive_int("samples", samples)
        runs = settings.positive_int("runs", runs)
        settings.positive_int("samples x runs", samples * runs)
        if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, (int, float))
                                       or not max_memory > 0):
            raise StoryError(f"max_memory must be a positive number of bytes, not {max_memory!r}",
                             hint="e.g. max_memory=4 * 2**30 for 4 GiB, or None for the default budget")
        return self._runner.estimate(samples, settings.estimator_spec(estimator), settings.seed(seed),
                                     settings.as_device(device), runs, settings.namespace(namespace),
                                     settings.as_dtype(dtype), stderr, max_outcomes, max_memory,
                                     settings.flag("compile", compile))

    def surrogate(
        self,
        samples: int = 1000,
        estimator: Estimator = "auto",
        seed: int | None = None,
        namespace: Mapping[str, Any] | None = None,
        device: Device = "cpu",
        dtype: DType = None,
        compile: bool = False,
    ) -> torch.Tensor:
        """A scalar tensor whose value is the cost estimate and whose gradient
        (``loss.backward()``, or ``torch.autograd.grad`` with ``create_graph=True``
        for higher orders) is the estimator's gradient. ``compile=True``: the pass
        compiled as for :meth:`run` (first derivatives only)."""
        return self._runner.surrogate(settings.positive_int("samples", samples), settings.estimator_spec(estimator),
                                      settings.seed(seed), settings.namespace(namespace), settings.as_device(device),
                                      settings.as_dtype(dtype), settings.flag("compile", compile))

    def exact(self, namespace: Mapping[str, Any] | None = None, max_outcomes: int = 10**6,
              device: Device = "cpu", dtype: DType = None) -> Result:
        """Exact cost and gradients, by summing over the joint finite support of every site."""
        return self._runner.exact(settings.namespace(namespace), max_outcomes, settings.as_device(device),
                                  settings.as_dtype(dtype))

    def compare(
        self,
        estimators: Sequence[str],
        samples: int = 100,
        runs: int = 500,
        seed: int | None = 0,
        namespace: Mapping[str, Any] | None = None,
        device: Device = "cpu",
        dtype: DType = None,
        fit_steps: int = 10,
    ) -> Comparison:
        """Run each estimator ``runs`` times and tabulate mean, std, variance,
        bias (against ``exact()`` where the story is enumerable) and time.

        Each estimator starts from fresh state. One that learns a control
        variate (``relax``, ``rebar``, ``lax``) first fits it on ``fit_steps``
        calls of ``samples`` samples and up to 100 runs, drawn with other
        seeds, so the table measures the fitted estimator (``fit_steps=0``: as
        it starts); it stays unbiased, since the measured draws are new."""
        if isinstance(fit_steps, bool) or not isinstance(fit_steps, int) or fit_steps < 0:
            raise StoryError(f"fit_steps must be a non-negative int, not {fit_steps!r}", hint="e.g. fit_steps=10")
        if isinstance(estimators, str):
            estimators = [e.strip() for e in estimators.split(",") if e.strip()]
        if not estimators:
            raise EstimatorError("compare needs at least one estimator")
        try:
            reference = self.exact(namespace=namespace, device=device, dtype=dtype)
        except StoryError:
            reference = None
        results: dict[str, Result] = {}
        for est in estimators:
            self.reset_state()
            if fit_steps and settings.estimator_spec(est).learns_cv:
                for i in range(fit_steps):
                    self.run(samples=samples, estimator=est, seed=None if seed is None else seed + 1 + i, device=device,
                             runs=min(runs, 100), namespace=namespace, dtype=dtype)
            results[est] = self.run(samples=samples, estimator=est, seed=seed, device=device, runs=runs,
                                    namespace=namespace, dtype=dtype)
        self.reset_state()
        return comparison(results, reference)

    def train(
        self,
        steps: int = 500,
        lr: float = 0.05,
        estimator: Estimator = "auto",
        optimizer: str | type | torch.optim.Optimizer = "adam",
        samples: int = 100,
        seed: int | None = None,
        namespace: Mapping[str, Any] | None = None,
        device: Device = "cpu",
        dtype: DType = None,
        callback: Any = None,
        compile: bool = False,
    ):
        """Optimise the story's parameters (and those of namespace tensors and
        modules it uses) by gradient descent on the estimated gradient.
        Returns a ``History`` (``.cost``: per-step cost estimates, ``.params``:
        final values). ``compile=True`` compiles each step's pass (see :meth:`run`;
        ``History.compile_seconds``). See :mod:`storch_nb.engine.train`."""
        from .engine.train import train

        return train(self._runner, steps=steps, lr=lr, estimator=estimator, optimizer=optimizer, samples=samples,
                     seed=seed, namespace=namespace, device=device, dtype=dtype, callback=callback, compile=compile)

    def train_compare(self, estimators: Sequence[str], **options: Any) -> dict:
        """Train once per estimator, each from the same starting point (options as
        for :meth:`train`); the histories by estimator text. The namespace tensors
        and modules it trains are put back afterwards."""
        from .engine.train import train_compare

        return train_compare(self._runner, estimators, **options)

    def draw(self, ax: Any = None):
        """The graph as a matplotlib Figure: rectangles for deterministic steps,
        ellipses for stochastic ones (imports matplotlib on first use)."""
        from .figures import draw_graph

        return draw_graph(self.graph, ax=ax)
