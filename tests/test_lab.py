"""The estimator lab (``storch_nb.lab``): controls, synchronous re-runs, numbers, errors.

Widgets are driven from Python (setting ``.value`` runs the observers, as a
browser change does in a kernel); outside a kernel the widgets have no
front end, so what the panel shows is read from the widgets themselves
(``Image.value``, ``HTML.value``, layouts). The browser test
(tests/test_browser.py) checks the rendered page.

Numbers: seed story at a, b, c = 1, 2, 0.5 (dE/dc = 15, dE/db = 22.25,
dE/da = 7.25); each check is within 4 standard errors of the runs' mean.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SEED_STORY, bernoulli_text, seed_truth

ipywidgets = pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

import storch_nb as sn  # noqa: E402
from storch_nb.notebook import lab as nblab  # noqa: E402

TRUTH = seed_truth()
TWO_SITES = """\
t = param(0.0)
m = param(0.5)
b ~ Bernoulli(logits=t)
x ~ Normal(m, 1)
cost (b - 0.45)**2 + x**2
"""


def seed_lab(**kw):
    kw.setdefault("estimators", ["auto", "pathwise", "score", "rloo"])
    return sn.lab(sn.Story(SEED_STORY), **kw)


def assert_mean_near(res, name, truth, k=4.0):
    g = res.grads[name].detach().double()
    se = g.std().item() / math.sqrt(g.numel())
    assert abs(g.mean().item() - truth) <= k * se, f"{name}: {g.mean().item()} vs {truth} (SE {se})"


# ---------------------------------------------------------------------------
# the panel
# ---------------------------------------------------------------------------


def test_controls_by_name_and_panel():
    lab = seed_lab()
    c = lab.controls
    for name in ("estimator", "samples", "runs", "param", "compare", "progress", "status", "plot", "table", "output"):
        assert name in c, name
    assert isinstance(c["estimator"], ipywidgets.Dropdown) and c["estimator"].description == "estimator"
    assert isinstance(c["samples"], ipywidgets.FloatLogSlider)
    assert (c["samples"].base, c["samples"].min, c["samples"].max) == (10, 0, 5)  # 1 .. 100,000
    assert isinstance(c["runs"], ipywidgets.BoundedIntText)
    assert isinstance(c["param"], ipywidgets.Dropdown) and list(c["param"].options) == ["a", "b", "c"]
    assert isinstance(c["compare"], ipywidgets.SelectMultiple)
    assert isinstance(c["progress"], ipywidgets.IntProgress)
    assert isinstance(c["plot"], ipywidgets.Image)
    assert isinstance(lab.widget, ipywidgets.VBox)
    assert "estimator:e" not in c  # one site: no per-site dropdowns

    def descendants(w):
        yield w
        for child in getattr(w, "children", ()):
            yield from descendants(child)

    shown = list(descendants(lab.widget))
    for name in ("estimator", "samples", "runs", "param", "compare", "progress", "plot", "table"):
        assert any(w is c[name] for w in shown), name
    # a short text form (what a notebook stores as text/plain), and the widget view
    bundle = lab._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("<storch lab")
    lab.close()


def test_first_run_matches_closed_form():
    lab = seed_lab()
    assert lab.error is None
    res = lab.result
    assert (res.samples, res.runs) == (100, 200)
    assert res.grads["c"].shape == (200,)
    for name in ("a", "b", "c"):
        assert_mean_near(res, name, TRUTH[name])
    assert lab.figure is not None and bytes(lab.controls["plot"].value).startswith(b"\x89PNG")
    assert "mean" in lab.controls["table"].value and "variance" in lab.controls["table"].value
    # the reference of a continuous story is a high-sample estimate, labelled so
    assert not lab.reference.exact and "100,000 samples" in lab.reference.label


def test_estimator_switch_reruns_and_redraws():
    lab = seed_lab()
    lab.controls["param"].value = "c"
    old_result, old_figure, old_png = lab.result, lab.figure, bytes(lab.controls["plot"].value)
    sd_pathwise = old_result.grads["c"].std().item()
    lab.controls["estimator"].value = "score"
    assert lab.error is None
    assert lab.result is not old_result and lab.figure is not old_figure
    assert bytes(lab.controls["plot"].value) != old_png
    assert lab.result.estimators == {"e": "score"}
    assert_mean_near(lab.result, "c", TRUTH["c"])
    assert lab.result.grads["c"].std().item() > 3 * sd_pathwise  # score is far noisier here
    title = lab.figure.axes[0].get_title()
    assert "∂E/∂c" in title
    legend = [t.get_text() for t in lab.figure.axes[0].get_legend().get_texts()]
    assert any(t.startswith("score") for t in legend)
    assert any(t.startswith("reference (100,000 samples") for t in legend)
    # the second axes: variance against samples, log-log
    var_ax = lab.figure.axes[1]
    assert var_ax.get_xscale() == "log" and var_ax.get_yscale() == "log"
    assert lab.updates >= 3
    lab.close()


def test_samples_runs_param_and_compare():
    lab = seed_lab()
    c = lab.controls
    c["runs"].value = 50
    assert lab.result.runs == 50 and lab.result.grads["c"].shape == (50,)
    c["samples"].value = 300
    assert lab.result.samples == 300 and lab.error is None
    assert c["param"].value == "b"  # at first: the first parameter upstream of a site
    before = lab.figure
    c["param"].value = "a"
    assert lab.figure is not before
    assert "∂E/∂a" in lab.figure.axes[0].get_title()
    c["param"].value = "b"
    c["compare"].value = ("score", "rloo")
    assert list(lab.results) == ["auto (pathwise)", "score", "rloo"]
    legend = [t.get_text() for t in lab.figure.axes[0].get_legend().get_texts()]
    assert sum(t.startswith(("auto", "score", "rloo")) for t in legend) == 3
    assert set(lab.curves) == set(lab.results)
    # variance at the largest sample count is below the variance at 1 sample (by about 300x)
    curve = lab.curves["auto (pathwise)"]
    assert sorted(curve) == [1, 3, 10, 30, 100, 300]
    assert curve[300]["b"] < curve[1]["b"] / 30
    table = c["table"].value
    for name in ("score", "rloo", "auto (pathwise)"):
        assert name in table
    c["runs"].value = 1
    assert c["runs"].value == 2 and lab.result.runs == 2
    lab.close()


def test_fitting_estimators_only():
    seed = sn.Story(SEED_STORY)
    fits = nblab.fitting_estimators(seed)
    assert {"auto", "pathwise", "score", "rloo"} <= set(fits["e"])
    assert "enumerate" not in fits["e"]
    assert "reinforce" not in fits["e"] and "reparam" not in fits["e"]  # aliases are left out
    toy = sn.Story(bernoulli_text(0.0, 0.45))
    lab = sn.lab(toy)
    opts = lab.controls["estimator"].options
    assert "pathwise" not in opts
    assert {"auto", "score", "rloo", "enumerate"} <= set(opts)
    assert set(lab.controls["compare"].options) == set(opts)
    assert lab.reference.exact and lab.reference.label == "exact"
    # enumerable story: the exact gradient sigmoid'(0) (1 - 0.9) = 0.025
    assert lab.reference.value("t") == pytest.approx(0.025, abs=1e-6)
    assert_mean_near(lab.result, "t", 0.025)
    lab.close()


class _Counting(sn.Story):
    """A story that counts the calls of the methods that run it."""

    calls: list

    def run(self, *a, **k):
        self.calls.append("run")
        return super().run(*a, **k)

    def exact(self, *a, **k):
        self.calls.append("exact")
        return super().exact(*a, **k)

    def surrogate(self, *a, **k):
        self.calls.append("surrogate")
        return super().surrogate(*a, **k)


def test_building_a_lab_runs_the_story_at_most_twice():
    """What fits is decided from each site's distribution class: making a lab runs
    the story no more than its first update does, plus at most two passes (the old
    lab ran it once per site and estimator: 21 times on this two-site story)."""
    passes = []

    def tick(v):  # called by every pass of the story, however it is run
        passes.append(1)
        return v

    ns = {"tick": tick}
    story = _Counting(TWO_SITES.replace("x ~ Normal(m, 1)", "x ~ Normal(tick(m), 1)"))
    story.calls = []
    story.run(samples=2, namespace=ns)
    per_pass = len(passes)
    assert per_pass >= 1 and story.calls == ["run"]

    story.calls, passes[:] = [], []
    fits = nblab.fitting_estimators(story, ns)
    assert len(story.calls) + len(passes) // per_pass <= 2
    assert (story.calls, len(passes)) == ([], 0)  # measured: no pass at all
    assert "pathwise" not in fits["b"] and "pathwise" in fits["x"]
    assert {"arm", "disarm", "enumerate", "rebar"} <= set(fits["b"]) and "measure_valued" not in fits["b"]
    assert {"lax", "measure_valued"} <= set(fits["x"]) and not {"arm", "enumerate", "gumbel"} & set(fits["x"])

    # a whole lab: its fitting adds nothing to what its first update runs
    counts = {}
    for given in (["auto", "score"], None):
        story.calls, passes[:] = [], []
        lab = sn.lab(story, namespace=ns, runs=10, samples=3, estimators=given)
        counts[given is None] = (len(story.calls), len(passes))
        lab.close()
    (calls_given, passes_given), (calls_fit, passes_fit) = counts[False], counts[True]
    assert calls_fit - calls_given + (passes_fit - passes_given) // per_pass <= 2
    assert (calls_fit, passes_fit) == (calls_given, passes_given)


def test_fits_from_the_class_or_the_namespace_instance():
    """A site written as a namespace distribution is checked on that instance; one
    whose distribution the story computes lists every candidate (the run decides)."""
    ns = {"prior": torch.distributions.Bernoulli(logits=torch.tensor(0.0)), "make": torch.distributions.Normal}
    story = sn.Story("m = param(0.5)\nb ~ prior\nx ~ make(m, 1)\ny ~ D.Normal(m, 1)\ncost b + x + y\n")
    fits = nblab.fitting_estimators(story, ns)
    assert "pathwise" not in fits["b"] and {"arm", "enumerate"} <= set(fits["b"])
    assert "pathwise" in fits["y"] and "arm" not in fits["y"]
    assert "pathwise" in fits["x"]  # `make` is a namespace name: the class Normal
    story = sn.Story("m = param(0.5)\nk = Normal\nx ~ k(m, 1)\ncost x\n")  # a class the story computes
    everything = nblab.fitting_estimators(story, {})["x"]
    assert {"pathwise", "arm", "enumerate"} <= set(everything)


def test_error_shows_in_panel_and_panel_stays_usable():
    toy = sn.Story(bernoulli_text(0.0, 0.45))
    lab = sn.lab(toy, estimators=["rloo", "pathwise"])  # listed as given, unfiltered
    good, good_fig = lab.result, lab.figure
    lab.controls["estimator"].value = "pathwise"
    assert lab.error is not None
    assert "pathwise" in lab.error and "does not fit" in lab.error
    status = lab.controls["status"].value
    assert "does not fit" in status and "<pre" in status
    assert lab.controls["output"].layout.display == "none"  # the stale plot is hidden
    assert lab.result is good and lab.figure is good_fig  # the latest successful run stays
    # still usable
    lab.controls["estimator"].value = "rloo"
    assert lab.error is None
    assert lab.result is not good
    assert lab.controls["output"].layout.display != "none"
    assert "does not fit" not in lab.controls["status"].value
    # another kind of error: rloo with a single sample
    lab.controls["samples"].value = 1
    assert lab.error is not None and "2 samples" in lab.error
    lab.controls["samples"].value = 10
    assert lab.error is None and lab.result.samples == 10
    lab.close()


def test_several_sites_get_their_own_dropdowns():
    story = sn.Story(TWO_SITES)
    lab = sn.lab(story, runs=50)
    c = lab.controls
    assert "estimator:b" in c and "estimator:x" in c
    assert "pathwise" not in c["estimator"].options  # does not fit b
    assert "pathwise" in c["estimator:x"].options
    assert "pathwise" not in c["estimator:b"].options
    assert c["estimator:x"].value == nblab.FOLLOW
    c["estimator"].value = "score"
    assert lab.result.estimators == {"b": "score", "x": "score"}
    c["estimator:x"].value = "pathwise"
    assert lab.estimator_spec() == {"*": "score", "x": "pathwise"}
    assert lab.result.estimators == {"b": "score", "x": "pathwise"}
    assert lab.error is None
    lab.close()


def test_long_runs_show_progress():
    lab = seed_lab(estimator="pathwise", runs=100)
    seen = []
    vis = []
    lab.controls["progress"].observe(lambda ch: seen.append(ch["new"]), names="value")
    lab.controls["progress"].layout.observe(lambda ch: vis.append(ch["new"]), names="visibility")
    lab.controls["samples"].value = 30_000  # 3e6 draws: 3 chunks of 1e6, plus the variance points
    assert lab.error is None and lab.result.samples == 30_000 and lab.result.runs == 100
    assert "visible" in vis and vis[-1] == "hidden"
    ticks = [v for v in seen if v > 0]
    assert len(ticks) >= 3 and ticks == sorted(ticks)
    assert lab.controls["progress"].value == lab.controls["progress"].max
    assert_mean_near(lab.result, "c", TRUTH["c"])
    lab.close()


def test_lab_leaves_story_params_and_rng_alone():
    story = sn.Story(SEED_STORY)
    story.run(samples=10, seed=0)
    with torch.no_grad():
        story.params["c"].fill_(1.5)  # as after training
    state = torch.get_rng_state()
    lab = sn.lab(story, estimators=["pathwise", "score"], runs=50)
    assert torch.equal(torch.get_rng_state(), state)
    assert story.params["c"].item() == 1.5
    assert_mean_near(lab.result, "c", seed_truth(c=1.5)["c"])
    lab.close()


def test_running_and_loading_the_magic_import_no_plotting_or_widgets():
    # (test_engine checks `import storch_nb` alone; here also a run and the magic's module)
    code = (
        "import sys, storch_nb, storch_nb.notebook.magic; "
        "s = storch_nb.Story('c = param(0.5)\\ne ~ Normal(c, 1)\\ncost e**2'); s.run(10); "
        "print(','.join(m for m in ('matplotlib', 'ipywidgets') if m in sys.modules) or '-')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "-"


def test_a_story_that_does_not_run_is_an_error_at_once():
    with pytest.raises(sn.StoryNameError, match="nowhere"):
        sn.lab(sn.Story("c = param(0.5)\ne ~ Normal(c + nowhere, 1)\ncost e**2\n"), runs=10)
    with pytest.raises(sn.EstimatorError, match="does not fit"):
        sn.lab(sn.Story(bernoulli_text(0.0, 0.45)), estimator="pathwise", runs=10)
