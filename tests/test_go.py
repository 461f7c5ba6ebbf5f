"""The GO gradient against closed forms and ``story.exact()``.

Means over R runs are checked within 4 standard errors (std over runs /
sqrt(R)): a correct estimator fails one check with probability ~6e-5, and every
test has a fixed seed.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_within
from conftest import check_hessian as _check_hessian

import storch_nb as sn


def _check(res: sn.Result, truth: dict, what: str) -> None:
    for name, t in truth.items():
        g = res.grads[name]
        assert torch.isfinite(g).all()
        assert_within(g.mean(0), t, g.std(0) / math.sqrt(g.shape[0]), what=f"{what} d/d{name}")


def test_poisson_closed_form():
    """x ~ Poisson(2), cost (x - 3)^2: E = lam + (lam - 3)^2 = 3, d/dlam = 1 + 2 (lam - 3) = -1."""
    story = sn.Story("lam = param(2.0)\nx ~ Poisson(lam)\ncost (x - 3.0)**2\n")
    res = story.run(samples=8, runs=2000, estimator="go", seed=0, dtype="float64")
    assert res.estimators == {"x": "go"}
    _check(res, {"lam": torch.tensor(-1.0)}, "poisson")
    assert abs(res.cost - 3.0) <= 4 * res.cost_stderr


def test_poisson_vector():
    """Two Poisson entries, cost (x0 - x1)^2: E = l0 + l1 + (l0 - l1)^2, so
    d/dl0 = 1 + 2 (l0 - l1) = 0 and d/dl1 = 1 - 2 (l0 - l1) = 2 at (1.5, 2)."""
    story = sn.Story("lam = param(torch.tensor([1.5, 2.0]))\nx ~ Poisson(lam)\ncost (x[0] - x[1])**2\n")
    res = story.run(samples=8, runs=2000, estimator="go", seed=1, dtype="float64")
    _check(res, {"lam": torch.tensor([0.0, 2.0])}, "poisson vector")


def test_gamma_closed_form():
    """x ~ Gamma(alpha=2, beta=1.5), cost x^2: E = alpha (alpha + 1) / beta^2, so
    d/dalpha = (2 alpha + 1) / beta^2 = 2.2222 and d/dbeta = -2 alpha (alpha + 1) / beta^3 = -3.5556.
    GO for a continuous site is implicit reparameterization (rsample)."""
    a, b = 2.0, 1.5
    story = sn.Story(f"alpha = param({a})\nbeta = param({b})\nx ~ Gamma(alpha, beta)\ncost x**2\n")
    res = story.run(samples=8, runs=2000, estimator="go", seed=2, dtype="float64")
    truth = {"alpha": torch.tensor((2 * a + 1) / b**2), "beta": torch.tensor(-2 * a * (a + 1) / b**3)}
    _check(res, truth, "gamma")
    assert abs(res.cost - a * (a + 1) / b**2) <= 4 * res.cost_stderr


def test_geometric_closed_form():
    """x ~ Geometric(p) (failures before the first success), cost (x - 2)^2:
    E = (1 - p)/p^2 + ((1 - p)/p - 2)^2, differentiated by autograd in the logits."""
    t0 = 0.4
    text = f"t = param({t0})\nx ~ Geometric(probs=sigmoid(t))\ncost (x - 2.0)**2\n"
    t = torch.tensor(t0, dtype=torch.float64, requires_grad=True)
    p = torch.sigmoid(t)
    e = (1 - p) / p**2 + ((1 - p) / p - 2) ** 2
    (g,) = torch.autograd.grad(e, t)
    res = sn.Story(text).run(samples=8, runs=2000, estimator="go", seed=3, dtype="float64")
    _check(res, {"t": g}, "geometric")


def test_binomial_against_exact():
    """x ~ Binomial(5, sigmoid(t)) for two entries, a coupling cost; exact() enumerates
    the 36 joint outcomes. At x = n the GO weight (n - x)/(1 - p) is zero."""
    text = "t = param(torch.tensor([0.3, 1.5]))\nx ~ Binomial(5, logits=t)\ncost (x[0] - 2.0)**2 + x[0] * x[1] / 4\n"
    story = sn.Story(text)
    ex = story.exact(dtype="float64")
    res = story.run(samples=8, runs=2000, estimator="go", seed=4, dtype="float64")
    _check(res, ex.grads, "binomial")


def test_poisson_second_derivatives():
    """Two Poisson entries, cost (x0 - x1)^2: the Hessian of l0 + l1 + (l0 - l1)^2 is
    [[2, -2], [-2, 2]]; the surrogate's Hessian over 20 seeds matches within 4 SE."""
    story = sn.Story("lam = param(torch.tensor([1.5, 2.0]))\nx ~ Poisson(lam)\ncost (x[0] - x[1])**2\n")
    _check_hessian(story, "go", 2000, ["lam"], [[2.0, -2.0], [-2.0, 2.0]])


def test_refuses_unfit_sites():
    with pytest.raises(sn.EstimatorError, match=r"`go`.*site `k`.*Poisson"):
        sn.Story("t = param(torch.zeros(3))\nk ~ Categorical(logits=t) using go\ncost k\n").run(samples=4)
    with pytest.raises(sn.EstimatorError, match=r"site `x`.*option n"):
        sn.Story("lam = param(2.0)\nx ~ Poisson(lam) using go(n=3)\ncost x\n").run(samples=4)
