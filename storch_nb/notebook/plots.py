"""Plots of gradient estimators and training runs (matplotlib, rendered as PNG).

Everything here builds :class:`matplotlib.figure.Figure` objects directly (no
``pyplot``, so no figure is registered globally, nothing leaks and no global
setting changes) and renders them with the Agg canvas. The figures are
:class:`StorchFigure` instances: a ``Figure`` that also has ``_repr_png_``, so
it shows as an image in a notebook whichever matplotlib backend is active.
This module imports matplotlib; ``import storch_nb`` does not import it (the
lab, the magic and ``Story.draw`` import it on first use).

The pieces:

- :func:`reference`: the exact gradient (``story.exact()``) where the story is
  enumerable, else a high-sample estimate, labelled so.
- :func:`run_chunked`: ``story.run`` with many runs, split into chunks (a
  callback after each chunk drives a progress bar).
- :func:`variance_curve`: the variance of the estimate at several sample
  counts (1, 3, 10, 30, ... up to the current one).
- :func:`gradient_figure`: histograms of the R gradient estimates per
  parameter, overlaid per estimator, with the reference as a vertical line,
  and the variance-versus-samples plot on log-log axes with a 1/S slope.
- :func:`learning_curve_figure`: cost per training step, per estimator, and
  the trajectories of the scalar parameters.
- :func:`summary`: a :class:`~storch_nb.Comparison` table (mean, std,
  variance, bias, time) of a set of results, shown with
  :mod:`storch_nb.notebook.display`.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

from ..engine.result import Comparison, Result
from ..errors import StoryError

__all__ = [
    "COLORS",
    "REFERENCE_SAMPLES",
    "Reference",
    "StorchFigure",
    "entries",
    "estimator_label",
    "figure_png",
    "gradient_figure",
    "learning_curve_figure",
    "reference",
    "run_chunked",
    "sample_grid",
    "summary",
    "variance_curve",
]

#: samples of the high-sample reference, where ``exact()`` is not possible
REFERENCE_SAMPLES = 100_000
#: the budget of joint outcomes for the exact reference (beyond: high-sample)
REFERENCE_MAX_OUTCOMES = 100_000
#: draws (samples x runs) per call of ``story.run`` in :func:`run_chunked`
CHUNK_DRAWS = 1_000_000
#: at most this many histogram panels in one figure
MAX_PANELS = 6
#: one colour per estimator, in order (matplotlib's tab10)
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
#: resolution of the PNGs
DPI = 80


class StorchFigure(Figure):
    """A matplotlib ``Figure`` that renders itself as PNG for IPython
    (``_repr_png_``), so it shows inline with any backend."""

    def _repr_png_(self) -> bytes:
        return figure_png(self)


def figure_png(fig: Figure, dpi: float | None = None) -> bytes:
    """Render ``fig`` to PNG bytes with the Agg canvas (no pyplot, no global state)."""
    buf = io.BytesIO()
    canvas = FigureCanvasAgg(fig)
    if dpi is not None:
        canvas.print_figure(buf, format="png", dpi=dpi)
    else:  # fast zlib level: a few kB more, 20+ ms less
        canvas.print_png(buf, pil_kwargs={"compress_level": 1})
    return buf.getvalue()


# ---------------------------------------------------------------------------
# numbers from results
# ---------------------------------------------------------------------------


def entries(result: Result, names: Sequence[str] | None = None, max_entries: int = 10) -> dict[str, torch.Tensor]:
    """The gradient estimates of ``result`` per scalar entry: label -> 1-D float64
    tensor of the R estimates (one per run). Labels are parameter names, with a
    flat index for non-scalar parameters (``w[0]``, ``w[1]``, ...; at most
    ``max_entries`` per parameter), as in ``Story.compare``'s table."""
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
            for i in range(min(flat.shape[1], max_entries)):
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
        e = entries(self.result, max_entries=10**9)
        t = e.get(label)
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


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------


def summary(results: Mapping[str, Result], reference: Reference | None = None) -> Comparison:
    """A :class:`Comparison` of ``results`` (label -> Result with runs > 1):
    per estimator and entry the mean, std, variance, bias (against
    ``reference``) and time, ready for :class:`~storch_nb.notebook.display.ComparisonView`."""
    table = []
    first = None
    for label, res in results.items():
        first = first or res
        for name, col in entries(res).items():
            var = float(col.var()) if col.numel() > 1 else math.nan
            ref = reference.value(name) if reference is not None else None
            table.append(
                {
                    "estimator": label,
                    "param": name,
                    "mean": float(col.mean()),
                    "std": math.sqrt(var) if var == var else math.nan,
                    "variance": var,
                    "bias": float(col.mean()) - ref if ref is not None else None,
                    "seconds": res.seconds,
                }
            )
    return Comparison(
        table=table,
        results=dict(results),
        reference=reference.result if reference is not None else None,
        samples=first.samples if first is not None else 0,
        runs=first.runs if first is not None else 0,
    )


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------


