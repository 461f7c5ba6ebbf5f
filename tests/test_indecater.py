"""IndeCateR (independent categoricals) against ``story.exact()``.

Means over R runs are checked within 4 standard errors (std over runs /
sqrt(R)); a correct estimator fails one such check with probability ~6e-5 and
every test has a fixed seed. Variances are compared with the standard error of
a sample variance from the runs' fourth moment (``variance_se``).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_within, variance_se
from conftest import check_hessian as _check_hessian
from conftest import surrogate_hessian as _surrogate_hessian

import storch_nb as sn

THETA = [0.1, -0.3, 0.5, 0.0, 0.2]
CATEGORICAL = f"theta = param(torch.tensor({THETA}))\nk ~ Categorical(logits=theta)\ncost (k - 2.0)**2\n"
ONEHOT = (
    f"theta = param(torch.tensor({THETA}))\nk ~ OneHotCategorical(logits=theta)\n"
    "cost ((k * torch.arange(5.0)).sum() - 2.0)**2\n"
)
# three Bernoulli entries and a cost that couples them (not additive)
BERNOULLI_VECTOR = (
    "t = param(torch.tensor([0.2, -0.5, 1.0]))\nb ~ Bernoulli(logits=t)\ncost (b.sum() - 1.3)**2 + 2 * b[0] * b[2]\n"
)
# three independent categoricals with four outcomes each (64 joint outcomes)
CATEGORICALS = (
    "theta = param(torch.tensor([[0.3, -0.2, 0.1, 0.0], [0.5, 0.5, -1.0, 0.2], [0.0, 0.1, 0.2, 0.3]]))\n"
    "k ~ Categorical(logits=theta)\n"
    "cost (k.float() * torch.tensor([1.0, -2.0, 0.5])).sum()**2 + k[0] * k[1]\n"
)
# the second site's parameters depend on the first sample
NESTED = (
    f"theta = param(torch.tensor({THETA}))\nk ~ Categorical(logits=theta)\n"
    "y ~ Bernoulli(probs=sigmoid(theta[k]))\ncost (k - 2.0)**2 + 3*y\n"
)


def _check_unbiased(text: str, estimator, samples: int = 8, runs: int = 1000, seed: int = 0) -> sn.Result:
    story = sn.Story(text)
    ex = story.exact(dtype="float64")
    res = story.run(samples=samples, runs=runs, estimator=estimator, seed=seed, dtype="float64")
    for name, truth in ex.grads.items():
        g = res.grads[name]
        assert g.shape == (runs, *truth.shape)
        assert torch.isfinite(g).all()
        assert_within(g.mean(0), truth, g.std(0) / math.sqrt(runs), atol=1e-10, what=f"{estimator} d/d{name}")
    # the cost estimate is f(x) at the sample: unbiased for E f
    assert abs(res.cost - ex.cost) <= 4 * res.cost_stderr + 1e-10
    return res


@pytest.mark.parametrize("text", [CATEGORICAL, ONEHOT], ids=["categorical", "onehot"])
def test_single_categorical_is_exact(text):
    """With one categorical entry (N = 1) IndeCateR sums every outcome: each run's
    gradient *is* exact()'s, to rounding; the cost estimate f(k) stays a sample."""
    story = sn.Story(text)
    ex = story.exact(dtype="float64")
    res = story.run(samples=4, runs=200, estimator="indecater", seed=0, dtype="float64")
    assert res.estimators == {"k": "indecater"}
    torch.testing.assert_close(res.grads["theta"], ex.grads["theta"].expand(200, 5), rtol=0, atol=1e-12)
    assert res.costs.std() > 0  # the value is the sample's cost, not the expectation
    assert abs(res.cost - ex.cost) <= 4 * res.cost_stderr


@pytest.mark.parametrize("text", [BERNOULLI_VECTOR, CATEGORICALS], ids=["bernoulli3", "categorical3x4"])
def test_independent_entries_unbiased(text):
    """Vectors of independent entries (N = 3): the mean over runs matches exact()."""
    _check_unbiased(text, "indecater")


