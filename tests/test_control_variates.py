"""REBAR and RELAX control variates (storch_nb/estimators/control_variates.py).

Their coefficients (``eta``, ``rho`` and ``beta``, the weight of the other
samples' mean cost) enter the estimate linearly, so the engine
fits them by least squares on the proxy ``sum g^2`` (exponentially averaged over
calls), pooled over runs, and the temperature by Adam. These tests pin down
what that buys, with numbers measured against closed forms:

* after one fit the variance falls (toy020, 8 samples, 8000 runs in float64:
  REBAR's variance 4.2e-3 -> 3.8e-4, RELAX 1.0e-3 (RLOO's, where it starts)
  -> 1.5e-5), and the estimate stays within 4 SE of the closed form;
* every run shares one fitted control variate;
* a run replaying the same seed stays unbiased (the pooled fit gives one
  run's own draws a weight of 1/runs);
* ``loo=False`` is the paper's form, unbiased too.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_within, variance_se

import storch_nb as sn

P = 1 / (1 + math.exp(-0.3))
TOY020 = "t = param(0.3)\nb ~ Bernoulli(logits=t)\ncost (b - 0.2)**2\n"
TRUE020 = P * (1 - P) * 0.6  # dE/dt = sigmoid'(t) (1 - 2 * 0.2)
RUNS = 8000


def _grads(story, est, seed):
    return story.run(samples=8, runs=RUNS, estimator=est, seed=seed, dtype="float64").grads["t"]


def _cv(story):
    (st,) = [v for v in story._runner.state.values() if isinstance(v, dict) and "cv" in v]
    return st["cv"]


@pytest.mark.parametrize(("est", "ratio"), [("rebar", 0.2), ("relax", 0.05)])
def test_one_fit_cuts_the_variance_and_stays_unbiased(est, ratio):
    story = sn.Story(TOY020)
    first = _grads(story, est, 1)
    second = _grads(story, est, 2)
    for g in (first, second):
        assert_within(g.mean(), TRUE020, g.std() / math.sqrt(RUNS), what=est)
    v1, v2 = first.var(), second.var()
    # measured: rebar 4.2e-3 -> 3.8e-4 (0.09x), relax 1.0e-3 -> 1.5e-5 (0.015x); each
    # variance has a relative SE of about 2-3% at 8000 runs, so these bounds hold with margin
    assert v2 + 4 * variance_se(second) < ratio * (v1 - 4 * variance_se(first)), (v1.item(), v2.item())
    cv = _cv(story)
    lin = cv["lin"].detach()
    assert torch.isfinite(lin).all()
    # one pooled fit shared by every run: one coefficient vector and one temperature
    assert lin.shape == ((2,) if est == "rebar" else (5,))
    assert cv["log_temperature"].shape == ()


def test_fitted_relax_beats_rloo():
    story = sn.Story(TOY020)
    _grads(story, "relax", 3)
    relax = _grads(story, "relax", 4)
    rloo = _grads(sn.Story(TOY020), "rloo", 4)
    # measured 1.8e-5 vs 1.03e-3
    assert relax.var() + 4 * variance_se(relax) < rloo.var() - 4 * variance_se(rloo)


@pytest.mark.parametrize("est", ["rebar", "relax"])
def test_replaying_a_seed_stays_unbiased(est):
    story = sn.Story(TOY020)
    for _ in range(3):
        g = _grads(story, est, 9)
        assert_within(g.mean(), TRUE020, g.std() / math.sqrt(RUNS), what=f"{est} replaying seed 9")


@pytest.mark.parametrize("est", ["rebar(loo=False)", "relax(loo=False)"])
def test_the_papers_form_without_loo_is_unbiased(est):
    story = sn.Story(TOY020)
    for seed in (5, 6):
        g = _grads(story, est, seed)
        assert_within(g.mean(), TRUE020, g.std() / math.sqrt(RUNS), what=est)


def test_lr_zero_freezes_the_control_variate():
    story = sn.Story(TOY020)
    _grads(story, "relax(lr=0)", 1)
    _grads(story, "relax(lr=0)", 2)
    cv = _cv(story)
    # (eta, rho_0, rho_1, rho_2, weight of the others' mean cost) as they started
    assert (cv["lin"] == torch.tensor([0.0, 0, 0, 0, 1], dtype=torch.float64)).all()
    assert torch.allclose(cv["log_temperature"], torch.tensor(math.log(0.5), dtype=torch.float64))


def test_a_single_run_fits_on_per_sample_gradients():
    """runs=1: the proxy sums the squares of the per-sample estimates, so a batch of 20
    already determines RELAX's five coefficients. On this story the relaxed cost is a
    poor control variate, so eta, rho_1 and rho_2 settle near zero, and the constant
    part of the baseline, rho_0 + beta * E[f] (E[f] = 0.25 at t = 0), lands on the
    variance-optimal constant, about E[f] = 0.2500 (measured 0.2485)."""
    story = sn.Story("t = param(0.0)\nb ~ Bernoulli(logits=t)\ncost (b - 0.499)**2\n")
    for seed in range(5):
        res = story.run(samples=20, estimator="relax", seed=seed, dtype="float64")
    lin = _cv(story)["lin"].detach()
    assert lin.shape == (5,)
    assert lin[[0, 2, 3]].abs().max() < 0.05, lin
    assert abs(lin[1] + 0.25 * lin[4] - 0.25) < 0.01, lin
    assert abs(res.grads["t"].item() - 5e-4) < 5e-4  # one 20-sample estimate of 5e-4 (SE ~ 1e-4)


def test_small_adam_is_torch_adam_without_its_import():
    """The control variates' Adam is torch.optim.Adam's arithmetic (identical
    trajectories on a noisy quadratic), and a first RELAX run does not import
    torch._dynamo (torch.optim's first step does: 1.3-1.6 s here)."""
    import subprocess
    import sys

    from storch_nb.estimators.control_variates import _Adam

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    mine, theirs = _Adam([a], 0.05), torch.optim.Adam([b], lr=0.05)
    for _ in range(200):
        g = 2 * (a.detach() - 1.0) + torch.randn(3, dtype=torch.float64, generator=gen)
        mine.step([g])
        b.grad = g.clone()
        theirs.step()
    assert torch.equal(a, b)
    code = (
        "import sys, storch_nb as sn\n"
        "s = sn.Story('t = param(0.0)\\nb ~ Bernoulli(logits=t)\\ncost (b - 0.499)**2\\n')\n"
        "for est in ('relax', 'rebar'):\n"
        "    s.run(samples=20, estimator=est); s.run(samples=20, runs=3, estimator=est)\n"
        "s2 = sn.Story('mu = param(0.5)\\nx ~ Normal(mu, 1)\\ncost x**2\\n')\n"
        "s2.run(samples=20, estimator='lax'); s2.run(samples=20, estimator='lax')\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
