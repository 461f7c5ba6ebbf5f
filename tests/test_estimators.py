"""Estimators against closed forms and ``story.exact()``.

Tolerances: an estimate averaged over R independent runs has standard error
std/sqrt(R) (``res.stderr`` with ``runs > 1``); means are checked within 4 SE.
Variances are checked within 4 standard errors of the sample variance, computed
from the runs' empirical fourth moment (``variance_se``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SEED_STORY, assert_within, bernoulli_text, bernoulli_truth, seed_truth, variance_se

import storch_nb as sn

TRUTH = seed_truth()

# ---------------------------------------------------------------- seed story


@pytest.mark.parametrize(
    "estimator",
    ["pathwise", "reparam", "score", "reinforce", "rloo", "score(baseline='rloo')", "score(baseline='moving_average')"],
)
def test_seed_story_unbiased(estimator):
    """Every unbiased estimator hits the closed forms dE/da=7.25, dE/db=22.25, dE/dc=15 within 4 SE."""
    story = sn.Story(SEED_STORY)
    res = story.run(samples=20_000, estimator=estimator, seed=11, stderr=True)
    for name in "abc":
        assert res.grads[name].shape == ()
        assert_within(res.grads[name], TRUTH[name], res.stderr[name], what=f"{estimator} d/d{name}")
        assert res.stderr[name] > 0
    # the cost estimate: E[f] = 21.75; per-sample sd of f = 3 sd(e^2) = 3 sqrt(4 u^2 + 2) with u = 2.5
    se_cost = 3 * math.sqrt(4 * 2.5**2 + 2) / math.sqrt(20_000)
    assert abs(res.cost - TRUTH["cost"]) < 4 * se_cost


def test_seed_story_stderr_matches_theory():
    """``stderr=True`` gives sd/sqrt(S): pathwise dE/dc per-sample sd is 2(a+b)*1 = 6 (g = 2 d e, Var e = 1)."""
    res = sn.Story(SEED_STORY).run(samples=40_000, estimator="pathwise", seed=1, stderr=True)
    # the sample sd of 40000 Gaussians is within 4 * sd/sqrt(2(S-1)) of the truth: relative 1.4%
    assert res.stderr["c"].item() == pytest.approx(6 / math.sqrt(40_000), rel=4 / math.sqrt(2 * 39_999))


@pytest.mark.parametrize("samples", [2, 4])
def test_batch_average_bias_factor(samples):
    """The batch-average baseline includes the sample's own cost, so the score part of
    the gradient is scaled by exactly (1 - 1/S): dE/dc -> 15 (1 - 1/S)."""
    story = sn.Story(SEED_STORY)
    res = story.run(samples=samples, runs=40_000, estimator="score(baseline='batch_average')", seed=5)
    factor = 1 - 1 / samples
    g = res.mean_grads()
    assert_within(g["c"], 15 * factor, res.stderr["c"], what="batch_average d/dc")
    # b: pathwise part (c+b)^2+1 = 7.25 plus the scaled score part
    assert_within(g["b"], 7.25 + 15 * factor, res.stderr["b"], what="batch_average d/db")
    # the bias is resolved: the unbiased value 15 is many SE away
    assert abs(g["c"].item() - 15) > 8 * res.stderr["c"].item()
    # rloo with the same samples is unbiased
    rloo = story.run(samples=samples, runs=40_000, estimator="rloo", seed=5)
    assert_within(rloo.mean_grads()["c"], 15, rloo.stderr["c"], what="rloo d/dc")


def test_rloo_reduces_variance_on_seed_story():
    """At S=10 the leave-one-out baseline has lower variance than plain score for dE/dc."""
    story = sn.Story(SEED_STORY)
    score = story.run(samples=10, runs=4000, estimator="score", seed=2).grads["c"].var()
    rloo = story.run(samples=10, runs=4000, estimator="rloo", seed=2).grads["c"].var()
    assert rloo < 0.8 * score


def test_moving_average_used_before_update_and_reset():
    """Same seed, same draws: the k-th call of the moving-average estimator uses
    b_k = (1 - 0.9^k) * mean(f) (starting at 0, updated after use with decay 0.9),
    so grad_c = grad_c(score) - b_k * mean(e - mu). mean(e - mu) is recovered from
    the batch-average run on the same draws: grad(score) - grad(batch) = mean(f) mean(e - mu)."""
    S = 50
    ref = sn.Story(SEED_STORY)
    score = ref.run(samples=S, estimator="score", seed=7)
    batch = ref.run(samples=S, estimator="score(baseline='batch_average')", seed=7)
    mean_f = score.cost
    mean_lp_grad = (score.grads["c"] - batch.grads["c"]) / mean_f
    story = sn.Story(SEED_STORY)
    for k in range(4):
        res = story.run(samples=S, estimator="score(baseline='moving_average')", seed=7)
        b_k = (1 - 0.9**k) * mean_f
        expected = score.grads["c"] - b_k * mean_lp_grad
        assert res.grads["c"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-4), f"call {k}"
    story.reset()
    res = story.run(samples=S, estimator="score(baseline='moving_average')", seed=7)
    assert res.grads["c"].item() == pytest.approx(score.grads["c"].item(), rel=1e-6)
    # option decay: b_1 = (1 - decay) mean(f)
    story = sn.Story(SEED_STORY)
    story.run(samples=S, estimator="score(baseline='moving_average', decay=0.5)", seed=7)
    res = story.run(samples=S, estimator="score(baseline='moving_average', decay=0.5)", seed=7)
    expected = score.grads["c"] - 0.5 * mean_f * mean_lp_grad
    assert res.grads["c"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-4)


def test_moving_average_state_is_per_run():
    """With runs=R each run keeps its own average: call 2 of run r uses 0.1 * cost_r."""
    S, R = 20, 6
    ref = sn.Story(SEED_STORY)
    score = ref.run(samples=S, runs=R, estimator="score", seed=3)
    batch = ref.run(samples=S, runs=R, estimator="score(baseline='batch_average')", seed=3)
    costs = score.costs  # per-run cost estimates
    assert costs.shape == (R,)
    mean_lp_grad = (score.grads["c"] - batch.grads["c"]) / costs
    story = sn.Story(SEED_STORY)
    story.run(samples=S, runs=R, estimator="score(baseline='moving_average')", seed=3)
    second = story.run(samples=S, runs=R, estimator="score(baseline='moving_average')", seed=3)
    expected = score.grads["c"] - 0.1 * costs * mean_lp_grad
    torch.testing.assert_close(second.grads["c"], expected, rtol=1e-5, atol=1e-4)


def test_moving_average_unbiased_over_calls():
    """Each of several consecutive calls (evolving baseline) is unbiased for dE/dc = 15."""
    story = sn.Story(SEED_STORY)
    for k in range(5):
        res = story.run(samples=10, runs=4000, estimator="score(baseline='moving_average')", seed=100 + k)
        assert_within(res.mean_grads()["c"], 15, res.stderr["c"], what=f"moving average call {k}")


# ------------------------------------------------------------ Bernoulli toy


@pytest.mark.parametrize("p0", [0.45, 0.499])
@pytest.mark.parametrize("t", [0.0, 0.3])
def test_bernoulli_exact(t, p0):
    """exact() = sigmoid'(t)(1 - 2 p0) and the exact cost, to 1e-6."""
    truth = bernoulli_truth(t, p0)
    ex = sn.Story(bernoulli_text(t, p0)).exact()
    assert ex.exact
    assert ex.grads["t"].item() == pytest.approx(truth["grad"], abs=1e-6)
    assert ex.cost == pytest.approx(truth["cost"], abs=1e-6)


