"""Drawing a story's graph with matplotlib (``story.draw()``, ``%%storch --graph``).

The conventions of stochastic computation graphs (Schulman et al., 2015;
the Storchastic seed page):

========================  ==========================================  ====================
node kind                  shape (matplotlib patch)                    colour
========================  ==========================================  ====================
``deterministic``          rectangle (``Rectangle``)                   blue
``stochastic``             ellipse (``Ellipse``)                       orange
``param``                  hexagon (``Polygon``), bold label           green
``input``                  parallelogram (``Polygon``), dashed edge    grey
``cost``                   diamond (``Polygon``)                       red
========================  ==========================================  ====================

Edges are arrows following the data (from a value to the steps that read
it), drawn as annotations (not patches). Each node's patch carries the gid
``"KIND:NAME"``. The layout is layered and reads top-down, computed here
without graphviz: each node's layer is the length of the longest path from a
source (parameters and inputs are sources), costs are put on the bottom
layer, and the nodes of a layer are ordered by a few sweeps of the barycenter
heuristic (the mean position of their neighbours in the layer above, then
below), which keeps edge crossings low for the small graphs stories make.
For a Graphviz rendering, use ``story.graph.to_dot()``.
"""

from __future__ import annotations

from typing import Any

from matplotlib.lines import Line2D
from matplotlib.patches import Ellipse, Polygon, Rectangle
from matplotlib.path import Path

from ..graph import Graph
from .render import DPI, StorchFigure

__all__ = ["STYLE", "draw_graph", "layers", "layout"]

#: per node kind: face colour, edge colour, line style
STYLE: dict[str, tuple[str, str, str]] = {
    "deterministic": ("#dbe9f6", "#2b5d8a", "solid"),
    "stochastic": ("#fde2c8", "#b35806", "solid"),
    "param": ("#e6f5d0", "#4d9221", "solid"),
    "input": ("#eeeeee", "#666666", "dashed"),
    "cost": ("#f8d0d0", "#b2182b", "solid"),
}

_X_GAP = 1.7  # horizontal distance between neighbours in a layer (data units = inches)
_Y_GAP = 1.05  # vertical distance between layers
_H = 0.46  # node height


def _topological(graph: Graph) -> list[str]:
    names = [n.name for n in graph.nodes]
    indeg = {n: 0 for n in names}
    children: dict[str, list[str]] = {n: [] for n in names}
    for a, b in graph.edges:
        if a in indeg and b in indeg:
            indeg[b] += 1
            children[a].append(b)
    ready = [n for n in names if indeg[n] == 0]
    out: list[str] = []
    while ready:
        n = ready.pop(0)
        out.append(n)
        for c in children[n]:
            indeg[c] -= 1
            if indeg[c] == 0:
                ready.append(c)
    out.extend(n for n in names if n not in out)  # a cycle cannot happen; be safe anyway
    return out


