"""The survey table as a figure: single-sample gradient variances per cost,
parameter and estimator, on a log scale, with the exact values marked.

:func:`survey_figure` draws a table such as the Gaussian one of Mohamed et al.
(JMLR 2020, "Monte Carlo Gradient Estimation in Machine Learning"): one panel
per cost, in each a group of bars per parameter (one bar per estimator, the
same colour in every panel), the exact variance (by quadrature, say) as a
black tick across its bar, and a star over the lowest variance of each group.
The numbers come from ``Story.compare`` (its ``table``) or any rows with the
same keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogLocator, NullLocator

from .render import COLORS, DPI, StorchFigure

__all__ = ["survey_figure"]

_KEYS = ("cost", "estimator", "param", "variance")


def _rows(table: Any) -> list[dict]:
    """The table as a list of dicts: a pandas DataFrame (``to_dict("records")``) or
    an iterable of mappings with the keys cost, estimator, param, variance (and
    optionally exact)."""
    if hasattr(table, "to_dict") and not isinstance(table, Mapping):
        table = table.to_dict("records")
    rows = [dict(r) for r in table] if isinstance(table, Iterable) and not isinstance(table, (str, Mapping)) else None
    if rows is None:
        raise TypeError("survey_figure takes a DataFrame or a list of rows (mappings)")
    for r in rows:
        missing = [k for k in _KEYS if k not in r]
        if missing:
            raise ValueError(f"a row of the survey table has no {', '.join(missing)}: {r}")
    return rows


def _finite(v: Any) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _label(v: float) -> str:
    if v == 0:
        return "0"
    if 1e3 <= abs(v) < 1e5:
        return f"{v:.0f}"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e3 else f"{v:.1e}"


def _panel(ax: Any, rows: list[dict], estimators: list[str], floor: float) -> None:
    params = list(dict.fromkeys(r["param"] for r in rows))
    width = 0.8 / len(estimators)
    for g, param in enumerate(params):
        group = {r["estimator"]: r for r in rows if r["param"] == param}
        values = {e: _finite(r["variance"]) for e, r in group.items()}
        positive = [v for v in values.values() if v is not None and v > 0]
        zeros = [e for e, v in values.items() if v is not None and v <= 0]
        best = min(positive) if positive and not zeros else 0.0
        for i, est in enumerate(estimators):
            if est not in group:
                continue
            x = g - 0.4 + width * (i + 0.5)
            v = values[est]
            color = COLORS[i % len(COLORS)]
            if v is not None and v > 0:
                ax.bar(x, v - floor, width * 0.9, bottom=floor, color=color, alpha=0.85, zorder=2)
            shown = 0.0 if v is not None and v <= 0 else v
            if shown is not None:
                top = max(shown, floor)
                star = shown == best
                ax.text(x, top * 1.15, ("★\n" if star else "") + _label(shown), ha="center", va="bottom",
                        fontsize=6.5, fontweight="bold" if star else "normal", linespacing=1.0)
            exact = _finite(group[est].get("exact"))
            if exact is not None:
                ax.plot([x - width * 0.45, x + width * 0.45], [max(exact, floor)] * 2, color="black",
                        linewidth=2.2, solid_capstyle="butt", zorder=3)
    ax.set_xticks(range(len(params)), [f"∂/∂{p}" for p in params], fontsize=9)
    ax.set_xlim(-0.5, len(params) - 0.5)


def survey_figure(table: Any, title: str | None = None, exact_label: str = "quadrature") -> StorchFigure:
    """One panel per cost: the variance of each estimator's gradient estimate per
    parameter as bars on a log scale (value written above, a star on the lowest
    of each group), the ``exact`` column as a black tick across each bar.

    ``table``: a DataFrame or a list of rows, each with ``cost``, ``estimator``,
    ``param``, ``variance`` and optionally ``exact`` (e.g. ``Story.compare(...).table``
    rows with a ``cost`` added). A variance of 0 (an estimator that is exact for
    that cost), or below 1e-12 of the largest one (rounding noise), is written as
    0 at the bottom of the axis."""
    rows = _rows(table)
    if not rows:
        raise ValueError("survey_figure needs at least one row")
    largest = max((abs(v) for r in rows if (v := _finite(r["variance"])) is not None), default=0.0)
    for r in rows:  # rounding noise of an exact estimator (1e-32 next to 1e3) is a zero variance
        for key in ("variance", "exact"):
            v = _finite(r.get(key))
            if v is not None and abs(v) <= 1e-12 * largest:
                r[key] = 0.0
    costs = list(dict.fromkeys(r["cost"] for r in rows))
    estimators = list(dict.fromkeys(r["estimator"] for r in rows))
    values = [v for r in rows for v in (_finite(r["variance"]), _finite(r.get("exact"))) if v is not None and v > 0]
    lo, hi = (min(values), max(values)) if values else (1.0, 1.0)
    floor = 10 ** math.floor(math.log10(lo) - 0.5)
    fig = StorchFigure(figsize=(3.3 * len(costs) + 0.6, 3.7), dpi=DPI)
    axes = fig.subplots(1, len(costs), squeeze=False, sharey=True)[0]
    for ax, cost in zip(axes, costs):
        _panel(ax, [r for r in rows if r["cost"] == cost], estimators, floor)
        ax.set_yscale("log")
        ax.set_ylim(floor, hi * 10 ** (0.35 * math.log10(hi / floor) + 0.3))
        ax.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.grid(axis="y", color="0.9", zorder=0)
        ax.set_title(f"cost {cost}", fontsize=10)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("variance of one estimate (log)", fontsize=9)
    handles = [Patch(color=COLORS[i % len(COLORS)], alpha=0.85, label=e) for i, e in enumerate(estimators)]
    if any(_finite(r.get("exact")) is not None for r in rows):
        handles.append(Line2D([], [], color="black", linewidth=2.2, label=exact_label))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.2, top=0.84 if title else 0.9, wspace=0.08)
    return fig
