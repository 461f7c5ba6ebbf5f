"""Derivatives of every order through the DiCE surrogate.

``story.surrogate(...)`` differentiated twice with ``create_graph=True`` must give
unbiased second derivatives for every unbiased estimator, baselines included
(Storchastic gets d2E/dc2 = -37 instead of 6 once a baseline is used). Means over
many seeds are checked within 4 SE, the SE being the spread over the seeds
divided by sqrt(number of seeds); same-seed identities are checked to float tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SEED_STORY, assert_within, bernoulli_text, bernoulli_truth, seed_truth

import storch_nb as sn
from storch_nb.engine.surrogate import _box

TRUTH = seed_truth()  # d2E/dc2 = 2 (a + b) = 6


def test_magic_box_derivatives():
    """The k-th derivative of box(x^2/2) at x = 1, k = 0..9 (DiCE; NOTES.md)."""
    x = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    y = _box(x**2 / 2)
    got = [y.item()]
    for _ in range(9):
        (y,) = torch.autograd.grad(y, x, create_graph=True)
        got.append(y.item())
    assert got == pytest.approx([1, 1, 2, 4, 10, 26, 76, 232, 764, 2620], rel=1e-12)


def test_magic_box_value_is_one_and_stops_no_gradient():
    x = torch.tensor([0.3, -2.0, 5.0], requires_grad=True)
    y = _box(3 * x)
    assert torch.equal(y.detach(), torch.ones(3))
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.full((3,), 3.0))


def _hessians(story, estimator, samples, seeds, wrt=("a", "b", "c")):
    """Per seed: the Hessian of the surrogate with respect to the story's params (a, b, c)."""
    out = []
    for seed in seeds:
        loss = story.surrogate(samples=samples, estimator=estimator, seed=seed)
        params = [story.params[k] for k in wrt]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        rows = []
        for g in grads:
            rows.append(
                torch.stack(
                    [
                        h if h is not None else torch.zeros(())
                        for h in torch.autograd.grad(g, params, retain_graph=True, allow_unused=True)
                    ]
                )
            )
        out.append(torch.stack(rows))
    return torch.stack(out).double()


@pytest.mark.parametrize(
    "estimator",
    ["pathwise", "score", "rloo", "score(baseline='rloo')", "score(baseline='moving_average')",
     "score(baseline='batch_average')"],
)  # fmt: skip
def test_seed_story_second_derivative_c(estimator):
    """d2E/dc2 = 6 averaged over 600 seeds of S = 1000 (batch_average: 6 (1 - 1/S) = 5.994,
    a bias far below the SE ~0.08); pathwise gives exactly 6 on every seed."""
    story = sn.Story(SEED_STORY)
    S, n = 1000, 600
    hs = []
    for seed in range(n):
        loss = story.surrogate(samples=S, estimator=estimator, seed=seed)
        c = story.params["c"]
        (g,) = torch.autograd.grad(loss, c, create_graph=True)
        (h,) = torch.autograd.grad(g, c)
        hs.append(h.item())
    hs = torch.tensor(hs, dtype=torch.float64)
    truth = TRUTH["hessian"][2][2] * ((1 - 1 / S) if "batch_average" in estimator else 1)
    if estimator == "pathwise":
        torch.testing.assert_close(hs, torch.full_like(hs, 6.0), rtol=0, atol=1e-4)
    else:
        assert hs.std() > 0
    assert_within(hs.mean(), truth, hs.std() / math.sqrt(n), atol=1e-4, what=estimator)


@pytest.mark.parametrize("estimator", ["score", "rloo", "score(baseline='batch_average')", "pathwise"])
def test_seed_story_full_hessian(estimator):
    """All second derivatives, mixed ones included, against the closed-form Hessian of
    E = (a+b)((c+b)^2+1): [[0,5,5],[5,16,11],[5,11,6]] at (1, 2, 0.5)."""
    story = sn.Story(SEED_STORY)
    n, S = 300, 1000
    H = _hessians(story, estimator, S, range(1000, 1000 + n))
    truth = torch.tensor(TRUTH["hessian"], dtype=torch.float64)
    if "batch_average" in estimator:
        # the baseline's second-order term -B (l'' + l'^2) lives in the (b, c) block (l depends on
        # u = b + c only); B's own-sample share 1/S gives it expectation -(1/S) d2E/du2 = -2(a+b)/S
        truth[1:, 1:] -= 6 / S
    assert_within(H.mean(0), truth, H.std(0) / math.sqrt(n), atol=1e-3, what=estimator)
    # symmetric on every seed
    torch.testing.assert_close(H, H.transpose(1, 2), rtol=1e-4, atol=1e-3)


def _same_seed_quantities(S, seed):
    """On one seed's draws e_i (mu = c + b = 2.5): mean(f), and m2 = mean((e - mu)^2), read
    off plain score and batch_average runs: dE/da(score) = mean(e^2),
    grad_c(score) - grad_c(batch) = mean(f) mean(e - mu)."""
    story = sn.Story(SEED_STORY)
    score = story.run(samples=S, estimator="score", seed=seed, dtype="float64")
    batch = story.run(samples=S, estimator="score(baseline='batch_average')", seed=seed, dtype="float64")
    mean_f = score.cost
    mean_d = ((score.grads["c"] - batch.grads["c"]) / mean_f).item()  # mean(e - mu)
    mean_e2 = score.grads["a"].item()
    mu = 2.5
    m2 = mean_e2 - 2 * mu * mean_d - mu * mu  # mean((e - mu)^2)
    return mean_f, m2