def _neighbours(graph: Graph, order: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each node's parents and children (edges between known nodes only)."""
    parents: dict[str, list[str]] = {n: [] for n in order}
    children: dict[str, list[str]] = {n: [] for n in order}
    for a, b in graph.edges:
        if a in parents and b in parents:
            parents[b].append(a)
            children[a].append(b)
    return parents, children


def _levels(graph: Graph, order: list[str], parents: dict[str, list[str]],
            children: dict[str, list[str]]) -> dict[str, int]:
    """Each node's layer: the longest path from a source, costs on one bottom
    layer, sources pulled down next to their first reader."""
    level: dict[str, int] = {}
    for n in order:
        level[n] = 1 + max((level[p] for p in parents[n] if p in level), default=-1)
    costs = {n.name for n in graph.nodes if n.kind == "cost"}
    bottom = max((level[n] for n in order if n not in costs), default=-1) + 1
    for c in costs:  # every cost on one bottom layer, below everything else
        level[c] = bottom
    # pull sources (params, inputs) down next to their first reader, so that a
    # parameter read only deep in the story does not sit alone at the top
    for n in order:
        if not parents[n] and children[n]:
            level[n] = max(0, min(level[c] for c in children[n]) - 1)
    return level


def _sweep(row: list[str], neighbours: dict[str, list[str]], pos: dict[str, float]) -> list[str]:
    """``row`` ordered by the mean position of each node's ``neighbours`` (ties: as it was);
    ``pos`` gets the new, centred positions."""

    def key(item: tuple[int, str]) -> tuple[float, int]:
        i, n = item
        ns = [pos[m] for m in neighbours[n] if m in pos]
        return (sum(ns) / len(ns) if ns else pos[n], i)

    new = [n for _, n in sorted(enumerate(row), key=key)]
    for i, n in enumerate(new):
        pos[n] = float(i) - (len(new) - 1) / 2
    return new


def layers(graph: Graph) -> list[list[str]]:
    """The nodes by layer, top to bottom (longest-path layering, costs at the bottom),
    each layer ordered by barycenter sweeps."""
    order = _topological(graph)
    parents, children = _neighbours(graph, order)
    level = _levels(graph, order, parents, children)
    depth = max(level.values(), default=-1) + 1
    rows: list[list[str]] = [[] for _ in range(depth)]
    for n in order:
        rows[level[n]].append(n)
    pos = {n: float(i) - (len(row) - 1) / 2 for row in rows for i, n in enumerate(row)}  # every layer centred
    for _ in range(4):
        for k in range(1, depth):
            rows[k] = _sweep(rows[k], parents, pos)
        for k in range(depth - 2, -1, -1):
            rows[k] = _sweep(rows[k], children, pos)
    return rows


def layout(graph: Graph) -> dict[str, tuple[float, float]]:
    """Node name -> (x, y) centre, in inches: layers top-down, nodes of a layer
    spread evenly and centred."""
    rows = layers(graph)
    out: dict[str, tuple[float, float]] = {}
    for k, row in enumerate(rows):
        for i, n in enumerate(row):
            out[n] = ((i - (len(row) - 1) / 2) * _X_GAP, -k * _Y_GAP)
    return out


def _width(label: str) -> float:
    return max(0.75, 0.11 * len(label) + 0.4)


def _patch(kind: str, x: float, y: float, w: float, h: float) -> Any:
    face, edge, style = STYLE.get(kind, STYLE["deterministic"])
    common = {"facecolor": face, "edgecolor": edge, "linewidth": 1.4, "linestyle": style, "zorder": 2}
    if kind == "stochastic":
        return Ellipse((x, y), w * 1.12, h * 1.2, **common)
    if kind == "param":
        d = 0.16
        pts = [(x - w / 2, y), (x - w / 2 + d, y + h / 2), (x + w / 2 - d, y + h / 2), (x + w / 2, y),
               (x + w / 2 - d, y - h / 2), (x - w / 2 + d, y - h / 2)]
        return Polygon(pts, closed=True, **common)
    if kind == "input":
        d = 0.12
        pts = [(x - w / 2 + d, y + h / 2), (x + w / 2 + d, y + h / 2), (x + w / 2 - d, y - h / 2),
               (x - w / 2 - d, y - h / 2)]
        return Polygon(pts, closed=True, **common)
    if kind == "cost":
        w, h = w * 1.25, h * 1.3
        pts = [(x, y + h / 2), (x + w / 2, y), (x, y - h / 2), (x - w / 2, y)]
        return Polygon(pts, closed=True, **common)
    return Rectangle((x - w / 2, y - h / 2), w, h, **common)


def _legend_handles(kinds: list[str]) -> list[Line2D]:
    para = Path([(-0.8, -0.6), (0.5, -0.6), (0.8, 0.6), (-0.5, 0.6), (-0.8, -0.6)],
                [Path.MOVETO, Path.LINETO, Path.LINETO, Path.LINETO, Path.CLOSEPOLY])
    markers = {"param": "h", "input": para, "deterministic": "s", "stochastic": "o", "cost": "D"}
    out = []
    for kind in ("param", "input", "deterministic", "stochastic", "cost"):
        if kind in kinds:
            face, edge, _ = STYLE[kind]
            out.append(Line2D([], [], linestyle="none", marker=markers[kind], markersize=10, markerfacecolor=face,
                              markeredgecolor=edge, label=kind))
    return out


def draw_graph(graph: Graph, ax: Any = None, title: str | None = None) -> StorchFigure:
    """Draw ``graph`` and return the Figure (a new one unless ``ax`` is given;
    then the figure of ``ax``). See the module docstring for the conventions."""
    pos = layout(graph)
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    widths = {n.name: _width(n.name) for n in graph.nodes}
    wmax = max(widths.values(), default=1.0)
    x0, x1 = min(xs) - wmax * 0.75, max(xs) + wmax * 0.75
    y0, y1 = min(ys) - 0.5, max(ys) + 0.5
    if ax is None:
        # one data unit = one inch, so circles stay round without forcing an aspect
        width = max(3.0, x1 - x0)
        x0, x1 = (x0 + x1) / 2 - width / 2, (x0 + x1) / 2 + width / 2
        legend, top = 0.45, (0.35 if title else 0.0)
        height = (y1 - y0) + legend + top
        fig = StorchFigure(figsize=(width, height), dpi=DPI)
        ax = fig.add_axes((0.0, legend / height, 1.0, (y1 - y0) / height))
    else:
        fig = ax.figure
    patches = {}
    for node in graph.nodes:
        x, y = pos[node.name]
        p = _patch(node.kind, x, y, widths[node.name], _H)
        p.set_gid(f"{node.kind}:{node.name}")
        ax.add_patch(p)
        patches[node.name] = p
        ax.text(x, y, node.name, ha="center", va="center", fontsize=10, zorder=3,
                fontweight="bold" if node.kind == "param" else "normal")
    for a, b in graph.edges:
        if a not in pos or b not in pos:
            continue
        span = abs(pos[a][1] - pos[b][1]) / _Y_GAP
        rad = 0.0 if span <= 1.01 or pos[a][0] != pos[b][0] else 0.25
        ax.annotate("", xy=pos[b], xytext=pos[a], zorder=1,
                    arrowprops={"arrowstyle": "-|>", "color": "#444444", "linewidth": 1.1, "mutation_scale": 12,
                                "patchA": patches[a], "patchB": patches[b], "shrinkA": 1, "shrinkB": 1,
                                "connectionstyle": f"arc3,rad={rad}"})
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_axis_off()
    kinds = sorted({n.kind for n in graph.nodes})
    if kinds:
        ax.legend(handles=_legend_handles(kinds), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(kinds),
                  frameon=False, fontsize=8, handletextpad=0.3, columnspacing=1.0)
    if title:
        ax.set_title(title, fontsize=10)
    return fig
