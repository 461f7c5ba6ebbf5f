"""Sampling without replacement: ``unordered_set`` and ``score_wor`` (Kool, van
Hoof & Welling, 2020).

The oracle is a brute-force implementation written from the paper's
definitions (``p^D(S)`` as a sum over orderings with renormalised domains,
the leave-one-out ratios ``R(S, s)`` and ``R^{D \\ s}(S, s')``), which also
gives each estimator's *exact* mean and variance by enumerating all ordered
samples. Means over runs are checked within 4 SE of ``story.exact()``;
variances within 4 SE (``variance_se``) of the enumerated ones.

Exact variances on the five-outcome Categorical, k = 4 (4 cost evaluations
per particle), summed over the five logits: score_wor 0.161, unordered_set
0.267, score with 4 samples 1.195 (= Var_1 / 4), rloo with 4 samples ~0.66
(measured). Note that per logit score_wor is *not* always below
unordered_set (logit 2: 0.041 vs 0.013); the ordering holds for the total.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import assert_within, variance_se

import storch_nb as sn
from storch_nb.estimators import make_estimator
from storch_nb.estimators.without_replacement import set_ratios

# the story's parameter is a float32 tensor: the oracle uses its exact (rounded) values
THETA = torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2]).double().tolist()

CAT = """\
theta = param(torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2]))
k ~ Categorical(logits=theta)
cost (k - 2.0)**2
"""

ONEHOT = """\
theta = param(torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2]))
x ~ OneHotCategorical(logits=theta)
cost ((x * torch.arange(5.0)).sum() - 2.0)**2
"""


# ------------------------------------------------------- brute-force oracle


def _p_set(p: np.ndarray, subset, removed) -> float:
    """p^{D \\ removed}(subset): probability that sampling |subset| times without
    replacement from D minus `removed` (renormalised) gives the set `subset`."""
    mass = 1.0 - sum(p[r] for r in removed)
    total = 0.0
    for order in itertools.permutations(subset):
        pr, m = 1.0, mass
        for b in order:
            pr *= p[b] / m
            m -= p[b]
        total += pr
    return total


def _ratios(p: np.ndarray, sample) -> tuple[dict, dict]:
    """R(S, s) and p(s') R^{D\\s}(S, s') from the definitions."""
    S = set(sample)
    p_s = _p_set(p, S, ())
    r1 = {s: _p_set(p, S - {s}, {s}) / p_s for s in S}
    r2 = {}
    for s in S:
        for s2 in S:
            if s2 == s:
                r2[s, s2] = p[s]
            else:
                r2[s, s2] = p[s2] * _p_set(p, S - {s, s2}, {s, s2}) / _p_set(p, S - {s}, {s})
    return r1, r2


def enumerated_moments(theta, f, k: int, baseline: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and per-entry variance of the single-particle estimator."""
    th = np.asarray(theta, dtype=float)
    p = np.exp(th - th.max())
    p /= p.sum()
    n = len(p)

    def grad_log_p(s):
        g = -p.copy()
        g[s] += 1
        return g

    mean, second = np.zeros(n), np.zeros(n)
    for order in itertools.permutations(range(n), k):
        pr, m = 1.0, 1.0
        for b in order:
            pr *= p[b] / m
            m -= p[b]
        r1, r2 = _ratios(p, order)
        est = np.zeros(n)
        for s in order:
            signal = f[s]
            if baseline:
                signal = f[s] - sum(r2[s, s2] * f[s2] for s2 in order)
            est += p[s] * r1[s] * grad_log_p(s) * signal
        mean += pr * est
        second += pr * est**2
    return mean, second - mean**2


F = (np.arange(5) - 2.0) ** 2


def _mean_se(g: torch.Tensor):
    g = g.double()
    return g.mean(0), g.std(0) / math.sqrt(g.shape[0])


# ---------------------------------------------------------------- the ratios


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_set_ratios_match_definitions(k):
    """w_s = p(s) R(S, s) and (1 - p(s)) v_{s s'} = p(s') R^{D\\s}(S, s') for
    random logits and samples, against the brute force, to 1e-12 (float64)."""
    gen = torch.Generator().manual_seed(k)
    logits = torch.log_softmax(torch.randn(6, generator=gen, dtype=torch.float64) * 1.5, -1)
    p = logits.exp().numpy()
    for _ in range(5):
        sample = torch.randperm(6, generator=gen)[:k]
        w, v = set_ratios(logits[None], sample[None], second=True)
        r1, r2 = _ratios(p, sample.tolist())
        s = sample.tolist()
        want_w = [p[a] * r1[a] for a in s]
        np.testing.assert_allclose(w[0].numpy(), want_w, rtol=1e-12, atol=1e-14)
        assert w.sum().item() == pytest.approx(1.0, abs=1e-12)
        for i, a in enumerate(s):
            for j, b in enumerate(s):
                if i != j:
                    assert (1 - p[a]) * v[0, i, j].item() == pytest.approx(r2[a, b], rel=1e-10, abs=1e-14)
                else:
                    assert v[0, i, j].item() == 0.0


