"""The engine through the Python API: closed forms, variances against theory,
seeds and torch's generator, learning signals, Result and Comparison.

Tolerances are 4 standard errors (see conftest.py). For the variance of R iid
Gaussian estimates the sample variance has SE sigma^2 sqrt(2/(R-1)); for
non-Gaussian estimates the SE comes from the runs' fourth moment.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import (
    ROOT,
    SEED_STORY,
    assert_within,
    bernoulli_text,
    bernoulli_truth,
    seed_story_text,
    seed_truth,
    variance_se,
)

import storch_nb as sn

# ------------------------------------------------------- variance vs theory

# Storchastic's intro setting: a=5, b=-3, c=0.23, so d = 2 and mu = c + b = -2.77.
A, B, C = 5.0, -3.0, 0.23
MU = C + B
R = 20_000
# pathwise: g_c = 2 d e = 4 (mu + eps)  ->  Var = 16 exactly
PATHWISE_VAR1 = 16.0
# score: g_c = d e^2 (e - mu) = 2 (mu + eps)^2 eps  ->  Var = 4 mu^4 + 56 mu^2 + 60 (= 725.2)
SCORE_VAR1 = 4 * MU**4 + 56 * MU**2 + 60


def test_score_variance_constant():
    assert SCORE_VAR1 == pytest.approx(725.2, abs=0.05)  # NOTES.md
    assert seed_truth(A, B, C)["c"] == pytest.approx(-11.08)


@pytest.mark.parametrize("samples", [1, 10])
def test_pathwise_variance_is_16_over_S(samples):
    story = sn.Story(seed_story_text(A, B, C))
    res = story.run(samples=samples, runs=R, estimator="pathwise", seed=123, dtype="float64")
    g = res.grads["c"]
    assert g.shape == (R,)
    var = PATHWISE_VAR1 / samples
    # the estimates are Gaussian: SE of the sample variance = sigma^2 sqrt(2 / (R - 1))
    assert_within(g.var(), var, var * math.sqrt(2 / (R - 1)), what="pathwise variance")
    assert_within(g.mean(), seed_truth(A, B, C)["c"], math.sqrt(var / R), what="pathwise mean")


@pytest.mark.parametrize("samples", [1, 10])
def test_score_variance_is_725_over_S(samples):
    story = sn.Story(seed_story_text(A, B, C))
    res = story.run(samples=samples, runs=R, estimator="score", seed=321, dtype="float64")
    g = res.grads["c"]
    # heavy-tailed (a cubic in a Gaussian): SE of the sample variance from the empirical 4th moment
    assert_within(g.var(), SCORE_VAR1 / samples, variance_se(g), what="score variance")
    assert_within(g.mean(), seed_truth(A, B, C)["c"], math.sqrt(SCORE_VAR1 / samples / R), what="score mean")


def test_runs_stderr_is_spread_over_sqrt_runs():
    res = sn.Story(SEED_STORY).run(samples=4, runs=500, estimator="pathwise", seed=0)
    for k, g in res.grads.items():
        assert res.stderr[k].item() == pytest.approx(g.std().item() / math.sqrt(500), rel=1e-5)
    assert res.cost == pytest.approx(res.costs.mean().item(), rel=1e-6)


# ------------------------------------------------------ seeds and generator


@pytest.mark.parametrize("estimator", ["pathwise", "score", "rloo", "score(baseline='batch_average')"])
@pytest.mark.parametrize("runs", [1, 7])
def test_same_seed_bit_identical(estimator, runs):
    story = sn.Story(SEED_STORY)
    r1 = story.run(samples=64, runs=runs, estimator=estimator, seed=42)
    r2 = sn.Story(SEED_STORY).run(samples=64, runs=runs, estimator=estimator, seed=42)
    r3 = story.run(samples=64, runs=runs, estimator=estimator, seed=42)
    for k in "abc":
        assert torch.equal(r1.grads[k], r2.grads[k])
        assert torch.equal(r1.grads[k], r3.grads[k])
    assert r1.cost == r2.cost
    r4 = story.run(samples=64, runs=runs, estimator=estimator, seed=43)
    assert not torch.equal(r1.grads["c"], r4.grads["c"])


def test_seed_leaves_global_generator_unchanged():
    story = sn.Story(SEED_STORY)
    torch.manual_seed(2024)
    before = torch.get_rng_state()
    story.run(samples=100, seed=1)
    story.run(samples=100, runs=3, estimator="score", seed=2)
    story.surrogate(samples=100, seed=3)
    sn.Story(bernoulli_text(0.3, 0.45)).compare(["score", "rloo"], samples=8, runs=20, seed=4)
    assert torch.equal(before, torch.get_rng_state())
    expected = torch.rand(3)
    torch.manual_seed(2024)
    assert torch.equal(torch.rand(3), expected)


def test_seed_none_uses_global_generator():
    story = sn.Story(SEED_STORY)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    r1 = story.run(samples=100, estimator="score")
    assert not torch.equal(before, torch.get_rng_state())  # the generator advanced
    r2 = story.run(samples=100, estimator="score")
    assert not torch.equal(r1.grads["c"], r2.grads["c"])
    torch.manual_seed(7)  # like any torch code: reseeding reproduces
    r3 = story.run(samples=100, estimator="score")
    assert torch.equal(r1.grads["c"], r3.grads["c"])


# ------------------------------------------------------- learning signals

ONE_SITE = """\
u = param(0.2)
x ~ Bernoulli(logits=u)
cost x
"""

TWO_SITES = """\
u = param(0.2)
v = param(0.0)
x ~ Bernoulli(logits=u)
cost x
z ~ Normal(v, 1) using score
cost 1000 * z**2
"""


def test_independent_cost_does_not_reach_other_site():
    """x's learning signal is cost1 = x only: the huge-variance independent cost2 = 1000 z^2
    does not change u's estimate at all (same seed, x drawn first), and its variance is the
    closed form p (1-p)^3 / S of the score estimate mean_i x_i (x_i - p)."""
    S, runs = 10, 20_000
    alone = sn.Story(ONE_SITE).run(samples=S, runs=runs, estimator="score", seed=5, dtype="float64")
    both = sn.Story(TWO_SITES).run(samples=S, runs=runs, estimator="score", seed=5, dtype="float64")
    torch.testing.assert_close(both.grads["u"], alone.grads["u"], rtol=0, atol=1e-12)
    p = 1 / (1 + math.exp(-0.2))
    g = both.grads["u"]
    assert_within(g.var(), p * (1 - p) ** 3 / S, variance_se(g), what="Var d/du")
    assert_within(g.mean(), p * (1 - p), g.std() / math.sqrt(runs), what="d/du")
    # and v's gradient: E[1000 z^2] = 1000 (v^2 + 1), d/dv = 2000 v = 0
    assert_within(both.mean_grads()["v"], 0.0, both.stderr["v"], what="d/dv")


UPSTREAM_COST = """\
u = param(0.2)
w = param(-0.5)
x ~ Bernoulli(logits=u)
cost 100 * x
y ~ Bernoulli(logits=w + x)
cost 3 * y
"""

WITHOUT_UPSTREAM_COST = """\
u = param(0.2)
w = param(-0.5)
x ~ Bernoulli(logits=u)
cost 0 * x
y ~ Bernoulli(logits=w + x)
cost 3 * y
"""


def test_upstream_cost_not_in_later_site_signal():
    """cost1 = 100 x is upstream of y, not downstream: y's score term (w's gradient)
    must not see it. Same draws with and without cost1: w's estimate is identical."""
    ns = {}
    with_c1 = sn.Story(UPSTREAM_COST).run(samples=50, runs=20, estimator="score", seed=6, namespace=ns)
    without = sn.Story(WITHOUT_UPSTREAM_COST).run(samples=50, runs=20, estimator="score", seed=6, namespace=ns)
    torch.testing.assert_close(with_c1.grads["w"], without.grads["w"], rtol=1e-6, atol=1e-6)
    # ... while x's signal does include the downstream cost 3 y: u's gradient is exact on average
    ex = sn.Story(UPSTREAM_COST).exact()
    res = sn.Story(UPSTREAM_COST).run(samples=16, runs=2000, estimator="rloo", seed=6)
    for k in "uw":
        assert_within(res.mean_grads()[k], ex.grads[k], res.stderr[k], what=k)