@pytest.mark.parametrize("using", ["score", "rloo", "score(baseline='rloo', n=4)", "enumerate"])
def test_exact_ignores_using_clause(using):
    """exact() enumerates every site, whatever its `using` says: the answer is the closed
    form, the same on every call, not a one-sample estimate labelled exact."""
    truth = bernoulli_truth(0.3, 0.45)
    story = sn.Story(bernoulli_text(0.3, 0.45, using=using))
    for _ in range(3):
        ex = story.exact()
        assert ex.estimators == {"b": "enumerate"}
        assert ex.grads["t"].item() == pytest.approx(truth["grad"], abs=1e-6)
        assert ex.cost == pytest.approx(truth["cost"], abs=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.3])
def test_bernoulli_exact_float64(t):
    """In float64 exact() agrees with the closed form to double precision (1e-12 leaves
    ~1e4 ulps of room), which needs param(0.3) to be 0.3 in double, not float32's 0.30000001."""
    truth = bernoulli_truth(t, 0.45)
    ex64 = sn.Story(bernoulli_text(t, 0.45)).exact(dtype="float64")
    assert ex64.grads["t"].dtype == torch.float64
    assert ex64.grads["t"].item() == pytest.approx(truth["grad"], abs=1e-12)
    assert ex64.cost == pytest.approx(truth["cost"], abs=1e-12)


