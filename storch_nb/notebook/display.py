"""What a ``%%storch`` cell shows: a compact table as HTML, with a text/plain twin.

Both renderings are built from one intermediate table (``_Table``), so the HTML
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

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

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

#: at most this many entries of one parameter get their own row
MAX_ENTRIES = 10

_DASH = "—"


# ---------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------


def fmt(x: Any, digits: int = 4) -> str:
    """A number as text with ``digits`` significant digits; ``""`` for ``None``."""
    if x is None:
        return ""
    if hasattr(x, "detach"):  # a tensor
        t = x.detach()
        if t.numel() == 1:
            x = t.reshape(()).item()
        else:
            values = t.reshape(-1).tolist()
            shown = ", ".join(fmt(v, digits) for v in values[:6])
            return "[" + shown + (", …" if len(values) > 6 else "") + "]"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    s = f"{v:.{digits}g}"
    if s in ("-0", "-0.0"):
        s = "0"
    return s


def fmt_seconds(seconds: Any) -> str:
    """Time taken, e.g. ``3.21 ms`` or ``1.234 s``."""
    if seconds is None:
        return ""
    s = float(seconds)
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if s < 1.0:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.4g} s"


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return ""
    return str(dtype).replace("torch.", "")


def _flat(x: Any) -> list[float] | None:
    """A tensor / number / sequence as a flat list of floats (``None`` stays ``None``)."""
    if x is None:
        return None
    if hasattr(x, "detach"):
        return [float(v) for v in x.detach().reshape(-1).double().tolist()]
    if isinstance(x, (list, tuple)):
        out: list[float] = []
        for v in x:
            sub = _flat(v)
            out.extend(sub if sub is not None else [math.nan])
        return out
    return [float(x)]


def _entry(values: list[float] | None, i: int) -> float | None:
    if values is None or not values:
        return None
    if len(values) == 1:
        return values[0]
    return values[i] if i < len(values) else None


def _shape(x: Any) -> tuple[int, ...]:
    if hasattr(x, "shape"):
        return tuple(int(s) for s in x.shape)
    return ()


def _index_label(flat_index: int, shape: Sequence[int]) -> str:
    """``[i, j]`` for a flat index into ``shape`` (``""`` for a scalar)."""
    if not shape:
        return ""
    idx = []
    rest = flat_index
    for size in reversed(shape):
        idx.append(rest % size if size else 0)
        rest = rest // size if size else 0
    return "[" + ", ".join(str(i) for i in reversed(idx)) + "]"


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------
# the intermediate table and its two renderings
# ---------------------------------------------------------------------------


@dataclass
class _Table:
    header: list[str]
    rows: list[list[str]]
    #: lines shown above the table (what was run)
    caption: str = ""
    #: lines shown below the table (estimators used, notes)
    notes: list[str] = field(default_factory=list)
    #: how many leading columns are labels (left aligned); the rest are numbers
    label_cols: int = 1


def _render_text(t: _Table) -> str:
    ncol = len(t.header)
    rows = [t.header] + t.rows
    widths = [max(len(r[c]) for r in rows) for c in range(ncol)]
    lines = []
    if t.caption:
        lines.append(t.caption)
    for k, r in enumerate(rows):
        cells = []
        for c in range(ncol):
            if c < t.label_cols:
                cells.append(r[c].ljust(widths[c]))
            else:
                cells.append(r[c].rjust(widths[c]))
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.extend(t.notes)
    return "\n".join(lines)


_TD = "padding:1px 8px;"


def _render_html(t: _Table) -> str:
    e = html.escape
    parts = ['<div class="storch-nb">']
    parts.append(
        '<table class="storch-nb-table" style="border-collapse:collapse;font-variant-numeric:tabular-nums;margin:0">'
    )
    if t.caption:
        parts.append(f'<caption style="text-align:left;caption-side:top;font-size:90%">{e(t.caption)}</caption>')
    parts.append("<thead><tr>")
    for c, h in enumerate(t.header):
        align = "left" if c < t.label_cols else "right"
        parts.append(f'<th style="text-align:{align};{_TD}">{e(h)}</th>')
    parts.append("</tr></thead><tbody>")
    for r in t.rows:
        parts.append("<tr>")
        for c, cell in enumerate(r):
            if c < t.label_cols:
                inner = f"<code>{e(cell)}</code>" if cell else ""
                parts.append(f'<td style="text-align:left;{_TD}">{inner}</td>')
            else:
                parts.append(f'<td style="text-align:right;{_TD}">{e(cell)}</td>')
        parts.append("</tr>")
    parts.append("</tbody></table>")
    if t.notes:
        notes = "<br>".join(e(n) for n in t.notes)
        parts.append(f'<div style="font-size:90%;margin-top:2px">{notes}</div>')
    parts.append("</div>")
    return "".join(parts)


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


def _result_table(
    res: Any,
    exact: Any = None,
    grads: Sequence[str] | None = None,
    notes: Sequence[str] = (),
) -> _Table:
    runs = int(getattr(res, "runs", 1) or 1)
    many = runs > 1
    param_names = list(getattr(res, "params", {}) or {})
    for name in getattr(res, "grads", {}) or {}:
        if name not in param_names:
            param_names.append(name)
    names = _pick_names(param_names, grads)

    header = ["", "value", "mean estimate" if many else "estimate", "± s.e."]
    if many:
        header.append("std over runs")
    if exact is not None:
        header.append("exact")

    rows: list[list[str]] = []
    more: list[str] = []

    # the cost
    cost_se = getattr(res, "cost_stderr", None)
    row = ["E[cost]", "", fmt(getattr(res, "cost", None)), fmt(cost_se)]
    if many:
        row.append(fmt(cost_se * math.sqrt(runs)) if cost_se is not None else "")
    if exact is not None:
        row.append(fmt(getattr(exact, "cost", None)))
    rows.append(row)

    for name in names:
        g = res.grads[name]
        value = (getattr(res, "params", {}) or {}).get(name)
        se = _stderr_of(res, name)
        if many and hasattr(g, "detach") and g.dim() >= 1:
            gd = g.detach().double()
            mean = gd.mean(0)
            std = gd.std(0) if gd.shape[0] > 1 else None
            if se is None and std is not None:
                se = std / math.sqrt(gd.shape[0])
            shape = _shape(mean)
        else:
            mean, std = g, None
            shape = _shape(g)
        if value is not None and _shape(value):
            shape = _shape(value)
        means, ses, stds = _flat(mean), _flat(se), _flat(std)
        values = _flat(value)
        ex = None
        if exact is not None:
            ex = _flat((getattr(exact, "grads", {}) or {}).get(name))
        n = _numel(shape)
        for i in range(min(n, MAX_ENTRIES)):
            label = f"∂E/∂{name}{_index_label(i, shape)}"
            row = [label, fmt(_entry(values, i)), fmt(_entry(means, i)), fmt(_entry(ses, i))]
            if many:
                row.append(fmt(_entry(stds, i)))
            if exact is not None:
                row.append(fmt(_entry(ex, i)))
            rows.append(row)
        if n > MAX_ENTRIES:
            dims = "×".join(str(s) for s in shape)
            more.append(
                f"{name}: {n - MAX_ENTRIES} more entries not shown (shape {dims}); use --out NAME to get them all"
            )

    what = f"{getattr(res, 'samples', '?')} samples × {runs} run{'s' if many else ''}"
    bits = [what]
    if getattr(res, "device", None):
        bits.append(str(res.device))
    if getattr(res, "dtype", None) is not None:
        bits.append(_dtype_name(res.dtype))
    if getattr(res, "seconds", None) is not None:
        bits.append(fmt_seconds(res.seconds))
    caption = "storch: " + " · ".join(bits)
    if many:
        caption += f" (estimate = mean over {runs} runs)"

    out_notes = []
    ests = getattr(res, "estimators", None) or {}
    if ests:
        out_notes.append("estimators: " + "; ".join(f"{k}: {v}" for k, v in ests.items()))
    else:
        out_notes.append("estimators: none (no stochastic sites)")
    out_notes.extend(more)
    out_notes.extend(notes)
    return _Table(header=header, rows=rows, caption=caption, notes=out_notes)


def result_html(res: Any, exact: Any = None, grads: Sequence[str] | None = None, notes: Sequence[str] = ()) -> str:
    """HTML table of a ``Result`` (and the exact reference ``exact`` if given)."""
    return _render_html(_result_table(res, exact, grads, notes))


def result_text(res: Any, exact: Any = None, grads: Sequence[str] | None = None, notes: Sequence[str] = ()) -> str:
    """The text/plain twin of :func:`result_html`."""
    return _render_text(_result_table(res, exact, grads, notes))


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


def _comparison_table(
    cmp: Any,
    grads: Sequence[str] | None = None,
    reference: Any = None,
    notes: Sequence[str] = (),
    reference_label: str = "exact",
) -> _Table:
    if reference is None:
        reference = getattr(cmp, "reference", None)
    table = list(getattr(cmp, "table", []) or [])
    params_seen: list[str] = []
    for r in table:
        if r.get("param") not in params_seen:
            params_seen.append(r.get("param"))
    wanted = _pick_names(params_seen, _expand_entries(grads, params_seen))

    header = ["estimator", "param", "mean", "std", "variance", "bias", "time"]
    if reference is not None:
        header.append(reference_label)
    rows: list[list[str]] = []
    for name in wanted:
        for r in table:
            if r.get("param") != name:
                continue
            means = _flat(r.get("mean"))
            stds = _flat(r.get("std"))
            variances = _flat(r.get("variance"))
            biases = _flat(r.get("bias"))
            ex = None
            if reference is not None:
                ex = _flat(_reference_grad(reference, name))
            n = max(len(means or [0]), 1)
            shape: tuple[int, ...] = _shape(r.get("mean"))
            if _numel(shape) != n:
                shape = (n,) if n > 1 else ()
            for i in range(min(n, MAX_ENTRIES)):
                row = [
                    str(r.get("estimator", "")),
                    f"{name}{_index_label(i, shape)}",
                    fmt(_entry(means, i)),
                    fmt(_entry(stds, i)),
                    fmt(_entry(variances, i)),
                    fmt(_entry(biases, i)) if biases is not None else _DASH,
                    fmt_seconds(r.get("seconds")),
                ]
                if reference is not None:
                    row.append(fmt(_entry(ex, i)))
                rows.append(row)

    results = getattr(cmp, "results", None) or {}
    first = next(iter(results.values()), None)
    bits = []
    if first is not None:
        runs = getattr(first, "runs", "?")
        bits.append(f"{getattr(first, 'samples', '?')} samples × {runs} runs per estimator")
        if getattr(first, "device", None):
            bits.append(str(first.device))
        if getattr(first, "dtype", None) is not None:
            bits.append(_dtype_name(first.dtype))
    caption = "storch compare" + (": " + " · ".join(bits) if bits else "")
    out_notes = [f"mean, std, variance: of one estimate (over runs); bias: mean − {reference_label}"]
    if reference is None:
        out_notes.append("no exact reference (the story is not enumerable): bias not known")
    else:
        out_notes.append(f"{reference_label} E[cost] = {fmt(getattr(reference, 'cost', None))}")
    out_notes.extend(notes)
    return _Table(header=header, rows=rows, caption=caption, notes=out_notes, label_cols=2)


def comparison_html(
    cmp: Any,
    grads: Sequence[str] | None = None,
    reference: Any = None,
    notes: Sequence[str] = (),
    reference_label: str = "exact",
) -> str:
    """HTML table of a ``Story.compare`` result. ``reference_label`` names the
    reference column (``"exact"``, or e.g. ``"reference"`` for a high-sample one)."""
    return _render_html(_comparison_table(cmp, grads, reference, notes, reference_label))


def comparison_text(
    cmp: Any,
    grads: Sequence[str] | None = None,
    reference: Any = None,
    notes: Sequence[str] = (),
    reference_label: str = "exact",
) -> str:
    """The text/plain twin of :func:`comparison_html`."""
    return _render_text(_comparison_table(cmp, grads, reference, notes, reference_label))


# ---------------------------------------------------------------------------
# training histories
# ---------------------------------------------------------------------------


def _training_table(histories: Any, notes: Sequence[str] = ()) -> _Table:
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
    return _Table(header=header, rows=rows, caption=caption, notes=out_notes)


def training_html(histories: Any, notes: Sequence[str] = ()) -> str:
    """HTML table of a training ``History`` (or a dict estimator -> History)."""
    return _render_html(_training_table(histories, notes))


def training_text(histories: Any, notes: Sequence[str] = ()) -> str:
    """The text/plain twin of :func:`training_html`."""
    return _render_text(_training_table(histories, notes))


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
