"""Issue 13, the parts done so far: REBAR and RELAX on Categorical and OneHotCategorical
sites (the Gumbel-max construction with the perturbed logits given the sample),
unbiased against exact() (4 SE), fresh and after their control variates are fitted."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_within

import storch_nb as sn

F64 = torch.float64
NS = {
    "A": torch.tensor([[1.0, -2.0, 0.5], [0.3, 2.0, -1.0], [1.5, 0.2, -0.5]], dtype=F64),
    "bvec": torch.tensor([0.2, -0.4, 0.1], dtype=F64),
}
TEXTS = {
    "categorical": "th = param(torch.tensor([0.1, -0.3, 0.5, 0.0]))\nk ~ Categorical(logits=th) using {est}\n"
    "cost (k - 1.5)**2\n",
    "onehot": "th = param(torch.tensor([0.1, -0.3, 0.5]))\nD ~ OneHotCategorical(logits=th) using {est}\n"
    "cost (D @ A @ D) + (D @ bvec)\n",
    # two categoricals in one site, a cost that couples them
    "two-categoricals": "th = param(torch.tensor([[0.1, -0.3, 0.5], [0.2, 0.0, -0.4]]))\n"
    "k ~ Categorical(logits=th) using {est}\ncost (k[0] - 2 * k[1] + 0.3)**2\n",
}


@pytest.mark.parametrize("case", list(TEXTS))
@pytest.mark.parametrize("est", ["rebar", "relax"])
def test_rebar_relax_on_categoricals_unbiased_fresh_and_fitted(case, est):
    text = TEXTS[case]
    truth = sn.Story(text.format(est="enumerate")).exact(namespace=NS, dtype="float64").grads["th"]
    story = sn.Story(text.format(est=est))
    fresh = story.run(samples=8, runs=3000, seed=0, namespace=NS, dtype="float64")
    assert_within(fresh.mean_grads()["th"], truth, fresh.stderr["th"], what=f"{est} fresh on {case}")
    for i in range(10):  # fit the control variate on other draws
        story.run(samples=8, runs=200, seed=100 + i, namespace=NS, dtype="float64")
    fitted = story.run(samples=8, runs=3000, seed=1, namespace=NS, dtype="float64")
    assert_within(fitted.mean_grads()["th"], truth, fitted.stderr["th"], what=f"{est} fitted on {case}")


def test_fitted_relax_on_a_one_hot_beats_rloo():
    """Measured: fitted RELAX's total variance is about half of RLOO's on the one-hot
    story (0.020 against 0.041 at 8 samples); asserted below 0.8x (the variance
    estimates over 3000 runs have a relative standard error under 5%)."""
    text = TEXTS["onehot"]
    relax = sn.Story(text.format(est="relax"))
    for i in range(10):
        relax.run(samples=8, runs=200, seed=100 + i, namespace=NS, dtype="float64")
    r = relax.run(samples=8, runs=3000, seed=1, namespace=NS, dtype="float64").grads["th"].var(0).sum()
    b = sn.Story(text.format(est="rloo")).run(samples=8, runs=3000, seed=1, namespace=NS,
                                              dtype="float64").grads["th"].var(0).sum()
    assert r < 0.8 * b, (r, b)


def test_rebar_relax_still_refuse_a_continuous_site():
    with pytest.raises(sn.EstimatorError, match="Bernoulli, Categorical and OneHotCategorical") as info:
        sn.Story("m = param(0.0)\nx ~ Normal(m, 1) using relax\ncost x**2\n").run(samples=4)
    assert info.value.lineno == 2


# ------------------------------------------------------------------------- ARMS
COIN = "t = param(0.3)\nb ~ Bernoulli(logits=t) using {est}\ncost (b - 0.45)**2\n"
COINS = ("t = param(torch.tensor([0.3, -1.2, 2.0]))\nb ~ Bernoulli(logits=t) using {est}\n"
         "cost (b[0] + 2 * b[1] - b[2] - 0.7)**2 + b.prod()\n")


@pytest.mark.parametrize("text", [COIN, COINS], ids=["coin", "three-coupled-coins"])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_arms_unbiased(text, k):
    truth = sn.Story(text.format(est="enumerate")).exact(dtype="float64").grads["t"]
    res = sn.Story(text.format(est=f"arms(n={k})")).run(samples=1, runs=20000, seed=0, dtype="float64")
    assert_within(res.mean_grads()["t"], truth, res.stderr["t"], what=f"arms(n={k})")


@pytest.mark.parametrize("text, at_most", [(COIN, 0.3), (COINS, 0.8)], ids=["coin", "three-coupled-coins"])
def test_arms_beats_rloo_at_equal_evaluations(text, at_most):
    """Four evaluations of the cost each: arms(n=4) on one particle against rloo on four
    samples. Measured (20000 runs): 0.10x rloo's variance on the coin, 0.57x on the
    three coupled coins; asserted below 0.3x and 0.8x."""
    arms = sn.Story(text.format(est="arms(n=4)")).run(samples=1, runs=20000, seed=0, dtype="float64")
    rloo = sn.Story(text.format(est="rloo")).run(samples=4, runs=20000, seed=0, dtype="float64")
    ratio = arms.grads["t"].var(0).sum() / rloo.grads["t"].var(0).sum()
    assert ratio < at_most, ratio


@pytest.mark.parametrize("spec, needle", [("arms", "n=K"), ("arms(n=1)", "n=K")])
def test_arms_needs_two_or_more_draws(spec, needle):
    with pytest.raises(sn.EstimatorError, match=needle) as info:
        sn.Story(COIN.format(est=spec)).run(samples=2)
    assert info.value.lineno == 2


def test_arms_refuses_a_continuous_site():  # Categorical sites: tests/test_frontier_categorical.py
    with pytest.raises(sn.EstimatorError, match="Bernoulli, Categorical and OneHotCategorical"):
        sn.Story("m = param(0.0)\nx ~ Normal(m, 1) using arms(n=4)\ncost x**2\n").run(samples=2)


# -------------------------------------------------------------------- double_cv
DCV = {
    "coin": COIN,
    "three-coupled-coins": COINS.replace("th", "t"),
    "onehot": TEXTS["onehot"].replace("th", "t"),
}


def _fitted(text: str, est: str, samples: int, calls: int = 60):
    story = sn.Story(text.format(est=est))
    for i in range(calls):  # fit alpha on other draws (double_cv); rloo has nothing to fit
        story.run(samples=samples, runs=200, seed=10 + i, namespace=NS, dtype="float64")
    return story.run(samples=samples, runs=20000, seed=1, namespace=NS, dtype="float64")


@pytest.mark.parametrize("case", list(DCV))
def test_double_cv_unbiased_and_at_most_rloos_variance(case):
    """Four evaluations each (double_cv(n=4) on one particle, rloo on four samples),
    after 60 fitting calls. Measured variance ratios to rloo: 0.68 (coin), 0.95 (three
    coupled coins), 0.96 (one-hot); asserted at most rloo's within the noise of two
    variance estimates over 20000 runs (relative SE about 2%)."""
    text = DCV[case]
    truth = sn.Story(text.format(est="enumerate")).exact(namespace=NS, dtype="float64").grads["t"]
    fresh = sn.Story(text.format(est="double_cv(n=4)")).run(samples=1, runs=20000, seed=0, namespace=NS,
                                                             dtype="float64")
    assert_within(fresh.mean_grads()["t"], truth, fresh.stderr["t"], what=f"double_cv fresh on {case}")
    dcv, rloo = _fitted(text, "double_cv(n=4)", 1), _fitted(text, "rloo", 4, calls=0)
    assert_within(dcv.mean_grads()["t"], truth, dcv.stderr["t"], what=f"double_cv fitted on {case}")
    ratio = dcv.grads["t"].var(0).sum() / rloo.grads["t"].var(0).sum()
    assert ratio < (0.85 if case == "coin" else 1.06), ratio


@pytest.mark.parametrize("spec, needle", [("double_cv", "n=K"), ("double_cv(n=1)", "n=K"),
                                          ("double_cv(n=4, lr=-1)", "lr")])
def test_double_cv_bad_input(spec, needle):
    with pytest.raises(sn.EstimatorError, match=needle):
        sn.Story(COIN.format(est=spec)).run(samples=2)


def test_double_cv_refuses_a_continuous_site():  # Categorical sites: tests/test_frontier_categorical.py
    with pytest.raises(sn.EstimatorError, match="Bernoulli, Categorical and OneHotCategorical") as info:
        sn.Story("m = param(0.0)\nx ~ Normal(m, 1) using double_cv(n=4)\ncost x**2\n").run(samples=2)
    assert info.value.lineno == 2