@pytest.mark.parametrize("p0", [0.45, 0.499])
@pytest.mark.parametrize("t", [0.0, 0.3])
@pytest.mark.parametrize("estimator", ["score", "rloo", "score(baseline='batch_average')", "enumerate"])
def test_bernoulli_means(t, p0, estimator):
    """Means over 4000 runs within 4 SE of the exact gradient (batch_average: times 1 - 1/S).

    At t = 0 the rloo estimate can have (near) zero variance: the 1e-6 floor covers float32 rounding."""
    S = 8
    truth = bernoulli_truth(t, p0)["grad"]
    if "batch_average" in estimator:
        truth *= 1 - 1 / S
    res = sn.Story(bernoulli_text(t, p0)).run(samples=S, runs=4000, estimator=estimator, seed=21)
    assert_within(res.mean_grads()["t"], truth, res.stderr["t"], atol=1e-6, what=estimator)


@pytest.mark.parametrize("p0", [0.45, 0.499])
@pytest.mark.parametrize("t", [0.0, 0.3])
@pytest.mark.parametrize("samples", [1, 5])
def test_bernoulli_score_variance_exact(t, p0, samples):
    """Var of the S-sample score estimate = (E[f^2 (b-p)^2] - g^2) / S exactly (NOTES.md),
    against the sample variance of 20000 runs within 4 SE of that sample variance."""
    truth = bernoulli_truth(t, p0)
    res = sn.Story(bernoulli_text(t, p0)).run(samples=samples, runs=20_000, estimator="score", seed=4, dtype="float64")
    g = res.grads["t"]
    assert g.shape == (20_000,)
    assert_within(g.var(), truth["var1"] / samples, variance_se(g), what="score variance")


def test_bernoulli_rloo_variance_below_score():
    """With S=8 at t=0.3, p0=0.45 the leave-one-out baseline removes most of the variance."""
    story = sn.Story(bernoulli_text(0.3, 0.45))
    var_score = story.run(samples=8, runs=4000, estimator="score", seed=1).grads["t"].var()
    var_rloo = story.run(samples=8, runs=4000, estimator="rloo", seed=1).grads["t"].var()
    assert var_rloo < 0.1 * var_score


# ---------------------------------------------------- categorical / nested

THETA = [0.1, -0.3, 0.5, 0.2, -0.1]

CATEGORICAL = f"""\
theta = param(torch.tensor({THETA}))
k ~ Categorical(logits=theta)
cost (k - 1.5)**2
"""

NESTED = f"""\
theta = param(torch.tensor({THETA}))
k ~ Categorical(logits=theta)
y ~ Bernoulli(probs=sigmoid(theta[k]))
cost (k - 2.0)**2 + 3*y
"""


def _categorical_truth():
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(theta, 0)
    e = (p * (torch.arange(5.0, dtype=torch.float64) - 1.5) ** 2).sum()
    return e.item(), torch.autograd.grad(e, theta)[0]


def _nested_truth():
    """E = sum_k p_k ((k-2)^2 + 3 sigmoid(theta_k)), by hand."""
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(theta, 0)
    e = (p * ((torch.arange(5.0, dtype=torch.float64) - 2.0) ** 2 + 3 * torch.sigmoid(theta))).sum()
    return e.item(), torch.autograd.grad(e, theta)[0]


