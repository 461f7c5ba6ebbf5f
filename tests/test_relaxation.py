"""Gumbel-softmax / Concrete (``gumbel``) and straight-through (``st_gumbel``).

Both are biased, so they are tested against what they *do* estimate and their
bias is measured:

* on the Bernoulli toy the relaxed objective has a one-dimensional closed
  form, ``E_L[h((t + L) / T)]`` with ``L`` standard logistic, computed here by
  the midpoint rule on a fine grid (error far below 1e-6). The Monte Carlo
  mean of each estimator must lie within 4 SE of that quadrature: this pins
  the implementation down exactly, bias included;
* the bias (Monte Carlo mean minus ``story.exact()``) must shrink as the
  temperature does. It is *not* monotone at every temperature on the
  Bernoulli toy (the gradient bias of ``gumbel`` is 0.0074 at T=0.5, 0.0020 at
  T=1 and -0.0083 at T=2: it crosses zero near T=1.1), so the checks compare
  temperatures where the quadrature says the gap is many SE wide.

Bias table (gradient minus exact). Bernoulli toy t=0.3, p0=0.45 (exact
gradient 0.024446, exact cost 0.259944), by quadrature. Categorical story:
Euclidean norm over the five logits of the Monte Carlo bias, 200k draws, with
the norm of the standard errors in brackets (st_gumbel at T=0.05 is not
resolved from zero at this size):

    T     Bern gumbel  Bern st_gumbel  Bern gumbel cost  Cat gumbel       Cat st_gumbel
    0.05  +0.00176     +0.00246        -0.01221          0.0445 (0.0147)  0.0258 (0.0260)
    0.1   +0.00334     +0.00474        -0.02432          0.0863 (0.0101)  0.0534 (0.0188)
    0.2   +0.00579     +0.00852        -0.04772          0.1748 (0.0066)  0.1123 (0.0132)
    0.5   +0.00744     +0.01339        -0.10671          0.4150 (0.0032)  0.2971 (0.0072)
    1.0   +0.00197     +0.01054        -0.16763          0.6484 (0.0017)  0.5225 (0.0042)
    2.0   -0.00831     +0.00058        -0.21801          0.7910 (0.0006)  0.7135 (0.0022)
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch
from conftest import assert_within, bernoulli_text, bernoulli_truth

import storch_nb as sn
from storch_nb.estimators import make_estimator

CAT = """\
theta = param(torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2]))
k ~ Categorical(logits=theta)
cost (k - 2.0)**2
"""

ONEHOT = """\
theta = param(torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2]))
x ~ OneHotCategorical(logits=theta)
k = (x * torch.arange(5.0)).sum()
cost (k - 2.0)**2
"""

T0, P0 = 0.3, 0.45


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(x / 2))


@cache
def relaxed_bernoulli(t: float, p0: float, temperature: float) -> dict:
    """Expectations over the logistic noise L of the relaxed Bernoulli toy, by
    the midpoint rule on [-60, 60] with 2e6 points (the integrand is smooth on
    the scale of the temperature, >= 0.05 here; tails beyond 60 weigh e^-60)."""
    n, lim = 2_000_000, 60.0
    h = 2 * lim / n
    noise = -lim + h * (np.arange(n) + 0.5)
    w = _sigmoid(noise) * _sigmoid(-noise) * h
    y = _sigmoid((t + noise) / temperature)
    dy = y * (1 - y) / temperature  # d y / d t
    hard = (t + noise > 0).astype(float)
    return {
        "gumbel_cost": float(np.sum(w * (y - p0) ** 2)),
        "gumbel": float(np.sum(w * 2 * (y - p0) * dy)),
        "st_gumbel": float(np.sum(w * 2 * (hard - p0) * dy)),
    }


def _mean_se(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = g.double()
    return g.mean(0), g.std(0) / math.sqrt(g.shape[0])


# --------------------------------------------------------------- Bernoulli toy


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("estimator", ["gumbel", "st_gumbel"])
def test_bernoulli_matches_relaxed_quadrature(estimator, temperature):
    """The estimators' means equal the quadrature of the relaxed gradient (4 SE),
    gumbel's cost estimate the relaxed cost and st_gumbel's the exact cost."""
    story = sn.Story(bernoulli_text(T0, P0))
    spec = f"{estimator}(temperature={temperature})"
    res = story.run(samples=500, runs=200, estimator=spec, seed=3, dtype="float64")
    assert res.estimators == {"b": make_estimator(spec).text()}
    quad = relaxed_bernoulli(T0, P0, temperature)
    mean, se = _mean_se(res.grads["t"])
    assert_within(mean, quad[estimator], se, what=f"{estimator} T={temperature} vs quadrature")
    cost_mean, cost_se = _mean_se(res.costs)
    truth = bernoulli_truth(T0, P0)
    want = quad["gumbel_cost"] if estimator == "gumbel" else truth["cost"]
    assert_within(cost_mean, want, cost_se, what=f"{estimator} cost")


def test_bernoulli_bias_shrinks_with_temperature():
    """|bias| of both estimators at T=0.05 is below that at T=0.5, by more than
    4 SE of each; the quadrature gaps are 0.0057 (gumbel) and 0.0109 (st_gumbel)."""
    story = sn.Story(bernoulli_text(T0, P0))
    exact = story.exact(dtype="float64").grads["t"].item()
    assert exact == pytest.approx(bernoulli_truth(T0, P0)["grad"], rel=1e-9)
    for est in ("gumbel", "st_gumbel"):
        bias = {}
        for temperature in (0.05, 0.5):
            res = story.run(
                samples=2000, runs=300, estimator=f"{est}(temperature={temperature})", seed=5, dtype="float64"
            )
            mean, se = _mean_se(res.grads["t"])
            bias[temperature] = (abs(mean.item() - exact), se.item())
        (small, se_small), (large, se_large) = bias[0.05], bias[0.5]
        assert small + 4 * se_small < large - 4 * se_large, (est, bias)
    # the cost estimate of gumbel is biased too, and shrinks as well (closed form)
    gaps = [
        abs(relaxed_bernoulli(T0, P0, T)["gumbel_cost"] - bernoulli_truth(T0, P0)["cost"])
        for T in (0.05, 0.1, 0.5, 1.0)
    ]
    assert gaps == sorted(gaps)


def test_st_gumbel_values_are_hard_and_exactly_distributed():
    """st_gumbel's forward values are 0/1 with frequency sigmoid(t): the cost
    estimate is unbiased (checked within 4 SE on 200k draws)."""
    story = sn.Story(bernoulli_text(T0, P0))
    res = story.run(samples=200_000, estimator="st_gumbel", seed=1, stderr=True)
    truth = bernoulli_truth(T0, P0)
    assert_within(res.cost, truth["cost"], res.cost_stderr, what="st_gumbel cost")


# ---------------------------------------------------- Categorical / one-hot


def test_categorical_bias_shrinks_with_temperature():
    """On the five-outcome Categorical (relaxed index sum_j j y_j), the norm of
    the bias falls with the temperature (1.0, 0.5, 0.1), each step by more than
    4 SE-norms (the norm of the vector of standard errors) on both sides: with
    40k draws the SE-norm is 0.02 at T=0.1 and the bias norms are 0.65, 0.42,
    0.09 (gumbel) and 0.52, 0.30, 0.05 (st_gumbel)."""
    story = sn.Story(CAT)
    exact = story.exact(dtype="float64").grads["theta"]
    for est in ("gumbel", "st_gumbel"):
        rows = []
        for temperature in (1.0, 0.5, 0.1):
            res = story.run(
                samples=200, runs=200, estimator=f"{est}(temperature={temperature})", seed=7, dtype="float64"
            )
            mean, se = _mean_se(res.grads["theta"])
            rows.append(((mean - exact).norm().item(), se.norm().item()))
        for (big, se_big), (small, se_small) in zip(rows, rows[1:]):
            assert small + 4 * se_small < big - 4 * se_big, (est, rows)


def test_onehot_matches_categorical_index():
    """A OneHotCategorical site relaxed by gumbel, mapped to its index, gives the
    same gradients as the Categorical site's relaxed index (same noise, same
    seed): the two code paths agree to rounding."""
    for est in ("gumbel(temperature=0.3)", "st_gumbel(temperature=0.3)"):
        a = sn.Story(CAT).run(samples=50, runs=4, estimator=est, seed=11, dtype="float64")
        b = sn.Story(ONEHOT).run(samples=50, runs=4, estimator=est, seed=11, dtype="float64")
        torch.testing.assert_close(a.grads["theta"], b.grads["theta"], rtol=1e-10, atol=1e-12)
        assert a.cost == pytest.approx(b.cost, rel=1e-10)


def test_values_and_shapes():
    """gumbel's values are soft (in (0, 1), one-hot rows summing to 1, index in
    [0, K-1]); st_gumbel's are hard; batch shapes of the site are kept."""
    ns = {"logits": torch.zeros(3, 4)}
    text = "v ~ {dist}(logits=logits) using {est}\ncost (v * 1.0).sum()\n"
    for dist, check in [
        ("Bernoulli", lambda v: v.shape == (7, 3, 4)),
        ("Categorical", lambda v: v.shape == (7, 3)),
        ("OneHotCategorical", lambda v: v.shape == (7, 3, 4)),
    ]:
        for est in ("gumbel", "st_gumbel"):
            res = sn.Story(text.format(dist=dist, est=est)).run(samples=7, seed=0, namespace=ns, stderr=True)
            assert math.isfinite(res.cost)
        # the values themselves, drawn the way the engine draws them
        d = getattr(torch.distributions, dist)(logits=torch.zeros(3, 4))
        soft = make_estimator("gumbel").draw(d, (7,))
        hard = make_estimator("st_gumbel").draw(d, (7,))
        assert check(soft) and check(hard)
        if dist == "Categorical":
            assert bool(((soft >= 0) & (soft <= 3)).all()) and bool((hard == hard.round()).all())
        else:
            assert bool(((soft > 0) & (soft < 1)).all()) and set(hard.unique().tolist()) <= {0.0, 1.0}
        if dist == "OneHotCategorical":
            torch.testing.assert_close(soft.sum(-1), torch.ones(7, 3))
            torch.testing.assert_close(hard.sum(-1), torch.ones(7, 3))
        # expanded distribution, empty sample shape (batched arguments)
        expanded = make_estimator("st_gumbel").draw(d.expand((7, *d.batch_shape)), ())
        assert check(expanded)


