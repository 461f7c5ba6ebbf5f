"""Experiments on a story (``storch_nb.experiments``) and the plots of them
(``storch_nb.figures``): numbers behind the plots, figure contents, and no
global matplotlib state."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SEED_STORY, bernoulli_text, seed_truth

matplotlib = pytest.importorskip("matplotlib")

import storch_nb as sn  # noqa: E402
from storch_nb import experiments  # noqa: E402
from storch_nb import figures as plots  # noqa: E402

TRUTH = seed_truth()


@pytest.fixture(scope="module")
def seed():
    return sn.Story(SEED_STORY)


@pytest.fixture(scope="module")
def seed_reference(seed):
    return experiments.reference(seed)


def test_sample_grid_and_chunks():
    assert experiments.sample_grid(1) == [1]
    assert experiments.sample_grid(100) == [1, 3, 10, 30, 100]
    assert experiments.sample_grid(250) == [1, 3, 10, 30, 100, 250]
    assert experiments._chunks(100, 200, 10**6) == [200]
    assert experiments._chunks(1000, 5, 2000) == [2, 3]  # never a chunk of 1 run
    assert sum(experiments._chunks(7, 1001, 700)) == 1001 and min(experiments._chunks(7, 1001, 700)) >= 2


def test_run_chunked_merges_runs(seed):
    whole = experiments.run_chunked(seed, "pathwise", 50, 40, seed=3)
    split = experiments.run_chunked(seed, "pathwise", 50, 40, seed=3, draws=500)  # 4 chunks of 10 runs
    assert whole.runs == split.runs == 40
    assert split.grads["c"].shape == (40,) and split.costs.shape == (40,)
    ticks = []
    experiments.run_chunked(seed, "pathwise", 50, 40, seed=3, draws=500, tick=lambda: ticks.append(1))
    assert len(ticks) == 4
    for res in (whole, split):
        g = res.grads["c"].double()
        assert abs(g.mean().item() - TRUTH["c"]) < 4 * g.std().item() / math.sqrt(40)
    assert split.stderr["c"].item() == pytest.approx(split.grads["c"].std().item() / math.sqrt(40), rel=1e-5)


def test_reference_exact_or_high_sample(seed, seed_reference):
    ref = seed_reference
    assert not ref.exact and ref.label == "reference (100,000 samples, pathwise)"
    for name in ("a", "b", "c"):
        assert abs(ref.value(name) - TRUTH[name]) < 4 * ref.stderr(name)
    toy = sn.Story(bernoulli_text(0.0, 0.45))
    exact = experiments.reference(toy)
    assert exact.exact and exact.label == "exact" and exact.stderr("t") == 0.0
    assert exact.value("t") == pytest.approx(0.025, abs=1e-7)


def test_variance_shrinks_as_one_over_s(seed):
    curve = experiments.variance_curve(seed, "pathwise", 100, 300, seed=0)
    assert sorted(curve) == [1, 3, 10, 30, 100]
    xs = torch.log(torch.tensor(sorted(curve), dtype=torch.float64))
    ys = torch.log(torch.tensor([curve[s]["c"] for s in sorted(curve)], dtype=torch.float64))
    slope = (((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()).item()
    assert -1.25 < slope < -0.75, slope
    # one pathwise sample: dE/dc = 2 (a + b) e with e ~ N(c + b, 1), so the variance is 4 (a + b)^2 = 36
    assert abs(curve[1]["c"] - 36.0) < 4 * 36.0 * math.sqrt(2 / 299)
    # rloo cannot run with one sample: that point is left out, not an error
    assert 1 not in experiments.variance_curve(seed, "rloo", 10, 20, seed=0)


def test_gradient_figure_contents(seed, seed_reference):
    results = {e: experiments.run_chunked(seed, e, 100, 100, seed=0) for e in ("pathwise", "score")}
    curves = {e: experiments.variance_curve(seed, e, 100, 100, seed=0, known=r) for e, r in results.items()}
    fig = plots.gradient_figure(results, None, seed_reference, curves)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes) == 4  # a, b, c and the variance plot
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == [f"∂E/∂{n}: 100 estimates × 100 samples" for n in "abc"]
    ax_c = fig.axes[2]
    # the reference is a vertical line at its value, labelled so
    vlines = [ln for ln in ax_c.lines if len(set(ln.get_xdata())) == 1]
    assert len(vlines) == 1 and vlines[0].get_xdata()[0] == pytest.approx(seed_reference.value("c"))
    legend = [t.get_text() for t in ax_c.get_legend().get_texts()]
    assert legend[0].startswith("pathwise: mean") and legend[1].startswith("score: mean")
    assert legend[2].startswith("reference (100,000 samples, pathwise)")
    var_ax = fig.axes[3]
    assert var_ax.get_xscale() == "log" and var_ax.get_yscale() == "log"
    var_legend = [t.get_text() for t in var_ax.get_legend().get_texts()]
    assert "∝ 1/S" in var_legend and "pathwise" in var_legend and "score" in var_legend
    # the 1/S line: slope -1 on log-log
    slope_line = next(ln for ln in var_ax.lines if ln.get_label() == "∝ 1/S")
    (x0, x1), (y0, y1) = slope_line.get_xdata(), slope_line.get_ydata()
    assert math.log(y1 / y0) / math.log(x1 / x0) == pytest.approx(-1.0)
    png = fig._repr_png_()
    assert png.startswith(b"\x89PNG")


def test_comparison_table(seed, seed_reference):
    results = {"pathwise": experiments.run_chunked(seed, "pathwise", 100, 200, seed=0)}
    cmp = experiments.comparison(results, seed_reference.result)
    row = cmp.row("pathwise", "c")
    g = results["pathwise"].grads["c"].double()
    assert row["mean"] == pytest.approx(g.mean().item())
    assert row["variance"] == pytest.approx(g.var().item())
    assert row["std"] == pytest.approx(g.std().item())
    assert row["bias"] == pytest.approx(g.mean().item() - seed_reference.value("c"))
    assert row["seconds"] > 0


def test_comparison_rows_are_story_compares():
    """One comparison builder: Story.compare's table is comparison() of its results,
    row for row (labels name / name[i] for every entry, bias against the exact gradient)."""
    story = sn.Story("w = param(torch.zeros(12))\nt = param(0.0)\nb ~ Bernoulli(logits=t + w)\ncost ((b - 0.3)**2).sum()\n")
    cmp = story.compare(["score", "rloo"], samples=4, runs=5, seed=0, namespace={"torch": torch}, fit_steps=0)
    built = experiments.comparison(cmp.results, cmp.reference)
    assert cmp.reference is not None and built.reference is cmp.reference
    assert [(r["estimator"], r["param"]) for r in built.table] == [(r["estimator"], r["param"]) for r in cmp.table]
    assert [r["param"] for r in built.table][:13] == ["w[0]", "w[1]", "w[2]", "w[3]", "w[4]", "w[5]", "w[6]",
                                                      "w[7]", "w[8]", "w[9]", "w[10]", "w[11]", "t"]
    for mine, theirs in zip(built.table, cmp.table):
        assert mine == pytest.approx(theirs, nan_ok=True)
    assert (built.samples, built.runs) == (cmp.samples, cmp.runs) == (4, 5)
    # the lab and --plot show at most 10 entries per parameter
    short = experiments.comparison(cmp.results, cmp.reference, max_entries=10)
    assert [r["param"] for r in short.table if r["estimator"] == "score"][-2:] == ["w[9]", "t"]
    # no reference: no bias
    assert all(r["bias"] is None for r in experiments.comparison(cmp.results, None).table)


def test_experiments_import_no_matplotlib():
    code = (
        "import sys, storch_nb.experiments; "
        "print(','.join(m for m in ('matplotlib', 'ipywidgets') if m in sys.modules) or '-')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "-"


def test_learning_curve_figure():
    story = sn.Story(bernoulli_text(0.0, 0.45))
    hists = {}
    for est in ("rloo", "score"):
        story.reset()
        hists[est] = story.train(steps=10, lr=0.1, estimator=est, samples=10, seed=0)
    fig = plots.learning_curve_figure(hists)
    assert len(fig.axes) == 2
    assert fig.axes[0].get_xlabel() == "step" and fig.axes[0].get_ylabel() == "cost estimate"
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0].startswith("rloo: final") and legend[1].startswith("score: final")
    assert len(fig.axes[0].lines) == 4  # raw and smoothed per estimator
    assert "t" in fig.axes[1].get_title()
    assert fig._repr_png_().startswith(b"\x89PNG")


def test_no_global_matplotlib_state(seed):
    rc = dict(matplotlib.rcParams)
    backend = matplotlib.get_backend()
    nums = sys.modules["matplotlib.pyplot"].get_fignums() if "matplotlib.pyplot" in sys.modules else None
    res = {"pathwise": experiments.run_chunked(seed, "pathwise", 10, 20, seed=0)}
    plots.figure_png(plots.gradient_figure(res))
    plots.figure_png(seed.draw())
    assert dict(matplotlib.rcParams) == rc
    assert matplotlib.get_backend() == backend
    if nums is not None:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == nums