def test_categorical_exact_and_estimators():
    cost, grad = _categorical_truth()
    story = sn.Story(CATEGORICAL)
    ex = story.exact()
    torch.testing.assert_close(ex.grads["theta"].double(), grad, rtol=0, atol=1e-6)
    assert ex.cost == pytest.approx(cost, abs=1e-5)
    for est in ["score", "rloo", "auto"]:
        res = story.run(samples=16, runs=2000, estimator=est, seed=8)
        assert res.grads["theta"].shape == (2000, 5)
        assert_within(res.mean_grads()["theta"], grad, res.stderr["theta"], what=est)
    assert res.estimators == {"k": "score(baseline='rloo')"}  # auto: Categorical has no rsample


def test_nested_exact_matches_hand_computation():
    cost, grad = _nested_truth()
    ex = sn.Story(NESTED).exact()
    torch.testing.assert_close(ex.grads["theta"].double(), grad, rtol=0, atol=1e-6)
    assert ex.cost == pytest.approx(cost, abs=1e-5)
    assert ex.estimators == {"k": "enumerate", "y": "enumerate"}


@pytest.mark.parametrize(
    "estimator",
    ["score", "rloo", "auto", {"k": "enumerate", "y": "rloo"}, {"k": "rloo", "y": "enumerate"},
     {"k": "score", "y": "score(baseline='rloo', n=4)"}],
    ids=["score", "rloo", "auto", "enum+rloo", "rloo+enum", "score+plate"],
)  # fmt: skip
def test_nested_estimators_unbiased(estimator):
    """Second site's parameters depend on the first sample: every unbiased combination
    averages to exact() within 4 SE."""
    _, grad = _nested_truth()
    res = sn.Story(NESTED).run(samples=16, runs=1500, estimator=estimator, seed=9)
    assert_within(res.mean_grads()["theta"], grad, res.stderr["theta"], what=str(estimator))
    if estimator == "auto":
        assert res.estimators == {"k": "score(baseline='rloo')", "y": "score(baseline='rloo')"}
    if isinstance(estimator, dict):
        for site, text in estimator.items():
            assert res.estimators[site].split("(")[0] == text.split("(")[0]


CHAIN = "t = param(0.3)\nk ~ Bernoulli(logits=t)\ny ~ Bernoulli(probs=0.2 + 0.6*k)\ncost 3*y\n"


@pytest.mark.parametrize(
    "k_estimator", ["score", "rloo", "score(baseline='batch_average')", "score(baseline='moving_average')"]
)
def test_enumerated_site_below_scored_site(k_estimator):
    """k sampled (score with a baseline), y ~ Bernoulli(0.2 + 0.6 k) enumerated, cost 3 y:
    E = 3 (0.2 + 0.6 sigmoid(t)), dE/dt = 1.8 sigmoid'(t). k's learning signal is the
    expected cost given k (sum over y weighted by p(y|k)); the baseline must not depend on
    the particle's own k. batch_average: times (1 - 1/S)."""
    S = 16
    p = 1 / (1 + math.exp(-0.3))
    truth = 1.8 * p * (1 - p)
    if "batch_average" in k_estimator:
        truth *= 1 - 1 / S
    story = sn.Story(CHAIN)
    assert story.exact().grads["t"].item() == pytest.approx(1.8 * p * (1 - p), abs=1e-6)
    res = story.run(samples=S, runs=4000, estimator={"k": k_estimator, "y": "enumerate"}, seed=1)
    assert res.estimators["y"] == "enumerate"
    assert_within(res.mean_grads()["t"], truth, res.stderr["t"], what=k_estimator)


def test_enumerate_equals_exact():
    """The enumerate estimator has zero variance and returns exactly exact()'s gradient."""
    story = sn.Story(NESTED)
    ex = story.exact()
    res = story.run(samples=1, estimator="enumerate", seed=0)
    torch.testing.assert_close(res.grads["theta"], ex.grads["theta"], rtol=0, atol=1e-7)
    assert res.cost == pytest.approx(ex.cost, abs=1e-6)
    runs = story.run(samples=2, runs=3, estimator="enumerate", seed=0)
    torch.testing.assert_close(runs.grads["theta"], ex.grads["theta"].expand(3, 5), rtol=0, atol=1e-6)


def test_single_particle_auto_is_plain_score():
    """auto with one sample cannot leave one out: it falls back to plain score (and stays unbiased)."""
    truth = bernoulli_truth(0.3, 0.45)
    res = sn.Story(bernoulli_text(0.3, 0.45)).run(samples=1, runs=20_000, seed=2)
    assert res.estimators == {"b": "score"}
    assert_within(res.mean_grads()["t"], truth["grad"], res.stderr["t"], what="auto S=1")


