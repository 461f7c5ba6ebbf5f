"""What a ``%%storch`` cell shows: a compact table as HTML, with a text/plain twin.

Both renderings are built from one intermediate table (``tables.Table``), so the HTML
and the plain text always carry the same numbers. Numbers are shown with 4
significant digits.

Public functions (all return ``str``):

- ``result_html(res, exact=None, grads=None)`` / ``result_text(...)``: one
  ``Result`` of ``Story.run``: the cost estimate and, per parameter, its value,
  the gradient estimate with its standard error (with ``runs > 1``: the mean
  over runs, its standard error and the standard deviation across runs) and,
  when ``exact`` (the ``Result`` of ``Story.exact``) is given, the exact values.
  ``grads`` restricts the parameters shown.
- ``comparison_html(cmp, grads=None, reference=None)`` / ``comparison_text(...)``:
  the table of ``Story.compare``: per estimator and parameter the mean, standard
  deviation, variance and bias of the gradient estimate, and the time taken.

- ``training_html(histories)`` / ``training_text(...)``: a training ``History``
  (or a dict estimator -> History): steps, first and final cost, final
  parameter values, time.

``ResultView``, ``ComparisonView`` and ``TrainingView`` wrap these in an object with
``_repr_html_`` and ``__repr__`` for ``IPython.display.display``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from .tables import (
    DASH,
    MAX_ENTRIES,
    Table,
    dtype_name,
    entry,
    flat,
    fmt,
    fmt_seconds,
    index_label,
    numel,
    render_html,
    render_text,
    shape_of,
)

__all__ = [
    "ComparisonView",
    "ResultView",
    "TrainingView",
    "comparison_html",
    "comparison_text",
    "fmt",
    "result_html",
    "result_text",
    "training_html",
    "training_text",
]


# ---------------------------------------------------------------------------
# one Result
# ---------------------------------------------------------------------------


def _pick_names(available: Iterable[str], grads: Sequence[str] | None) -> list[str]:
    available = list(available)
    if grads is None:
        return available
    unknown = [g for g in grads if g not in available]
    if unknown:
        raise KeyError(
            f"no parameter named {', '.join(map(repr, unknown))}; parameters: {', '.join(available) or '(none)'}"
        )
    return list(grads)


def _stderr_of(res: Any, name: str) -> Any:
    se = getattr(res, "stderr", None)
    if se is None:
        return None
    try:
        return se.get(name)
    except AttributeError:
        return None


def _param_names(res: Any) -> list[str]:
    """The parameters of a result: its ``params`` first, then any other gradient."""
    names = list(getattr(res, "params", {}) or {})
    names += [name for name in getattr(res, "grads", {}) or {} if name not in names]
    return names


def _cost_row(res: Any, exact: Any, runs: int) -> list[str]:
    cost_se = getattr(res, "cost_stderr", None)
    row = ["E[cost]", "", fmt(getattr(res, "cost", None)), fmt(cost_se)]
    if runs > 1:
        row.append(fmt(cost_se * math.sqrt(runs)) if cost_se is not None else "")
    if exact is not None:
        row.append(fmt(getattr(exact, "cost", None)))
    return row


def _grad_stats(res: Any, name: str, many: bool) -> tuple[Any, Any, Any, tuple[int, ...]]:
    """(mean, standard error, std over runs, shape) of one parameter's gradient estimate."""
    g = res.grads[name]
    se = _stderr_of(res, name)
    if many and hasattr(g, "detach") and g.dim() >= 1:
        gd = g.detach().double()
        mean = gd.mean(0)
        std = gd.std(0) if gd.shape[0] > 1 else None
        if se is None and std is not None:
            se = std / math.sqrt(gd.shape[0])
        return mean, se, std, shape_of(mean)
    return g, se, None, shape_of(g)


