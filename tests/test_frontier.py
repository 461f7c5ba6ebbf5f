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