def _count_label(v: float, _pos: Any = None) -> str:
    """Tick labels for log axes without mathtext (faster, and plain to read)."""
    if v <= 0:
        return ""
    if v >= 1 and abs(v - round(v)) < 1e-9:
        n = int(round(v))
        for unit, div in (("M", 10**6), ("k", 10**3)):
            if n >= div and n % div == 0:
                return f"{n // div}{unit}"
        return str(n)
    return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")


def _log_axes(ax: Any) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, numticks=6))
        axis.set_major_formatter(FuncFormatter(_count_label))
        axis.set_minor_locator(NullLocator())  # minor ticks cost more to draw than they tell


def _hist_range(cols: Sequence[torch.Tensor], ref: float | None) -> tuple[float, float]:
    los, his = [], []
    for c in cols:
        c = c[torch.isfinite(c)]
        if c.numel():
            lo, hi = float(c.min()), float(c.max())
            if c.numel() >= 20:  # clip only heavy tails: beyond 5 IQRs of the quartiles
                q1, q3 = (float(v) for v in torch.quantile(c, torch.tensor([0.25, 0.75], dtype=c.dtype)))
                lo, hi = max(lo, q1 - 5 * (q3 - q1)), min(hi, q3 + 5 * (q3 - q1))
            los.append(lo)
            his.append(hi)
    if ref is not None and math.isfinite(ref):
        los.append(ref)
        his.append(ref)
    if not los:
        return -1.0, 1.0
    lo, hi = min(los), max(his)
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
        pad = max(abs(lo) * 0.05, 1e-6)
        return lo - pad, hi + pad
    pad = 0.03 * (hi - lo)
    return lo - pad, hi + pad


def _histogram(ax: Any, label: str, results: Mapping[str, Result], cols: Mapping[str, torch.Tensor],
               reference: Reference | None, bins: int) -> None:
    ref = reference.value(label) if reference is not None else None
    lo, hi = _hist_range(list(cols.values()), ref)
    for i, (est, col) in enumerate(cols.items()):
        color = COLORS[i % len(COLORS)]
        finite = col[torch.isfinite(col)]
        inside = finite[(finite >= lo) & (finite <= hi)]
        mean = float(finite.mean()) if finite.numel() else math.nan
        sd = float(finite.std()) if finite.numel() > 1 else math.nan
        text = f"{est}: mean {mean:.4g}, sd {sd:.3g}"
        if inside.numel() < col.numel():
            text += f" ({col.numel() - inside.numel()} outside)"
        if inside.numel():
            ax.hist(inside.numpy(), bins=bins, range=(lo, hi), density=True, histtype="stepfilled",
                    facecolor=to_rgba(color, 0.3), edgecolor=color, linewidth=1.2, label=text)
        else:
            ax.plot([], [], color=color, label=text)
    if ref is not None:
        ax.axvline(ref, color="black", linewidth=1.6, label=f"{reference.label}: {ref:.4g}")
    # head room for the legend above the bars
    n_lines = len(cols) + (ref is not None)
    ax.set_ylim(0, ax.get_ylim()[1] * (1.08 + 0.14 * n_lines))
    first = next(iter(results.values()))
    ax.set_title(f"∂E/∂{label}: {first.runs} estimates × {first.samples} samples", fontsize=10)
    ax.set_xlabel("gradient estimate", fontsize=9)
    ax.set_yticks([])
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.tick_params(labelsize=8)
    ax.legend(loc="upper right", fontsize=7, frameon=False)