def _param_rows(res: Any, name: str, exact: Any, many: bool) -> tuple[list[list[str]], list[str]]:
    """The rows of one parameter (one per entry, at most MAX_ENTRIES) and a note on the rest."""
    mean, se, std, shape = _grad_stats(res, name, many)
    value = (getattr(res, "params", {}) or {}).get(name)
    if value is not None and shape_of(value):
        shape = shape_of(value)
    means, ses, stds, values = flat(mean), flat(se), flat(std), flat(value)
    ex = flat((getattr(exact, "grads", {}) or {}).get(name)) if exact is not None else None
    n = numel(shape)
    rows = []
    for i in range(min(n, MAX_ENTRIES)):
        row = [f"∂E/∂{name}{index_label(i, shape)}", fmt(entry(values, i)), fmt(entry(means, i)), fmt(entry(ses, i))]
        if many:
            row.append(fmt(entry(stds, i)))
        if exact is not None:
            row.append(fmt(entry(ex, i)))
        rows.append(row)
    if n <= MAX_ENTRIES:
        return rows, []
    dims = "×".join(str(s) for s in shape)
    return rows, [f"{name}: {n - MAX_ENTRIES} more entries not shown (shape {dims}); use --out NAME to get them all"]


def _result_caption(res: Any, runs: int) -> str:
    bits = [f"{getattr(res, 'samples', '?')} samples × {runs} run{'s' if runs > 1 else ''}"]
    if getattr(res, "device", None):
        bits.append(str(res.device))
    if getattr(res, "dtype", None) is not None:
        bits.append(dtype_name(res.dtype))
    if getattr(res, "seconds", None) is not None:
        bits.append(fmt_seconds(res.seconds))
    caption = "storch: " + " · ".join(bits)
    if runs > 1:
        caption += f" (estimate = mean over {runs} runs)"
    return caption


def _result_table(res: Any, exact: Any = None, grads: Sequence[str] | None = None, notes: Sequence[str] = ()) -> Table:
    runs = int(getattr(res, "runs", 1) or 1)
    many = runs > 1
    header = ["", "value", "mean estimate" if many else "estimate", "± s.e."]
    if many:
        header.append("std over runs")
    if exact is not None:
        header.append("exact")
    rows = [_cost_row(res, exact, runs)]
    more: list[str] = []
    for name in _pick_names(_param_names(res), grads):
        param_rows, note = _param_rows(res, name, exact, many)
        rows += param_rows
        more += note
    ests = getattr(res, "estimators", None) or {}
    used = "; ".join(f"{k}: {v}" for k, v in ests.items()) if ests else "none (no stochastic sites)"
    return Table(header=header, rows=rows, caption=_result_caption(res, runs), notes=[f"estimators: {used}", *more, *notes])


def result_html(res: Any, exact: Any = None, grads: Sequence[str] | None = None, notes: Sequence[str] = ()) -> str:
    """HTML table of a ``Result`` (and the exact reference ``exact`` if given)."""
    return render_html(_result_table(res, exact, grads, notes))


def result_text(res: Any, exact: Any = None, grads: Sequence[str] | None = None, notes: Sequence[str] = ()) -> str:
    """The text/plain twin of :func:`result_html`."""
    return render_text(_result_table(res, exact, grads, notes))


# ---------------------------------------------------------------------------
# a comparison of estimators
# ---------------------------------------------------------------------------


def _expand_entries(grads: Sequence[str] | None, available: Sequence[str]) -> list[str] | None:
    """``--grad x`` also picks the rows ``x[0]``, ``x[1]``, ... of a comparison."""
    if grads is None:
        return None
    out: list[str] = []
    for g in grads:
        hits = [a for a in available if a == g or a.startswith(g + "[")]
        out.extend(h for h in (hits or [g]) if h not in out)
    return out