# ------------------------------------------------------------------ plates


def test_plate_rloo_on_bernoulli_unbiased():
    """`using score(baseline='rloo', n=4)` with one story sample: 4 particles in a plate, unbiased."""
    truth = bernoulli_truth(0.3, 0.45)
    story = sn.Story(bernoulli_text(0.3, 0.45, using="score(baseline='rloo', n=4)"))
    res = story.run(samples=1, runs=20_000, seed=0)
    assert res.estimators == {"b": "score(n=4, baseline='rloo')"}
    assert_within(res.mean_grads()["t"], truth["grad"], res.stderr["t"], atol=1e-7, what="plate rloo")
    # the plate's rloo has less variance than a single-particle score estimate
    single = sn.Story(bernoulli_text(0.3, 0.45)).run(samples=1, runs=20_000, estimator="score", seed=0)
    assert res.grads["t"].var() < single.grads["t"].var() / 4


def test_plate_under_pathwise_site():
    """z ~ Normal(u, 1) (pathwise) feeding b ~ Bernoulli(logits=z) using score(rloo, n=4):
    dE/du = 1 + (0.55^2 - 0.45^2) E[sigmoid'(z)], the expectation by 80-point Gauss-Hermite quadrature."""
    story = sn.Story(
        "u = param(0.2)\nz ~ Normal(u, 1)\nb ~ Bernoulli(logits=z) using score(baseline='rloo', n=4)\n"
        "cost (b - 0.45)**2 + z\n"
    )
    x, w = np.polynomial.hermite_e.hermegauss(80)
    s = 1 / (1 + np.exp(-(0.2 + x)))
    truth = 1 + (0.55**2 - 0.45**2) * float((w * s * (1 - s)).sum() / math.sqrt(2 * math.pi))
    res = story.run(samples=20, runs=2000, estimator="pathwise", seed=0)
    assert res.estimators == {"z": "pathwise", "b": "score(n=4, baseline='rloo')"}
    assert_within(res.mean_grads()["u"], truth, res.stderr["u"], what="pathwise + plate")


# ---------------------------------------------------------------- registry


def test_registry_lists_builtins():
    names = sn.estimators()
    for name in ["pathwise", "reparam", "score", "reinforce", "rloo", "enumerate", "auto"]:
        assert name in names


def test_register_custom_estimator():
    """A user estimator (score function with a constant baseline B) registered by name.

    Same seed, same draws: grad(my_est) - grad(score) = -B * mean_i(b_i - p), and
    mean_i b_i is read off the cost estimate: cost = mean((b - p0)^2) = p0^2 + mean(b)(1 - 2 p0)."""

    @sn.register_estimator("my_est")
    class ConstantBaseline(sn.Estimator):
        scored = True
        options = {"b": 1.0}

        def baseline(self, signal, dim, state):
            return torch.full((), float(self.opts["b"]), dtype=signal.dtype, device=signal.device)

    assert "my_est" in sn.estimators()
    t, p0, B = 0.3, 0.45, 0.25
    truth = bernoulli_truth(t, p0)
    mine = sn.Story(bernoulli_text(t, p0, using=f"my_est(b={B})")).run(samples=500, seed=13)
    assert mine.estimators == {"b": f"my_est(b={B})"}
    plain = sn.Story(bernoulli_text(t, p0, using="score")).run(samples=500, seed=13)
    mean_b = (plain.cost - p0**2) / (1 - 2 * p0)
    expected = plain.grads["t"].item() - B * (mean_b - truth["p"])
    assert mine.grads["t"].item() == pytest.approx(expected, abs=2e-5)
    # and it is unbiased
    res = sn.Story(bernoulli_text(t, p0)).run(samples=8, runs=4000, estimator=f"my_est(b={B})", seed=3)
    assert_within(res.mean_grads()["t"], truth["grad"], res.stderr["t"], what="my_est")
    # its options are checked like the built-ins'
    with pytest.raises(sn.EstimatorError):
        sn.Story(bernoulli_text(t, p0, using="my_est(c=1)")).run(samples=4)