def test_oracle_is_unbiased():
    """The brute-force estimators have the exact gradient as their mean (a check
    of the oracle and of the paper's formulas, with and without the built-in baseline)."""
    exact = sn.Story(CAT).exact(dtype="float64").grads["theta"].numpy()
    for k in (2, 3, 4):
        for baseline in (False, True):
            mean, _ = enumerated_moments(THETA, F, k, baseline)
            np.testing.assert_allclose(mean, exact, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------- the engine


@pytest.mark.parametrize("story_text", [CAT, ONEHOT], ids=["categorical", "onehot"])
@pytest.mark.parametrize("estimator", ["unordered_set", "score_wor"])
def test_full_sample_is_exact(story_text, estimator):
    """With k = K every outcome is in the sample: cost and gradient are exact."""
    story = sn.Story(story_text)
    exact = story.exact(dtype="float64")
    res = story.run(samples=3, runs=4, estimator=f"{estimator}(k=5)", seed=0, dtype="float64")
    for g in res.grads["theta"]:
        torch.testing.assert_close(g, exact.grads["theta"], rtol=1e-9, atol=1e-9)
    assert res.cost == pytest.approx(exact.cost, rel=1e-9)


@pytest.mark.parametrize(
    ("estimator", "k"), [("unordered_set", k) for k in (1, 2, 3, 4)] + [("score_wor", k) for k in (2, 3, 4)]
)
def test_categorical_unbiased(estimator, k):
    """Mean over 2000 runs of 4 particles within 4 SE of story.exact(), per logit;
    the cost estimate (per-run costs) as well."""
    story = sn.Story(CAT)
    exact = story.exact(dtype="float64")
    res = story.run(samples=4, runs=2000, estimator=f"{estimator}(k={k})", seed=k, dtype="float64")
    mean, se = _mean_se(res.grads["theta"])
    assert_within(mean, exact.grads["theta"], se, what=f"{estimator}(k={k})")
    cost_mean, cost_se = _mean_se(res.costs)
    assert_within(cost_mean, exact.cost, cost_se, what=f"{estimator}(k={k}) cost")


@pytest.mark.parametrize("estimator", ["unordered_set(k=3)", "score_wor(k=3)"])
def test_onehot_unbiased(estimator):
    story = sn.Story(ONEHOT)
    exact = story.exact(dtype="float64")
    res = story.run(samples=4, runs=2000, estimator=estimator, seed=4, dtype="float64")
    mean, se = _mean_se(res.grads["theta"])
    assert_within(mean, exact.grads["theta"], se, what=estimator)


def test_cost_depending_on_parameters():
    """The cost depends on a parameter directly: the weighted value term keeps
    its pathwise gradient (d/da), alongside the score part (d/dtheta)."""
    text = CAT.replace("cost (k - 2.0)**2", "a = param(0.7)\ncost (k - a)**2 + a * theta[2]")
    story = sn.Story(text)
    exact = story.exact(dtype="float64")
    for est in ("unordered_set(k=3)", "score_wor(k=3)"):
        res = story.run(samples=4, runs=2000, estimator=est, seed=8, dtype="float64")
        for name in ("theta", "a"):
            mean, se = _mean_se(res.grads[name])
            assert_within(mean, exact.grads[name], se, what=f"{est} d/d{name}")


def test_nested_stories():
    """The site downstream of a scored Bernoulli (its logits are batched), and
    upstream of one: every gradient within 4 SE of story.exact()."""
    down = """\
t = param(0.3)
theta = param(torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2]))
b ~ Bernoulli(logits=t) using rloo
k ~ Categorical(logits=theta + b * torch.tensor([1.0, 0.0, -1.0, 0.5, 0.0])) using score_wor(k=3)
cost (k - 2.0 - b)**2
"""
    up = """\
t = param(0.3)
theta = param(torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2]))
k ~ Categorical(logits=theta) using unordered_set(k=3)
b ~ Bernoulli(logits=t + 0.5 * k) using rloo
cost (b - 0.45)**2 + 0.1 * k
"""
    for text in (down, up):
        story = sn.Story(text)
        exact = story.exact(dtype="float64")
        res = story.run(samples=8, runs=1000, seed=6, dtype="float64")
        for name in ("t", "theta"):
            mean, se = _mean_se(res.grads[name])
            assert_within(mean, exact.grads[name], se, what=f"nested d/d{name}")
        cost_mean, cost_se = _mean_se(res.costs)
        assert_within(cost_mean, exact.cost, cost_se, what="nested cost")


def _total_variance(g: torch.Tensor) -> tuple[float, float]:
    """Trace of the covariance over runs, and its standard error (from the
    spread of the squared deviations)."""
    g = g.double()
    d2 = ((g - g.mean(0)) ** 2).sum(-1)
    return d2.mean().item(), d2.std().item() / math.sqrt(g.shape[0])


def test_variance_matches_enumeration_and_ordering():
    """Single-particle variances (k = 4) equal the enumerated ones within 4 SE
    per logit; and in total score_wor < unordered_set < rloo(4 samples) <
    score(4 samples), the same number of cost evaluations, each gap > 4 SE."""
    story = sn.Story(CAT)
    runs = 20_000
    totals = {}
    for est, baseline in (("unordered_set(k=4)", False), ("score_wor(k=4)", True)):
        g = story.run(samples=1, runs=runs, estimator=est, seed=12, dtype="float64").grads["theta"]
        _, var = enumerated_moments(THETA, F, 4, baseline)
        for i in range(5):
            assert_within(g[:, i].var().item(), var[i], variance_se(g[:, i]), what=f"{est} variance [{i}]")
        totals[est] = _total_variance(g)
    for est in ("rloo", "score"):
        g = story.run(samples=4, runs=runs, estimator=est, seed=12, dtype="float64").grads["theta"]
        totals[est] = _total_variance(g)
    order = ["score_wor(k=4)", "unordered_set(k=4)", "rloo", "score"]
    for lo, hi in zip(order, order[1:]):
        (v_lo, se_lo), (v_hi, se_hi) = totals[lo], totals[hi]
        assert v_lo + 4 * se_lo < v_hi - 4 * se_hi, totals
    # score with 4 samples: Var_1 / 4, with Var_1 from the single-sample enumeration (k = 1)
    _, var1 = enumerated_moments(THETA, F, 1, False)
    v, se = totals["score"]
    assert abs(v - var1.sum() / 4) < 4 * se


# ------------------------------------------------------- second derivatives


def _closed_hessian() -> torch.Tensor:
    theta = torch.tensor(THETA, dtype=torch.float64)
    f = torch.tensor(F, dtype=torch.float64)
    return torch.autograd.functional.hessian(lambda t: (torch.softmax(t, 0) * f).sum(), theta)


def _surrogate_hessian(story: sn.Story, estimator: str, samples: int, seed: int) -> torch.Tensor:
    loss = story.surrogate(samples=samples, estimator=estimator, seed=seed, dtype="float64")
    (theta,) = [story.params["theta"]]
    (g,) = torch.autograd.grad(loss, [theta], create_graph=True)
    return torch.stack([torch.autograd.grad(g[i], [theta], retain_graph=True)[0] for i in range(g.numel())])


@pytest.mark.parametrize("estimator", ["unordered_set", "score_wor"])
def test_second_derivatives(estimator):
    """The surrogate is DiCE on the first draw, Rao-Blackwellised over the order:
    with k = K its Hessian is exact (1e-10); with k = 3 the mean Hessian over 40
    seeds of 200 particles is within 4 SE of the closed form, entrywise."""
    story = sn.Story(CAT)
    truth = _closed_hessian()
    torch.testing.assert_close(_surrogate_hessian(story, f"{estimator}(k=5)", 2, 0), truth, rtol=0, atol=1e-10)
    hs = torch.stack([_surrogate_hessian(story, f"{estimator}(k=3)", 200, 900 + s) for s in range(40)])
    assert_within(hs.mean(0), truth, hs.std(0) / math.sqrt(len(hs)), atol=1e-9, what=f"{estimator} Hessian")


# --------------------------------------------------------------------- errors


def test_refuses_sites_it_does_not_fit():
    bern = "t = param(torch.zeros(13))\nb ~ Bernoulli(logits=t) using unordered_set\ncost b.sum()\n"
    with pytest.raises(sn.EstimatorError) as info:  # 13 coins in one site: 8192 joint outcomes
        sn.Story(bern).run(samples=4)
    assert "site `b`" in info.value.message and "8,192 joint outcomes" in info.value.message
    assert info.value.lineno == 2
    normal = "m = param(0.0)\nx ~ Normal(m, 1) using score_wor\ncost x**2\n"
    with pytest.raises(sn.EstimatorError, match="Categorical, OneHotCategorical and Bernoulli") as info:
        sn.Story(normal).run(samples=4)
    assert info.value.lineno == 2
    # more samples than outcomes
    with pytest.raises(sn.EstimatorError, match=r"site `k`.*k=6 is more than the site's 5 outcomes"):
        sn.Story(CAT.replace("theta)", "theta) using score_wor(k=6)")).run(samples=4)
    # several categoricals in one site: sampled jointly, up to 4096 joint outcomes
    many = (
        "theta = param(torch.zeros(6, 5))\nk ~ Categorical(logits=theta) using unordered_set(k=2)\ncost k.sum() * 1.0\n"
    )
    with pytest.raises(sn.EstimatorError, match="15,625 joint outcomes") as info:
        sn.Story(many).run(samples=4)
    assert info.value.lineno == 2 and "k ~ Categorical" in str(info.value)
    grid = "theta = param(torch.zeros(2, 2))\nb ~ Bernoulli(logits=theta) using unordered_set\ncost b.sum()\n"
    with pytest.raises(sn.EstimatorError, match=r"own batch shape \(N,\) or \(\), not \(2, 2\)"):
        sn.Story(grid).run(samples=4)
    # option n: the k samples are the plate
    with pytest.raises(sn.EstimatorError, match="option n"):
        sn.Story(CAT.replace("theta)", "theta) using unordered_set(n=2)")).run(samples=4)


@pytest.mark.parametrize(
    "spec", ["score_wor(k=1)", "unordered_set(k=0)", "unordered_set(k=2.5)", "unordered_set(k=13)"]
)
def test_k_validated(spec):
    with pytest.raises(sn.EstimatorError, match="option k"):
        make_estimator(spec)


def test_registered():
    assert {"unordered_set", "score_wor"} <= set(sn.estimators())
    assert make_estimator("score_wor(k=3)").text() == "score_wor(k=3)"


# ------------------------------------------------------------------ Bernoulli sites

COINS = (
    "t = param(0.3)\nw = param(-0.2)\nb ~ Bernoulli(logits=t) using {est}\n"
    "c ~ Bernoulli(logits=w + b) using {est}\ncost (b + 2 * c - 1.3)**2\n"
)


@pytest.mark.parametrize("est", ["unordered_set", "score_wor", "unordered_set(k=1)"])
def test_bernoulli_sites_as_two_outcomes(est):
    """A Bernoulli is the two outcomes (tails, heads): k defaults to 2, every outcome,
    so the estimate is exact (zero variance); k=1 is unbiased within 4 SE."""
    truth = sn.Story(COINS.format(est="enumerate")).exact(dtype="float64").grads
    res = sn.Story(COINS.format(est=est)).run(samples=4, runs=3000, seed=0, dtype="float64")
    for name in ("t", "w"):
        assert_within(res.mean_grads()[name], truth[name], res.stderr[name], atol=1e-9, what=f"{est} d/d{name}")
    if est != "unordered_set(k=1)":
        assert res.grads["t"].var().item() < 1e-20 and res.estimators["b"] == est


# ------------------------------------------------- sites of several entries (issue 13)
VECTOR_NS = {"A": torch.tensor([[1.0, -2.0, 0.5], [0.3, 2.0, -1.0], [1.5, 0.2, -0.5]], dtype=torch.float64)}
VECTOR = {
    # three coins whose cost couples them: 8 joint outcomes
    "three coins": "th = param(torch.tensor([0.2, -0.4, 0.1]))\nb ~ Bernoulli(logits=th) using {est}\n"
    "cost (b @ A @ b) + b.sum() * b[0]\n",
    "two categoricals": "th = param(torch.tensor([[0.1, -0.3, 0.5], [0.2, 0.0, -0.4]]))\n"
    "k ~ Categorical(logits=th) using {est}\ncost (k[0] - 2 * k[1] + 0.3)**2\n",
    "two one-hots": "th = param(torch.tensor([[0.1, -0.3, 0.5], [0.2, 0.0, -0.4]]))\n"
    "D ~ OneHotCategorical(logits=th) using {est}\ncost D[0] @ A @ D[1]\n",
}


@pytest.mark.parametrize("case", list(VECTOR))
@pytest.mark.parametrize("est", ["unordered_set", "score_wor"])
def test_a_site_of_several_entries_is_sampled_jointly_and_unbiased(case, est):
    """A site of N entries is one categorical over its joint outcomes (k defaults to 4 of
    them): unbiased against exact() at 4.5 SE, whatever the cost couples; with k equal
    to the number of joint outcomes, exact."""
    text = VECTOR[case]
    truth = sn.Story(text.format(est="enumerate")).exact(namespace=VECTOR_NS, dtype="float64").grads["th"]
    res = sn.Story(text.format(est=est)).run(samples=4, runs=2000, seed=0, namespace=VECTOR_NS, dtype="float64")
    assert_within(res.mean_grads()["th"], truth, res.stderr["th"], k=4.5, what=f"{est} on {case}")
    full = 8 if case == "three coins" else 9
    res = sn.Story(text.format(est=f"{est}(k={full})")).run(samples=2, seed=1, namespace=VECTOR_NS, dtype="float64")
    torch.testing.assert_close(res.grads["th"], truth, rtol=1e-9, atol=1e-9)