def _reference_grad(reference: Any, name: str) -> Any:
    """The exact gradient for ``name``, which may be an entry such as ``x[0, 1]``."""
    grads = getattr(reference, "grads", {}) or {}
    if name in grads:
        return grads[name]
    base, bracket, rest = name.partition("[")
    if not bracket or base not in grads or not rest.endswith("]"):
        return None
    try:
        index = tuple(int(i) for i in rest[:-1].split(","))
        return grads[base][index]
    except (ValueError, IndexError, TypeError):
        return None


def _comparison_rows(r: dict, name: str, reference: Any) -> list[list[str]]:
    """The rows of one table row ``r`` (one per entry of its statistics, at most MAX_ENTRIES)."""
    means, stds, variances, biases = (flat(r.get(k)) for k in ("mean", "std", "variance", "bias"))
    ex = flat(_reference_grad(reference, name)) if reference is not None else None
    n = max(len(means or [0]), 1)
    shape: tuple[int, ...] = shape_of(r.get("mean"))
    if numel(shape) != n:
        shape = (n,) if n > 1 else ()
    rows = []
    for i in range(min(n, MAX_ENTRIES)):
        row = [
            str(r.get("estimator", "")),
            f"{name}{index_label(i, shape)}",
            fmt(entry(means, i)),
            fmt(entry(stds, i)),
            fmt(entry(variances, i)),
            fmt(entry(biases, i)) if biases is not None else DASH,
            fmt_seconds(r.get("seconds")),
        ]
        if reference is not None:
            row.append(fmt(entry(ex, i)))
        rows.append(row)
    return rows


def _comparison_caption(cmp: Any) -> str:
    results = getattr(cmp, "results", None) or {}
    first = next(iter(results.values()), None)
    if first is None:
        return "storch compare"
    bits = [f"{getattr(first, 'samples', '?')} samples × {getattr(first, 'runs', '?')} runs per estimator"]
    if getattr(first, "device", None):
        bits.append(str(first.device))
    if getattr(first, "dtype", None) is not None:
        bits.append(dtype_name(first.dtype))
    return "storch compare: " + " · ".join(bits)


def _comparison_table(
    cmp: Any,
    grads: Sequence[str] | None = None,
    reference: Any = None,
    notes: Sequence[str] = (),
    reference_label: str = "exact",
) -> Table:
    if reference is None:
        reference = getattr(cmp, "reference", None)
    table = list(getattr(cmp, "table", []) or [])
    params_seen = list(dict.fromkeys(r.get("param") for r in table))
    wanted = _pick_names(params_seen, _expand_entries(grads, params_seen))
    header = ["estimator", "param", "mean", "std", "variance", "bias", "time"]
    if reference is not None:
        header.append(reference_label)
    rows = [row for name in wanted for r in table if r.get("param") == name
            for row in _comparison_rows(r, name, reference)]
    out_notes = [f"mean, std, variance: of one estimate (over runs); bias: mean − {reference_label}"]
    if reference is None:
        out_notes.append("no exact reference (the story is not enumerable): bias not known")
    else:
        out_notes.append(f"{reference_label} E[cost] = {fmt(getattr(reference, 'cost', None))}")
    return Table(header=header, rows=rows, caption=_comparison_caption(cmp), notes=[*out_notes, *notes], label_cols=2)


def comparison_html(
    cmp: Any,
    grads: Sequence[str] | None = None,
    reference: Any = None,
    notes: Sequence[str] = (),
    reference_label: str = "exact",
) -> str:
    """HTML table of a ``Story.compare`` result. ``reference_label`` names the
    reference column (``"exact"``, or e.g. ``"reference"`` for a high-sample one)."""
    return render_html(_comparison_table(cmp, grads, reference, notes, reference_label))


def comparison_text(
    cmp: Any,
    grads: Sequence[str] | None = None,
    reference: Any = None,
    notes: Sequence[str] = (),
    reference_label: str = "exact",
) -> str:
    """The text/plain twin of :func:`comparison_html`."""
    return render_text(_comparison_table(cmp, grads, reference, notes, reference_label))


