"""Plots of gradient estimators and training runs (matplotlib, rendered as PNG).

- :func:`gradient_figure`: histograms of the R gradient estimates per
  parameter, overlaid per estimator, with the reference as a vertical line,
  and the variance-versus-samples plot on log-log axes with a 1/S slope.
- :func:`learning_curve_figure`: cost per training step, per estimator, and
  the trajectories of the scalar parameters.

The numbers come from :mod:`storch_nb.experiments` (``run_chunked``,
``variance_curve``, ``reference``); the figures are :class:`StorchFigure`
instances, so they show inline whichever matplotlib backend is active.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

from ..engine.result import Result
from ..experiments import Reference, entries
from .render import COLORS, DPI, StorchFigure

__all__ = ["MAX_PANELS", "gradient_figure", "learning_curve_figure"]

#: at most this many histogram panels in one figure
MAX_PANELS = 6

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