def test_unreached_parameter_warns_and_gets_zero():
    story = sn.Story("a = param(1.0)\nz = param(2.0)\ne ~ Normal(a, 1)\ncost e\n")
    with pytest.warns(UserWarning, match="z"):
        res = story.run(samples=10, seed=0)
    assert res.grads["z"].item() == 0.0
    assert res.grads["a"].item() == pytest.approx(1.0)


# ------------------------------------------------------------- surrogate


def test_surrogate_backward_matches_run():
    story = sn.Story(SEED_STORY)
    res = story.run(samples=200, estimator="rloo", seed=9)
    loss = story.surrogate(samples=200, estimator="rloo", seed=9)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(res.cost, rel=1e-6)
    for p in story.parameters():
        p.grad = None
    loss.backward()
    for k in "abc":
        torch.testing.assert_close(story.params[k].grad, res.grads[k], rtol=1e-6, atol=1e-6)


def test_surrogate_with_namespace_parameter():
    w = torch.tensor(0.3, requires_grad=True)
    story = sn.Story("b ~ Bernoulli(logits=w)\ncost (b - 0.45)**2\n")
    loss = story.surrogate(samples=4000, estimator="enumerate", namespace={"w": w})
    loss.backward()
    assert w.grad.item() == pytest.approx(bernoulli_truth(0.3, 0.45)["grad"], abs=1e-6)


