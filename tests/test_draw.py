"""Drawing the graph (``story.draw()``, ``storch_nb.figures.graph``) and its DOT text (``story.graph.to_dot()``)."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import SEED_STORY
from torch import nn

pytest.importorskip("matplotlib")
from matplotlib.patches import Ellipse, FancyBboxPatch, Polygon, Rectangle  # noqa: E402
from matplotlib.text import Annotation  # noqa: E402

import storch_nb as sn  # noqa: E402
from storch_nb.figures import figure_png  # noqa: E402
from storch_nb.figures import graph as nbdraw  # noqa: E402

LOOP_STORY = """\
w = param(torch.zeros(3))
for i in range(3):
    a ~ Bernoulli(logits=w[i] + x)
    cost (a - 0.5)**2
z = net(w)
cost z.sum()
"""


def loop_story():
    story = sn.Story(LOOP_STORY)
    story.run(samples=4, namespace={"x": torch.tensor(1.0), "net": nn.Linear(3, 1), "torch": torch}, seed=0)
    return story


def shapes(ax):
    rects = [p for p in ax.patches if isinstance(p, (Rectangle, FancyBboxPatch))]
    ellipses = [p for p in ax.patches if isinstance(p, Ellipse)]
    polygons = [p for p in ax.patches if isinstance(p, Polygon)]
    return rects, ellipses, polygons


@pytest.mark.parametrize("which", ["seed", "loop"])
def test_shapes_match_node_kinds(which):
    story = sn.Story(SEED_STORY) if which == "seed" else loop_story()
    graph = story.graph
    fig = story.draw()
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    rects, ellipses, polygons = shapes(ax)
    assert len(rects) == len(graph.of_kind("deterministic"))
    assert len(ellipses) == len(graph.of_kind("stochastic"))
    others = len(graph.of_kind("param")) + len(graph.of_kind("input")) + len(graph.of_kind("cost"))
    assert len(polygons) == others
    assert len(ax.patches) == len(graph.nodes)
    # every node is labelled and tagged KIND:NAME
    labels = [t.get_text() for t in ax.texts if not isinstance(t, Annotation)]
    assert sorted(labels) == sorted(n.name for n in graph.nodes)
    assert sorted(p.get_gid() for p in ax.patches) == sorted(f"{n.kind}:{n.name}" for n in graph.nodes)
    # one arrow per edge
    arrows = [t for t in ax.texts if isinstance(t, Annotation)]
    assert len(arrows) == len(graph.edges)
    # a legend names the kinds present
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(legend) == sorted({n.kind for n in graph.nodes})
    assert figure_png(fig).startswith(b"\x89PNG")


def test_seed_story_shapes():
    fig = sn.Story(SEED_STORY).draw()
    by_gid = {p.get_gid(): p for p in fig.axes[0].patches}
    assert isinstance(by_gid["deterministic:d"], Rectangle)
    assert isinstance(by_gid["deterministic:f"], Rectangle)
    assert isinstance(by_gid["stochastic:e"], Ellipse)
    assert isinstance(by_gid["param:a"], Polygon) and len(by_gid["param:a"].get_xy()) == 7  # hexagon (closed)
    assert isinstance(by_gid["cost:cost"], Polygon) and len(by_gid["cost:cost"].get_xy()) == 5  # diamond
    bold = [t for t in fig.axes[0].texts if not isinstance(t, Annotation) and t.get_fontweight() == "bold"]
    assert sorted(t.get_text() for t in bold) == ["a", "b", "c"]  # parameters are marked


def test_inputs_are_dashed_parallelograms():
    fig = loop_story().draw()
    by_gid = {p.get_gid(): p for p in fig.axes[0].patches}
    x = by_gid["input:x"]
    assert isinstance(x, Polygon) and x.get_linestyle() in ("--", "dashed")
    assert "param:net" in by_gid and "param:w" in by_gid


@pytest.mark.parametrize("which", ["seed", "loop"])
def test_layout_reads_top_down(which):
    story = sn.Story(SEED_STORY) if which == "seed" else loop_story()
    graph = story.graph
    pos = nbdraw.layout(graph)
    assert set(pos) == {n.name for n in graph.nodes}
    for a, b in graph.edges:  # every edge points down
        assert pos[a][1] > pos[b][1], (a, b)
    costs = [n.name for n in graph.of_kind("cost")]
    bottom = min(y for _, y in pos.values())
    assert all(pos[c][1] == bottom for c in costs)
    # no two nodes at the same place
    assert len(set(pos.values())) == len(pos)


def test_barycenter_ordering_keeps_chains_straight():
    # two independent chains: each child sits under its own parent (no crossing)
    story = sn.Story("u = param(0.0)\nv = param(1.0)\nx ~ Normal(v, 1)\ny ~ Normal(u, 1)\ncost x + y\n")
    pos = nbdraw.layout(story.graph)
    assert (pos["u"][0] < pos["v"][0]) == (pos["y"][0] < pos["x"][0])


def test_draw_into_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    out = sn.Story(SEED_STORY).draw(ax=ax)
    assert out is fig and len(ax.patches) == 7


def test_no_pyplot_state():
    before = None
    if "matplotlib.pyplot" in sys.modules:
        before = sys.modules["matplotlib.pyplot"].get_fignums()
    sn.Story(SEED_STORY).draw()
    if before is not None:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == before


def test_story_draw_is_the_figures_package():
    from storch_nb import figures
    from storch_nb.notebook import draw

    assert draw.draw_graph is figures.draw_graph  # the old import path still works
    assert isinstance(sn.Story(SEED_STORY).draw(), figures.StorchFigure)


def test_to_dot():
    dot = sn.Story(SEED_STORY).graph.to_dot()
    assert dot.startswith('digraph "story" {') and dot.rstrip().endswith("}")
    assert '"d" [label="d", shape=box' in dot
    assert '"e" [label="e", shape=ellipse' in dot
    assert '"a" [label="a", shape=hexagon' in dot
    assert '"cost" [label="cost", shape=diamond' in dot
    for a, b in [("a", "d"), ("b", "d"), ("c", "e"), ("b", "e"), ("d", "f"), ("e", "f"), ("f", "cost")]:
        assert f'"{a}" -> "{b}";' in dot
    assert "rankdir=TB" in dot
    loop = loop_story().graph.to_dot(name="loop")
    assert '"x" [label="x", shape=parallelogram, style="filled,dashed"' in loop
    assert '"a[0]" -> "cost1[0]";' in loop
    assert "rank=sink" in loop  # several costs share the bottom rank
    odd = sn.Graph([sn.Node('q"1', "input", None), sn.Node("k", "cost", 1)], [('q"1', "k")])
    assert '"q\\"1" -> "k";' in odd.to_dot()
