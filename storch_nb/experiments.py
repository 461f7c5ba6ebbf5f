"""Experiments on a story: many runs, variance curves, reference gradients and
the comparison table. No pictures here (and no matplotlib): the figures of
:mod:`storch_nb.figures`, the lab and the ``%%storch`` magic draw what these
functions compute, and ``Story.compare`` builds its table with
:func:`comparison`.

Everything calls the public API only (``Story.run``, ``Story.exact``,
``Story.reset_state``) and returns :class:`~storch_nb.Result` /
:class:`~storch_nb.Comparison` objects.

- :func:`reference`: the exact gradient (``story.exact()``) where the story is
  enumerable, else a high-sample estimate, labelled so.
- :func:`run_chunked`: ``story.run`` with many runs, split into chunks (a
  callback after each chunk drives a progress bar).
- :func:`variance_curve`: the variance of the estimate at several sample
  counts (1, 3, 10, 30, ... up to the current one).
- :func:`comparison`: the table of mean, std, variance, bias and time per
  estimator and parameter entry.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .engine.result import Comparison, Result
from .errors import StoryError

__all__ = [
    "CHUNK_DRAWS",
    "REFERENCE_SAMPLES",
    "Reference",
    "comparison",
    "entries",
    "estimator_label",
    "n_chunks",
    "reference",
    "run_chunked",
    "sample_grid",
    "variance_curve",
]

#: samples of the high-sample reference, where ``exact()`` is not possible
REFERENCE_SAMPLES = 100_000
#: the budget of joint outcomes for the exact reference (beyond: high-sample)
REFERENCE_MAX_OUTCOMES = 100_000
#: draws (samples x runs) per call of ``story.run`` in :func:`run_chunked`
CHUNK_DRAWS = 1_000_000


# ---------------------------------------------------------------------------
# numbers from results
# ---------------------------------------------------------------------------


def entries(result: Result, names: Sequence[str] | None = None,
            max_entries: int | None = 10) -> dict[str, torch.Tensor]:
    """The gradient estimates of ``result`` per scalar entry: label -> 1-D float64
    tensor of the R estimates (one per run). Labels are parameter names, with a
    flat index for non-scalar parameters (``w[0]``, ``w[1]``, ...; at most
    ``max_entries`` per parameter, None: all), as in :func:`comparison`."""
    out: dict[str, torch.Tensor] = {}
    runs = int(result.runs)
    for name, g in result.grads.items():
        if names is not None and name not in names:
            continue
        g = g.detach().double().cpu()
        flat = g.reshape(runs, -1) if runs > 1 else g.reshape(1, -1)
        if flat.shape[1] == 1:
            out[name] = flat[:, 0]
        else:
            shown = flat.shape[1] if max_entries is None else min(flat.shape[1], max_entries)
            for i in range(shown):
                out[f"{name}[{i}]"] = flat[:, i]
    return out


def estimator_label(spec: Any, result: Result | None = None) -> str:
    """A short label for an estimator choice: the text itself, ``auto (pathwise)``
    for ``auto``, ``e: pathwise, x: score`` for a mapping."""
    if isinstance(spec, Mapping):
        default = spec.get("*")
        parts = [f"{k}: {v}" for k, v in spec.items() if k != "*"]
        if default is not None and default != "auto":
            parts.append(f"others: {default}")
        return ", ".join(parts) or "auto"
    text = "auto" if spec is None else str(spec)
    if text == "auto" and result is not None and result.estimators:
        used = list(dict.fromkeys(result.estimators.values()))
        if len(used) <= 2:
            return f"auto ({', '.join(used)})"
    return text


# ---------------------------------------------------------------------------
# the comparison table
# ---------------------------------------------------------------------------


def _row(estimator: str, label: str, col: torch.Tensor, ref: torch.Tensor | None, seconds: float) -> dict:
    var = col.var(unbiased=True).item() if col.numel() > 1 else math.nan
    mean = col.mean()
    return {
        "estimator": estimator,
        "param": label,
        "mean": mean.item(),
        "std": math.sqrt(var) if var == var else math.nan,
        "variance": var,
        "bias": (mean - ref[0]).item() if ref is not None else None,
        "seconds": seconds,
    }


def comparison(results: Mapping[str, Result], reference: Result | None = None, *,
               max_entries: int | None = None) -> Comparison:
    """The :class:`~storch_nb.Comparison` of ``results`` (estimator label ->
    Result, usually with runs > 1): one row per estimator and parameter entry
    (``name`` for a scalar parameter, ``name[i]`` per flat entry otherwise, at
    most ``max_entries`` per parameter, None: all) with the mean, std and
    variance over runs, the bias against ``reference`` (None where there is
    no reference) and the seconds the estimator took."""
    ref = entries(reference, max_entries=None) if reference is not None else {}
    table = [
        _row(label, name, col, ref.get(name), res.seconds)
        for label, res in results.items()
        for name, col in entries(res, max_entries=max_entries).items()
    ]
    first = next(iter(results.values()), None)
    return Comparison(
        table=table,
        results=dict(results),
        reference=reference,
        samples=first.samples if first is not None else 0,
        runs=first.runs if first is not None else 0,
    )


# ---------------------------------------------------------------------------
# the reference gradient
# ---------------------------------------------------------------------------


@dataclass
class Reference:
    """The gradient the estimates are compared with.

    ``exact`` is True when it comes from ``story.exact()``; otherwise it is a
    high-sample estimate with ``stderr``. ``label`` says which, for legends
    and tables (``"exact"`` or ``"reference (100,000 samples, pathwise)"``).
    """

    result: Result
    label: str
    exact: bool

    @property
    def cost(self) -> float:
        return self.result.cost

    def value(self, label: str) -> float | None:
        """The reference value of one entry label (``c``, ``w[1]``)."""
        t = entries(self.result, max_entries=None).get(label)
        return None if t is None else float(t[0])

    def stderr(self, label: str) -> float | None:
        """The standard error of a high-sample reference entry (0 when exact)."""
        if self.exact:
            return 0.0
        se = self.result.stderr or {}
        name, _, rest = label.partition("[")
        if name not in se:
            return None
        t = se[name].detach().double().reshape(-1)
        i = int(rest[:-1]) if rest else 0
        return float(t[i]) if i < t.numel() else None


def reference(
    story: Any,
    namespace: Mapping[str, Any] | None = None,
    samples: int = REFERENCE_SAMPLES,
    seed: int | None = 0,
    device: Any = "cpu",
    dtype: Any = None,
    max_outcomes: int = REFERENCE_MAX_OUTCOMES,
) -> Reference | None:
    """The exact gradient where ``story.exact()`` works (every site has a finite
    support, at most ``max_outcomes`` joint outcomes), else an estimate with
    ``samples`` samples and the ``auto`` estimator; None if neither runs.
    Estimator state on the story is cleared afterwards."""
    try:
        res = story.exact(namespace=namespace, max_outcomes=max_outcomes, device=device, dtype=dtype)
        return Reference(result=res, label="exact", exact=True)
    except StoryError:
        pass
    try:
        story.reset_state()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = story.run(samples=samples, estimator="auto", seed=seed, namespace=namespace, device=device,
                            dtype=dtype, stderr=True)
    except StoryError:
        return None
    finally:
        story.reset_state()
    used = ", ".join(dict.fromkeys(res.estimators.values())) or "no sites"
    return Reference(result=res, label=f"reference ({samples:,} samples, {used})", exact=False)


# ---------------------------------------------------------------------------
# running many runs
# ---------------------------------------------------------------------------


def _chunks(samples: int, runs: int, draws: int) -> list[int]:
    """Split ``runs`` into chunks of at most ``draws // samples`` runs, each >= 2."""
    per = max(2, draws // max(samples, 1))
    if runs <= per:
        return [runs]
    sizes = [per] * (runs // per)
    rest = runs - per * len(sizes)
    if rest == 1:
        sizes[-1] += 1
    elif rest:
        sizes.append(rest)
    return sizes


def n_chunks(samples: int, runs: int, draws: int = CHUNK_DRAWS) -> int:
    """How many calls :func:`run_chunked` makes."""
    return len(_chunks(samples, runs, draws))


def _merge(parts: list[Result]) -> Result:
    if len(parts) == 1:
        return parts[0]
    runs = sum(p.runs for p in parts)
    grads = {k: torch.cat([p.grads[k] for p in parts]) for k in parts[0].grads}
    costs = torch.cat([p.costs.reshape(-1) for p in parts]) if all(p.costs is not None for p in parts) else None
    cost = float(costs.mean()) if costs is not None else sum(p.cost * p.runs for p in parts) / runs
    return Result(
        grads=grads,
        cost=cost,
        params=parts[0].params,
        estimators=parts[0].estimators,
        samples=parts[0].samples,
        runs=runs,
        device=parts[0].device,
        seconds=sum(p.seconds for p in parts),
        dtype=parts[0].dtype,
        stderr={k: g.std(0) / math.sqrt(runs) for k, g in grads.items()},
        cost_stderr=float(costs.std()) / math.sqrt(runs) if costs is not None else None,
        costs=costs,
    )


def run_chunked(
    story: Any,
    estimator: Any,
    samples: int,
    runs: int,
    seed: int | None = 0,
    namespace: Mapping[str, Any] | None = None,
    device: Any = "cpu",
    dtype: Any = None,
    tick: Callable[[], None] | None = None,
    draws: int = CHUNK_DRAWS,
) -> Result:
    """``story.run(samples, runs=runs, ...)`` from fresh estimator state, in
    chunks of at most ``draws`` draws (chunk ``i`` uses ``seed + i``), merged
    into one :class:`Result`. ``tick()`` is called after each chunk."""
    parts = []
    for i, r in enumerate(_chunks(samples, runs, draws)):
        story.reset_state()
        parts.append(
            story.run(samples=samples, estimator=estimator, seed=None if seed is None else seed + i, runs=r,
                      namespace=namespace, device=device, dtype=dtype)
        )
        if tick is not None:
            tick()
    story.reset_state()
    return _merge(parts)


def sample_grid(samples: int) -> list[int]:
    """The sample counts of the variance plot: 1, 3, 10, 30, ... below ``samples``, then ``samples``."""
    grid = []
    k = 0
    while True:
        s = (1, 3)[k % 2] * 10 ** (k // 2)
        if s >= samples:
            break
        grid.append(s)
        k += 1
    return grid + [samples]


def variance_curve(
    story: Any,
    estimator: Any,
    samples: int,
    runs: int,
    seed: int | None = 0,
    namespace: Mapping[str, Any] | None = None,
    device: Any = "cpu",
    dtype: Any = None,
    known: Result | None = None,
    tick: Callable[[], None] | None = None,
) -> dict[int, dict[str, float]]:
    """Variance over ``runs`` runs of each entry's gradient estimate, at each
    sample count of :func:`sample_grid` (``samples`` -> {label: variance}).
    ``known`` is a result at ``samples`` already computed. Sample counts where
    the estimator does not run (``rloo`` with 1 sample) are left out."""
    out: dict[int, dict[str, float]] = {}
    for s in sample_grid(samples):
        if known is not None and s == known.samples and known.runs > 1:
            res = known
        else:
            try:
                res = run_chunked(story, estimator, s, runs, seed, namespace, device, dtype)
            except StoryError:
                if tick is not None:
                    tick()
                continue
            if tick is not None:
                tick()
        out[s] = {k: float(v.var()) for k, v in entries(res).items()}
    return out