def test_batched_arguments_nested_story():
    """A relaxed site whose logits depend on an upstream sample (the engine
    draws from the expanded distribution): st_gumbel's forward values are exact
    samples, so the cost and the upstream score gradient d/ds are unbiased."""
    text = """\
s = param(-0.2)
t = param(0.4)
z ~ Bernoulli(logits=s) using rloo
b ~ Bernoulli(logits=t + 1.5 * z) using st_gumbel
cost (b - 0.45)**2 + 0.3 * z
"""
    story = sn.Story(text)
    exact = story.exact(dtype="float64")
    res = story.run(samples=400, runs=300, seed=2, dtype="float64")
    mean, se = _mean_se(res.grads["s"])
    assert_within(mean, exact.grads["s"], se, what="upstream d/ds")
    cost_mean, cost_se = _mean_se(res.costs)
    assert_within(cost_mean, exact.cost, cost_se, what="cost")
    assert res.estimators == {"z": "rloo", "b": "st_gumbel"}


# -------------------------------------------------------------------- errors


def test_refuses_sites_it_does_not_fit():
    story = sn.Story("m = param(0.0)\nx ~ Normal(m, 1) using gumbel\ncost x**2\n")
    with pytest.raises(sn.EstimatorError) as info:
        story.run(samples=4)
    assert "site `x`" in info.value.message and "Normal" in info.value.message
    assert info.value.lineno == 2
    assert "pathwise" in info.value.hint
    with pytest.raises(sn.EstimatorError, match="site `y`"):
        sn.Story("y ~ Poisson(3.0) using st_gumbel\ncost y\n").run(samples=4)


@pytest.mark.parametrize("bad", [0, -1.0, "hot", True, float("inf")])
def test_temperature_validated(bad):
    with pytest.raises(sn.EstimatorError, match="temperature"):
        make_estimator(f"gumbel(temperature={bad!r})")


def test_registered():
    names = sn.estimators()
    assert "gumbel" in names and "st_gumbel" in names
    assert make_estimator("st_gumbel(temperature=0.2)").text() == "st_gumbel(temperature=0.2)"
