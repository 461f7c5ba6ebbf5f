"""The measure-valued derivative of Normal sites against closed forms.

Means over R runs are checked within 4 standard errors (std over runs /
sqrt(R)): a correct estimator fails one check with probability ~6e-5, and every
test has a fixed seed.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SEED_STORY, assert_within, seed_truth
from conftest import check_hessian as _check_hessian

import storch_nb as sn

MU, SD = 0.3, 1.2
SIN_STORY = f"mu = param({MU})\ns = param({SD})\nx ~ Normal(mu, s)\ncost x**2 + sin(x)\n"


def _sin_truth():
    """E[x^2 + sin x] = mu^2 + s^2 + sin(mu) exp(-s^2/2), and its derivatives."""
    mu = torch.tensor(MU, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(SD, dtype=torch.float64, requires_grad=True)
    e = mu**2 + s**2 + torch.sin(mu) * torch.exp(-(s**2) / 2)
    gm, gs = torch.autograd.grad(e, [mu, s])
    return e.item(), {"mu": gm, "s": gs}


def _check(res: sn.Result, truth: dict, what: str) -> None:
    for name, t in truth.items():
        g = res.grads[name]
        assert torch.isfinite(g).all()
        assert_within(g.mean(0), t, g.std(0) / math.sqrt(g.shape[0]), what=f"{what} d/d{name}")


def test_normal_loc_and_scale_closed_form():
    """x ~ N(0.3, 1.2), cost x^2 + sin x: d/dmu = 2 mu + cos(mu) e^{-s^2/2} = 1.0650,
    d/ds = 2 s - s sin(mu) e^{-s^2/2} = 2.2274, and the cost estimate E = 1.6738."""
    cost, truth = _sin_truth()
    res = sn.Story(SIN_STORY).run(samples=8, runs=2000, estimator="measure_valued", seed=0, dtype="float64")
    assert res.estimators == {"x": "measure_valued"}
    _check(res, truth, "measure_valued")
    assert abs(res.cost - cost) <= 4 * res.cost_stderr


def test_seed_story():
    """Seed story: dE/da = 7.25 (pathwise through d at the sample), dE/db = 22.25
    (through d and the Normal's loc), dE/dc = 15 (loc only)."""
    truth = seed_truth()
    res = sn.Story(SEED_STORY).run(samples=8, runs=2000, estimator="measure_valued", seed=1, dtype="float64")
    _check(res, {k: torch.tensor(truth[k]) for k in "abc"}, "seed story")
    assert abs(res.cost - truth["cost"]) <= 4 * res.cost_stderr


def test_vector_site_non_separable_cost():
    """Three Normal entries, cost (x0 + x1 + x2)^2 + x0 x1: E = (sum mu)^2 + sum s^2 + mu0 mu1,
    so d/dmu = 2 sum mu + (mu1, mu0, 0) and d/ds = 2 s. Each entry's derivative moves
    that entry alone (1 + 4 N variants)."""
    text = (
        "mu = param(torch.tensor([0.5, -1.0, 0.25]))\ns = param(torch.tensor([1.0, 0.5, 2.0]))\n"
        "x ~ Normal(mu, s)\ncost x.sum()**2 + x[0] * x[1]\n"
    )
    mu = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
    s = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    truth = {"mu": 2 * mu.sum() + torch.stack([mu[1], mu[0], mu[0] * 0]), "s": 2 * s}
    res = sn.Story(text).run(samples=8, runs=2000, estimator="measure_valued", seed=2, dtype="float64")
    _check(res, truth, "vector")


def test_non_differentiable_cost():
    """cost 1[x > 0]: no pathwise derivative exists, the measure-valued one does.
    E = Phi(mu/s), d/dmu = phi(mu/s)/s, d/ds = -mu/s^2 phi(mu/s)."""
    text = f"mu = param({MU})\ns = param({SD})\nx ~ Normal(mu, s)\ncost (x > 0).double()\n"
    z = MU / SD
    phi = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    truth = {"mu": torch.tensor(phi / SD), "s": torch.tensor(-MU / SD**2 * phi)}
    res = sn.Story(text).run(samples=8, runs=2000, estimator="measure_valued", seed=3, dtype="float64")
    _check(res, truth, "step")


@pytest.mark.parametrize("story", ["seed", "normal"])
def test_second_derivatives(story):
    """The surrogate's Hessian is unbiased: on the seed story (closed form; d2E/dc2 = 2(a+b),
    the mixed (a, c) term through d = a + b) and on x ~ N(mu, s), cost x^2 + sin x (loc and
    scale curvature), over 20 seeds."""
    if story == "seed":
        text, names, truth = SEED_STORY, list("abc"), seed_truth()["hessian"]
    else:
        text, names = SIN_STORY, ["mu", "s"]

        def expectation(v):
            return v[0] ** 2 + v[1] ** 2 + torch.sin(v[0]) * torch.exp(-(v[1] ** 2) / 2)

        truth = torch.autograd.functional.hessian(expectation, torch.tensor([MU, SD], dtype=torch.float64))
    _check_hessian(sn.Story(text), "measure_valued", 2000, names, truth)


def test_refuses_unfit_sites():
    with pytest.raises(sn.EstimatorError, match=r"measure_valued.*site `b`.*Normal sites only"):
        sn.Story("t = param(0.0)\nb ~ Bernoulli(logits=t) using measure_valued\ncost b\n").run(samples=4)
    with pytest.raises(sn.EstimatorError, match=r"site `x`.*own batch shape"):
        sn.Story("m = param(torch.zeros(3, 4))\nx ~ Normal(m, 1) using measure_valued\ncost x.sum()\n").run(samples=4)