def _d2c(story, estimator, S, seed):
    loss = story.surrogate(samples=S, estimator=estimator, seed=seed, dtype="float64")
    c = story.params["c"]
    (g,) = torch.autograd.grad(loss, c, create_graph=True)
    (h,) = torch.autograd.grad(g, c)
    return h.item()


def test_baseline_second_order_term_same_seed():
    """The baseline enters as (1 - box(l)) b, whose second derivative in c is
    -b (l'' + l'^2) = -b ((e - mu)^2 - 1): on the same draws
    h(batch_average) = h(score) - mean(f) (m2 - 1) and the k-th moving-average call
    uses b_k = (1 - 0.9^k) mean(f)."""
    S, seed = 40, 17
    mean_f, m2 = _same_seed_quantities(S, seed)
    story = sn.Story(SEED_STORY)
    h_score = _d2c(story, "score", S, seed)
    h_batch = _d2c(story, "score(baseline='batch_average')", S, seed)
    assert h_batch == pytest.approx(h_score - mean_f * (m2 - 1), rel=1e-9, abs=1e-9)
    ma = sn.Story(SEED_STORY)
    for k in range(3):
        h = _d2c(ma, "score(baseline='moving_average')", S, seed)
        assert h == pytest.approx(h_score - (1 - 0.9**k) * mean_f * (m2 - 1), rel=1e-9, abs=1e-9), f"call {k}"


def test_batch_average_second_derivative_factor():
    """With S = 2 the batch-average Hessian is biased by exactly (1 - 1/S): 6 -> 3.
    4000 seeds: SE ~0.5, so 3 is checked within 4 SE and 6 is excluded."""
    story = sn.Story(SEED_STORY)
    S, n = 2, 2000
    hs = torch.tensor([_d2c(story, "score(baseline='batch_average')", S, s) for s in range(n)], dtype=torch.float64)
    se = hs.std() / math.sqrt(n)
    assert_within(hs.mean(), 3.0, se, what="batch_average S=2")
    assert abs(hs.mean().item() - 6.0) > 4 * se.item()
    rl = torch.tensor([_d2c(story, "rloo", S, s) for s in range(n // 2)], dtype=torch.float64)
    assert_within(rl.mean(), 6.0, rl.std() / math.sqrt(n // 2), what="rloo S=2")


# ---------------------------------------------------------------- discrete


def _d2t(story, estimator, S, seed):
    loss = story.surrogate(samples=S, estimator=estimator, seed=seed, dtype="float64")
    t = story.params["t"]
    (g,) = torch.autograd.grad(loss, t, create_graph=True)
    (h,) = torch.autograd.grad(g, t)
    return h.item()


@pytest.mark.parametrize("t", [0.0, 0.3])
def test_bernoulli_second_derivative(t):
    """d2E/dt2 = sigmoid''(t) (1 - 2 p0): enumerate gives it exactly, score and rloo on average."""
    story = sn.Story(bernoulli_text(t, 0.45))
    exact = _d2t(story, "enumerate", 1, 0)
    # the closed form at the parameter value the run used (its float64 rounding is tested elsewhere)
    truth = bernoulli_truth(story.params["t"].item(), 0.45)["hess"]
    assert exact == pytest.approx(truth, abs=1e-12)
    n = 300
    for est in ["score", "rloo"]:
        hs = torch.tensor([_d2t(story, est, 64, s) for s in range(n)], dtype=torch.float64)
        assert_within(hs.mean(), truth, hs.std() / math.sqrt(n), atol=1e-9, what=est)


NESTED = """\
theta = param(torch.tensor([0.1, -0.3, 0.5, 0.2, -0.1]))
k ~ Categorical(logits=theta)
y ~ Bernoulli(probs=sigmoid(theta[k]))
cost (k - 2.0)**2 + 3*y
"""


def _nested_expectation(theta):
    p = torch.softmax(theta, 0)
    return (p * ((torch.arange(5.0, dtype=theta.dtype) - 2.0) ** 2 + 3 * torch.sigmoid(theta))).sum()


def test_nested_hessian_enumerate_and_rloo():
    # torch.tensor([...]) in the story is float32: the closed form at those float32 values
    theta0 = torch.tensor([0.1, -0.3, 0.5, 0.2, -0.1]).double()
    truth = torch.autograd.functional.hessian(_nested_expectation, theta0)
    story = sn.Story(NESTED)

    def hessian(estimator, S, seed):
        loss = story.surrogate(samples=S, estimator=estimator, seed=seed, dtype="float64")
        th = story.params["theta"]
        (g,) = torch.autograd.grad(loss, th, create_graph=True)
        return torch.stack([torch.autograd.grad(g[i], th, retain_graph=True)[0] for i in range(5)])

    torch.testing.assert_close(hessian("enumerate", 1, 0), truth, rtol=0, atol=1e-10)
    n = 150
    hs = torch.stack([hessian("rloo", 64, s) for s in range(n)])
    assert_within(hs.mean(0), truth, hs.std(0) / math.sqrt(n), atol=1e-9, what="rloo nested Hessian")