# -------------------------------------------------------------- Python API


def test_import_is_light():
    code = (
        "import sys, storch_nb\n"
        "bad = [m for m in ('matplotlib', 'ipywidgets') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_result_fields():
    res = sn.Story(SEED_STORY).run(samples=300, estimator="pathwise", seed=0)
    assert set(res.grads) == {"a", "b", "c"}
    assert all(g.shape == () and g.dtype == torch.float32 for g in res.grads.values())
    assert isinstance(res.cost, float)
    assert set(res.params) == {"a", "b", "c"}
    assert [res.params[k].item() for k in "abc"] == [1.0, 2.0, 0.5]
    assert res.estimators == {"e": "pathwise"}
    assert (res.samples, res.runs, res.device) == (300, 1, "cpu")
    assert isinstance(res.seconds, float) and 0 < res.seconds < 10
    # pathwise dE/da = mean(e^2) and the cost is mean(d e^2) = 3 mean(e^2), on the same draws
    assert res.cost == pytest.approx(3 * res.grads["a"].item(), rel=1e-5)
    assert "cost" in repr(res)
    runs = sn.Story(SEED_STORY).run(samples=30, runs=4, seed=0)
    assert runs.runs == 4 and all(g.shape == (4,) for g in runs.grads.values())
    assert runs.estimators == {"e": "pathwise"}  # auto on Normal


def test_vector_param_shapes_with_runs():
    story = sn.Story("m = param(torch.zeros(2, 3))\nx ~ Normal(m, 1)\ncost (x**2).sum()\n")
    one = story.run(samples=10, seed=0)
    assert one.grads["m"].shape == (2, 3) and one.params["m"].shape == (2, 3)
    many = story.run(samples=10, runs=5, seed=0)
    assert many.grads["m"].shape == (5, 2, 3)


def test_dtype_float64():
    res = sn.Story(SEED_STORY).run(samples=100, seed=0, dtype="float64")
    assert res.dtype == torch.float64
    assert all(g.dtype == torch.float64 for g in res.grads.values())
    assert all(p.dtype == torch.float64 for p in res.params.values())
    runs = sn.Story(SEED_STORY).run(samples=10, runs=3, seed=0, dtype=torch.float64)
    assert all(g.dtype == torch.float64 for g in runs.grads.values())


def test_param_value_exact_in_float64():
    """param(0.23) in a float64 run is the double 0.23, not float32's 0.2300000041."""
    res = sn.Story(seed_story_text(A, B, C)).run(samples=2, seed=0, dtype="float64")
    assert res.params["c"].item() == 0.23


def test_compare_table():
    """Rows per (estimator, parameter) with mean/std/variance/bias/seconds, consistent with
    run() on the same seed and with exact() as the bias reference."""
    story = sn.Story(bernoulli_text(0.3, 0.45))
    cmp = story.compare(["score", "rloo"], samples=8, runs=2000, seed=0)
    truth = bernoulli_truth(0.3, 0.45)
    assert {(r["estimator"], r["param"]) for r in cmp.table} == {("score", "t"), ("rloo", "t")}
    for row in cmp.table:
        assert {"mean", "std", "variance", "bias", "seconds"} <= set(row)
        assert row["variance"] == pytest.approx(row["std"] ** 2, rel=1e-9)
        assert row["bias"] == pytest.approx(row["mean"] - truth["grad"], abs=1e-6)
        assert abs(row["bias"]) <= 4 * row["std"] / math.sqrt(2000) + 1e-6
        assert row["seconds"] > 0
        again = story.run(samples=8, runs=2000, estimator=row["estimator"], seed=0)
        assert row["mean"] == pytest.approx(again.mean_grads()["t"].item(), rel=1e-5, abs=1e-9)
    # score's variance matches the exact formula Var_1 / S within 4 SE of a sample variance
    score = cmp.row("score", "t")
    g = cmp.results["score"].grads["t"]
    assert_within(score["variance"], truth["var1"] / 8, variance_se(g), what="compare variance")
    assert cmp.row("rloo", "t")["variance"] < score["variance"]


def test_compare_vector_param_rows_and_no_reference():
    story = sn.Story("m = param(torch.tensor([0.5, -1.0]))\nx ~ Normal(m, 1)\ncost (x**2).sum()\n")
    cmp = story.compare(["pathwise", "score"], samples=20, runs=400, seed=1)
    assert cmp.reference is None
    assert {r["param"] for r in cmp.table} == {"m[0]", "m[1]"}
    for r in cmp.table:
        assert r["bias"] is None
        # d/dm_i E[sum x^2] = 2 m_i
        truth = {"m[0]": 1.0, "m[1]": -2.0}[r["param"]]
        assert abs(r["mean"] - truth) <= 4 * r["std"] / math.sqrt(400)


def test_options_validated():
    story = sn.Story(SEED_STORY)
    for bad in [dict(samples=0), dict(samples=2.5), dict(runs=0), dict(runs=True)]:
        with pytest.raises(sn.StoryError):
            story.run(**bad)
    with pytest.raises(sn.StoryError):
        story.run(samples=4, dtype="float13")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        story.run(samples=4, seed=0)  # no warning on a plain run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_matches_closed_form():
    res = sn.Story(SEED_STORY).run(
        samples=20_000, estimator="score(baseline='rloo')", seed=0, device="cuda", stderr=True
    )
    assert res.device.startswith("cuda")
    before = torch.cuda.get_rng_state()
    sn.Story(SEED_STORY).run(samples=100, seed=1, device="cuda")
    assert torch.equal(before, torch.cuda.get_rng_state())
    truth = seed_truth()
    for k in "abc":
        assert res.grads[k].device.type == "cuda"
        assert_within(res.grads[k], truth[k], res.stderr[k], what=k)
    r1 = sn.Story(SEED_STORY).run(samples=100, runs=5, seed=3, device="cuda")
    r2 = sn.Story(SEED_STORY).run(samples=100, runs=5, seed=3, device="cuda")
    assert torch.equal(r1.grads["c"], r2.grads["c"])
