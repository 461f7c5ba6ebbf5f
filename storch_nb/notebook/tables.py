"""The tables a ``%%storch`` cell shows, before rendering: :class:`Table` (a
header, rows of text, a caption and notes) rendered as HTML or as its
text/plain twin, and the number formatting both use (4 significant digits).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DASH",
    "MAX_ENTRIES",
    "Table",
    "dtype_name",
    "entry",
    "flat",
    "fmt",
    "fmt_seconds",
    "index_label",
    "numel",
    "render_html",
    "render_text",
    "shape_of",
]

#: at most this many entries of one parameter get their own row
MAX_ENTRIES = 10

DASH = "—"


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


def dtype_name(dtype: Any) -> str:
    if dtype is None:
        return ""
    return str(dtype).replace("torch.", "")


def flat(x: Any) -> list[float] | None:
    """A tensor / number / sequence as a flat list of floats (``None`` stays ``None``)."""
    if x is None:
        return None
    if hasattr(x, "detach"):
        return [float(v) for v in x.detach().reshape(-1).double().tolist()]
    if isinstance(x, (list, tuple)):
        out: list[float] = []
        for v in x:
            sub = flat(v)
            out.extend(sub if sub is not None else [math.nan])
        return out
    return [float(x)]


def entry(values: list[float] | None, i: int) -> float | None:
    if values is None or not values:
        return None
    if len(values) == 1:
        return values[0]
    return values[i] if i < len(values) else None


def shape_of(x: Any) -> tuple[int, ...]:
    if hasattr(x, "shape"):
        return tuple(int(s) for s in x.shape)
    return ()


def index_label(flat_index: int, shape: Sequence[int]) -> str:
    """``[i, j]`` for a flat index into ``shape`` (``""`` for a scalar)."""
    if not shape:
        return ""
    idx = []
    rest = flat_index
    for size in reversed(shape):
        idx.append(rest % size if size else 0)
        rest = rest // size if size else 0
    return "[" + ", ".join(str(i) for i in reversed(idx)) + "]"


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------
# the intermediate table and its two renderings
# ---------------------------------------------------------------------------


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    #: lines shown above the table (what was run)
    caption: str = ""
    #: lines shown below the table (estimators used, notes)
    notes: list[str] = field(default_factory=list)
    #: how many leading columns are labels (left aligned); the rest are numbers
    label_cols: int = 1


def render_text(t: Table) -> str:
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


def render_html(t: Table) -> str:
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
