"""LAX (learned control variate for continuous sites): unbiased for any phi, and
its variance falls as the engine trains phi.

Means over R runs are checked within 4 standard errors (std over runs /
sqrt(R)); variances are compared with the standard error of a sample variance
from the runs' fourth moment (``variance_se``). Every test has a fixed seed.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SEED_STORY, assert_within, seed_truth, variance_se
from conftest import check_hessian as _check_hessian

import storch_nb as sn

MU, SD = 0.3, 1.2
SIN_STORY = f"mu = param({MU})\ns = param({SD})\nx ~ Normal(mu, s)\ncost x**2 + sin(x)\n"


def _sin_truth() -> dict:
    mu = torch.tensor(MU, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(SD, dtype=torch.float64, requires_grad=True)
    e = mu**2 + s**2 + torch.sin(mu) * torch.exp(-(s**2) / 2)
    gm, gs = torch.autograd.grad(e, [mu, s])
    return {"mu": gm, "s": gs}


STORIES = {
    "seed": (SEED_STORY, {k: torch.tensor(v) for k, v in seed_truth().items() if k in "abc"}, "c"),
    "normal": (SIN_STORY, _sin_truth(), "s"),
}


def _check(res: sn.Result, truth: dict, what: str) -> None:
    for name, t in truth.items():
        g = res.grads[name]
        assert torch.isfinite(g).all()
        assert_within(g.mean(0), t, g.std(0) / math.sqrt(g.shape[0]), what=f"{what} d/d{name}")


def test_untrained_lax_is_the_score_function():
    """phi starts at zero, where LAX is the plain score function: the first call gives
    exactly score's numbers (same seed), with the analytic single-sample variance of
    dE/dc on the seed story, 9 (u^4 + 18 u^2 + 15) - 225 = 1274.06 at u = c + b = 2.5,
    divided by S = 4 (within 4 SE of the sample variance)."""
    story = sn.Story(SEED_STORY)
    lax = story.run(samples=4, runs=4000, estimator="lax", seed=0, dtype="float64")
    score = sn.Story(SEED_STORY).run(samples=4, runs=4000, estimator="score", seed=0, dtype="float64")
    for k in "abc":
        torch.testing.assert_close(lax.grads[k], score.grads[k], rtol=1e-12, atol=1e-9)
    g = lax.grads["c"]
    assert abs(g.var().item() - 1274.0625 / 4) <= 4 * variance_se(g)


@pytest.mark.parametrize("story", list(STORIES))
def test_unbiased_and_variance_falls_with_training(story):
    """Unbiased (4 SE of the closed forms) before and after 40 training calls, while
    the variance of the gradient over runs falls (for the seed story's dE/dc and the
    Normal story's dE/ds): last < first by more than 4 combined SE of the two sample
    variances. Each call uses fresh random numbers (seed i), so phi is judged on draws
    it was not trained on. The cost estimate stays f(b)."""
    text, truth, watch = STORIES[story]
    obj = sn.Story(text)
    first = obj.run(samples=4, runs=1000, estimator="lax(lr=0.1)", seed=0, dtype="float64")
    _check(first, truth, f"{story} first call")
    last = first
    for i in range(1, 40):
        last = obj.run(samples=4, runs=1000, estimator="lax(lr=0.1)", seed=i, dtype="float64")
    _check(last, truth, f"{story} after training")
    assert set(last.estimators.values()) == {"lax(lr=0.1)"}
    g0, g1 = first.grads[watch], last.grads[watch]
    v0, v1 = g0.var().item(), g1.var().item()
    margin = 4 * math.hypot(variance_se(g0), variance_se(g1))
    assert v1 < v0 - margin, (v0, v1, margin)
    assert v1 < 0.5 * v0
    # the cost estimate is f(b) at the sample, whatever phi is
    cost = seed_truth()["cost"] if story == "seed" else MU**2 + SD**2 + math.sin(MU) * math.exp(-(SD**2) / 2)
    assert abs(last.cost - cost) <= 4 * last.cost_stderr


def test_reset_clears_the_control_variate():
    """State lives on the Story per site and run: after training, ``reset()`` brings phi
    back to zero, so the same seed reproduces the first call exactly; lr=0 never trains."""
    story = sn.Story(SIN_STORY)
    g0 = story.run(samples=4, runs=100, estimator="lax(lr=0.1)", seed=0).grads["mu"]
    for i in range(5):
        story.run(samples=4, runs=100, estimator="lax(lr=0.1)", seed=i + 1)
    assert not torch.equal(story.run(samples=4, runs=100, estimator="lax(lr=0.1)", seed=0).grads["mu"], g0)
    story.reset()
    torch.testing.assert_close(story.run(samples=4, runs=100, estimator="lax(lr=0.1)", seed=0).grads["mu"], g0)
    frozen = sn.Story(SIN_STORY)
    for _ in range(3):
        g = frozen.run(samples=4, runs=100, estimator="lax(lr=0)", seed=0).grads["mu"]
    torch.testing.assert_close(g, g0)


def test_second_derivatives():
    """LAX's surrogate is a DiCE form: its Hessian on the seed story matches the closed
    form within 4 SE over 20 seeds (``surrogate()`` does not train phi: it stays at zero)."""
    _check_hessian(sn.Story(SEED_STORY), "lax", 2000, list("abc"), seed_truth()["hessian"])


def test_refuses_unfit_sites():
    with pytest.raises(sn.EstimatorError, match=r"`lax`.*site `b`.*rsample.*relax"):
        sn.Story("t = param(0.0)\nb ~ Bernoulli(logits=t) using lax\ncost b\n").run(samples=4)
    with pytest.raises(sn.EstimatorError, match=r"lr must be"):
        sn.Story("m = param(0.0)\nx ~ Normal(m, 1) using lax(lr=-1)\ncost x\n").run(samples=4)