def test_rao_blackwellises_the_score_function():
    """Per coordinate, IndeCateR is E[score term | x_{-i}] (the outcomes of x_i are
    summed exactly), so its variance is at most the plain score function's. On the
    Bernoulli vector the gap is large; checked with 4 SE of both sample variances."""
    story = sn.Story(BERNOULLI_VECTOR)
    g_ind = story.run(samples=1, runs=4000, estimator="indecater", seed=1).grads["t"]
    g_sc = story.run(samples=1, runs=4000, estimator="score", seed=2).grads["t"]
    for i in range(3):
        v_ind, v_sc = g_ind[:, i].var().item(), g_sc[:, i].var().item()
        margin = 4 * math.hypot(variance_se(g_ind[:, i]), variance_se(g_sc[:, i]))
        assert v_ind < v_sc - margin, (i, v_ind, v_sc, margin)


@pytest.mark.parametrize(
    "estimator",
    ["indecater", {"k": "indecater", "y": "rloo"}, {"k": "rloo", "y": "indecater"}],
    ids=["both", "indecater+rloo", "rloo+indecater"],
)
def test_nested_story_unbiased(estimator):
    """The second site's parameters depend on the first sample; an rloo site upstream
    of IndeCateR compares the sample's own variant (a fixed plate position), so its
    leave-one-out baseline never depends on the particle's own draw."""
    res = _check_unbiased(NESTED, estimator, seed=3)
    if isinstance(estimator, dict):
        assert res.estimators["k"].split("(")[0] == estimator["k"]


def test_pathwise_site_feeding_indecater():
    """A pathwise Normal feeding the Bernoulli logits: z ~ N(m, 1), b ~ Bernoulli(t + z),
    cost (b0 + b1 - z)^2, against 80-point Gauss-Hermite quadrature of the closed form."""
    text = (
        "m = param(0.2)\nz ~ Normal(m, 1)\nt = param(torch.tensor([0.3, -0.4]))\n"
        "b ~ Bernoulli(logits=t + z)\ncost (b.sum() - z)**2\n"
    )
    import numpy as np

    x, w = np.polynomial.hermite_e.hermegauss(80)
    m = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.3, -0.4], dtype=torch.float64, requires_grad=True)
    z = m + torch.tensor(x)
    p = torch.sigmoid(t + z[:, None])
    e = (torch.tensor(w / w.sum()) * ((p * (1 - p)).sum(1) + (p.sum(1) - z) ** 2)).sum()
    gm, gt = torch.autograd.grad(e, [m, t])
    res = sn.Story(text).run(samples=8, runs=2000, estimator={"z": "pathwise", "b": "indecater"}, seed=4,
                             dtype="float64")  # fmt: skip
    assert_within(res.mean_grads()["m"], gm, res.stderr["m"], what="d/dm")
    assert_within(res.mean_grads()["t"], gt, res.stderr["t"], what="d/dt")


def test_second_derivatives():
    """The surrogate's Hessian is unbiased: with one categorical (N = 1) it is exactly the
    enumerated Hessian (sum_k d2 p(k) f(k)); on the Bernoulli vector the cross-coordinate
    terms come from the sample's score function, checked over 20 seeds."""
    cat = sn.Story(CATEGORICAL)
    exact = _surrogate_hessian(cat, "enumerate", 1, 0, ["theta"])
    torch.testing.assert_close(_surrogate_hessian(cat, "indecater", 16, 3, ["theta"]), exact, rtol=0, atol=1e-10)
    vec = sn.Story(BERNOULLI_VECTOR)
    _check_hessian(vec, "indecater", 1000, ["t"], _surrogate_hessian(vec, "enumerate", 1, 0, ["t"]))


def test_refuses_unfit_sites():
    """Mismatches raise EstimatorError naming the site."""
    with pytest.raises(sn.EstimatorError, match=r"indecater.*site `x`.*Normal"):
        sn.Story("m = param(0.0)\nx ~ Normal(m, 1) using indecater\ncost x\n").run(samples=4)
    with pytest.raises(sn.EstimatorError, match=r"site `b`.*own batch shape"):
        sn.Story("t = param(torch.zeros(3, 4))\nb ~ Bernoulli(logits=t) using indecater\ncost b.sum()\n").run(samples=4)
    with pytest.raises(sn.EstimatorError, match=r"site `k`.*option n"):
        sn.Story(CATEGORICAL.replace("logits=theta)", "logits=theta) using indecater(n=2)")).run(samples=4)