def _variance(ax: Any, curves: Mapping[str, Mapping[int, Mapping[str, float]]], labels: Sequence[str],
              order: Sequence[str]) -> None:
    anchor = None
    styles = ("-", "--", ":", "-.")
    handles = []
    for i, est in enumerate(order):
        curve = curves.get(est)
        if not curve:
            continue
        color = COLORS[i % len(COLORS)]
        for j, label in enumerate(labels):
            pts = [(s, v[label]) for s, v in sorted(curve.items()) if label in v and v[label] > 0 and math.isfinite(v[label])]
            if not pts:
                continue
            xs, ys = zip(*pts)
            (line,) = ax.plot(xs, ys, marker="o", markersize=3.5, color=color, linestyle=styles[j % 4], linewidth=1.4,
                              label=est)
            if j == 0 or len(labels) == 1:
                handles.append(line)
            if anchor is None:
                anchor = pts[0]
    if len(labels) > 1:  # colour: estimator; line style: parameter
        handles = [Line2D([], [], color=h.get_color(), linewidth=1.4, label=h.get_label()) for h in handles]
        handles += [Line2D([], [], color="0.3", linestyle=styles[j % 4], linewidth=1.2, label=lab)
                    for j, lab in enumerate(labels)]
    if anchor is None:
        ax.text(0.5, 0.5, "no variance to show\n(every estimate is the same)", ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        xs = sorted({s for c in curves.values() for s in c})
        s0, v0 = anchor
        (slope,) = ax.plot([xs[0], xs[-1]], [v0 * s0 / xs[0], v0 * s0 / xs[-1]], color="0.45", linestyle=(0, (4, 3)),
                           linewidth=1, label="∝ 1/S")
        _log_axes(ax)
        ax.legend(handles=[*handles, slope], loc="upper right", fontsize=7, frameon=False,
                  ncol=2 if len(handles) > 5 else 1)
    what = labels[0] if len(labels) == 1 else ", ".join(labels)
    ax.set_title(f"variance of ∂E/∂{what} vs samples", fontsize=10)
    ax.set_xlabel("samples S", fontsize=9)
    ax.set_ylabel("variance", fontsize=9)
    ax.tick_params(labelsize=8)


def gradient_figure(
    results: Mapping[str, Result],
    labels: Sequence[str] | None = None,
    reference: Reference | None = None,
    curves: Mapping[str, Mapping[int, Mapping[str, float]]] | None = None,
    bins: int = 40,
) -> StorchFigure:
    """Histograms of the gradient estimates (one panel per entry label, at most
    6), overlaid per estimator (``results``: label -> Result with runs > 1), with
    the reference as a vertical line; then, if ``curves`` (estimator label ->
    :func:`variance_curve`) is given, the variance against the number of
    samples on log-log axes with a 1/S reference slope."""
    if not results:
        raise ValueError("gradient_figure needs at least one result")
    cols_by_est = {est: entries(res) for est, res in results.items()}
    all_labels = list(dict.fromkeys(k for c in cols_by_est.values() for k in c))
    if labels is None:
        labels = all_labels
    labels = [lab for lab in labels if lab in all_labels][:MAX_PANELS]
    panels = len(labels) + (1 if curves else 0)
    if panels == 0:
        fig = StorchFigure(figsize=(4.5, 1.5), dpi=DPI)
        fig.text(0.5, 0.5, "the story has no parameters to plot", ha="center", va="center")
        return fig
    ncols = panels if panels <= 3 else (2 if panels == 4 else 3)
    nrows = math.ceil(panels / ncols)
    fig = StorchFigure(figsize=(4.6 * ncols, 3.5 * nrows), dpi=DPI)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(panels)]
    for ax, label in zip(axes, labels):
        cols = {est: c[label] for est, c in cols_by_est.items() if label in c}
        _histogram(ax, label, results, cols, reference, bins)
    if curves:
        _variance(axes[len(labels)], curves, labels, list(results))
    fig.subplots_adjust(left=0.05 if ncols > 1 else 0.1, right=0.98, bottom=0.14 / nrows, top=1 - 0.1 / nrows,
                        wspace=0.22, hspace=0.45)
    return fig


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc, buf = [], 0.0, []
    for v in values:
        buf.append(v)
        acc += v
        if len(buf) > window:
            acc -= buf.pop(0)
        out.append(acc / len(buf))
    return out


def learning_curve_figure(histories: Mapping[str, Any], title: str | None = None) -> StorchFigure:
    """Cost estimate per training step per estimator (raw, faint; running mean,
    bold), and, when there are at most 4 scalar parameters, their trajectories."""
    if not histories:
        raise ValueError("learning_curve_figure needs at least one history")
    names = list(dict.fromkeys(n for h in histories.values() for n in h.trace))
    show_params = 0 < len(names) <= 4
    fig = StorchFigure(figsize=(9.2 if show_params else 5.2, 3.5), dpi=DPI)
    axes = fig.subplots(1, 2 if show_params else 1, squeeze=False).reshape(-1)
    ax = axes[0]
    for i, (est, h) in enumerate(histories.items()):
        color = COLORS[i % len(COLORS)]
        steps = list(range(1, len(h.cost) + 1))
        window = max(1, len(h.cost) // 25)
        ax.plot(steps, h.cost, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(h.cost, window), color=color, linewidth=1.8,
                label=f"{est}: final {h.final_cost():.4g}")
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("cost estimate", fontsize=9)
    first = next(iter(histories.values()))
    ax.set_title(title or f"learning curve ({first.optimizer}, lr {first.lr:g}, {first.samples} samples)", fontsize=10)
    ax.tick_params(labelsize=8)
    ax.legend(loc="upper right", fontsize=7, frameon=False)
    if show_params:
        ax2 = axes[1]
        for i, (est, h) in enumerate(histories.items()):
            color = COLORS[i % len(COLORS)]
            for j, n in enumerate(names):
                if n not in h.trace:
                    continue
                ys = h.trace[n] + ([float(h.params[n])] if n in h.params else [])
                ax2.plot(range(len(ys)), ys, color=color, linestyle=("-", "--", ":", "-.")[j % 4], linewidth=1.4,
                         label=f"{est} · {n}" if len(names) > 1 else est)
        ax2.set_xlabel("step", fontsize=9)
        ax2.set_title(f"parameters ({', '.join(names)})", fontsize=10)
        ax2.tick_params(labelsize=8)
        ax2.legend(loc="best", fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.09 if show_params else 0.14, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    return fig