# ---------------------------------------------------------------------------
# training histories
# ---------------------------------------------------------------------------


def _training_table(histories: Any, notes: Sequence[str] = ()) -> Table:
    """One row per estimator: steps, first and final cost, final parameter values."""
    if not isinstance(histories, dict):
        histories = {getattr(histories, "estimator", "auto"): histories}
    names: list[str] = []
    for h in histories.values():
        for n in getattr(h, "params", {}) or {}:
            if n not in names:
                names.append(n)
    header = ["estimator", "steps", "first cost", "final cost", *names, "time"]
    rows: list[list[str]] = []
    for label, h in histories.items():
        cost = list(getattr(h, "cost", []) or [])
        final = h.final_cost() if hasattr(h, "final_cost") else (cost[-1] if cost else None)
        row = [str(label), str(getattr(h, "steps", len(cost))), fmt(cost[0] if cost else None), fmt(final)]
        params = getattr(h, "params", {}) or {}
        for n in names:
            row.append(fmt(params.get(n)))
        row.append(fmt_seconds(getattr(h, "seconds", None)))
        rows.append(row)
    first = next(iter(histories.values()), None)
    caption = "storch train"
    if first is not None:
        caption += (
            f": {getattr(first, 'optimizer', '?')}, lr {fmt(getattr(first, 'lr', None))}, "
            f"{getattr(first, 'samples', '?')} samples per step"
        )
    out_notes = ["final cost: mean cost estimate over the last tenth of the steps"]
    for label, h in histories.items():
        if getattr(h, "stopped", None):
            out_notes.append(f"{label}: {h.stopped}")
    out_notes.extend(notes)
    return Table(header=header, rows=rows, caption=caption, notes=out_notes)


def training_html(histories: Any, notes: Sequence[str] = ()) -> str:
    """HTML table of a training ``History`` (or a dict estimator -> History)."""
    return render_html(_training_table(histories, notes))


def training_text(histories: Any, notes: Sequence[str] = ()) -> str:
    """The text/plain twin of :func:`training_html`."""
    return render_text(_training_table(histories, notes))


# ---------------------------------------------------------------------------
# objects for IPython.display.display
# ---------------------------------------------------------------------------


class ResultView:
    """A ``Result`` as the notebook shows it (HTML, with a text/plain twin)."""

    def __init__(
        self,
        result: Any,
        exact: Any = None,
        grads: Sequence[str] | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        self.result = result
        self.exact = exact
        self.grads = list(grads) if grads is not None else None
        self.notes = list(notes)

    def _repr_html_(self) -> str:
        return result_html(self.result, self.exact, self.grads, self.notes)

    def __repr__(self) -> str:
        return result_text(self.result, self.exact, self.grads, self.notes)


class ComparisonView:
    """A ``Story.compare`` result as the notebook shows it."""

    def __init__(
        self,
        comparison: Any,
        grads: Sequence[str] | None = None,
        reference: Any = None,
        notes: Sequence[str] = (),
        reference_label: str = "exact",
    ) -> None:
        self.comparison = comparison
        self.grads = list(grads) if grads is not None else None
        self.reference = reference
        self.notes = list(notes)
        self.reference_label = reference_label

    def _repr_html_(self) -> str:
        return comparison_html(self.comparison, self.grads, self.reference, self.notes, self.reference_label)

    def __repr__(self) -> str:
        return comparison_text(self.comparison, self.grads, self.reference, self.notes, self.reference_label)


class TrainingView:
    """A training ``History`` (or several, by estimator) as the notebook shows it."""

    def __init__(self, histories: Any, notes: Sequence[str] = ()) -> None:
        self.histories = histories
        self.notes = list(notes)

    def _repr_html_(self) -> str:
        return training_html(self.histories, self.notes)

    def __repr__(self) -> str:
        return training_text(self.histories, self.notes)
