"""`arms` and `double_cv` on Categorical and OneHotCategorical sites: unbiased against
exact() (4 SE, the standard errors from the runs themselves), Bernoulli kept, and their
variance against rloo at the same number of evaluations (four)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_within

import storch_nb as sn
from storch_nb.estimators.antithetic import _correction

F64 = torch.float64
NS = {
    "A": torch.tensor([[1.0, -2.0, 0.5], [0.3, 2.0, -1.0], [1.5, 0.2, -0.5]], dtype=F64),
    "bvec": torch.tensor([0.2, -0.4, 0.1], dtype=F64),
    "w": torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=F64),
}
CASES = {
    # four outcomes, a cost that indexes with the value and is not linear in it
    "categorical": "th = param(torch.tensor([0.1, -0.3, 0.5, -1.0]))\nk ~ Categorical(logits=th) using {est}\n"
    "cost w[k] + (k - 1.2)**2\n",
    # three categoricals of four outcomes in one site (logits (3, 4)), a cost that couples them
    "three-categoricals": "th = param(torch.tensor([[0.1, -0.3, 0.5, 0.0], [1.0, 0.2, -0.5, 0.3], "
    "[-0.4, 0.8, 0.1, -1.2]]))\nk ~ Categorical(logits=th) using {est}\ncost (k[0] - 2 * k[1] + k[2] - 0.3)**2\n",
    # two one-hots of three outcomes (batch shape (2,)), a cost that couples them
    "two-one-hots": "th = param(torch.tensor([[0.1, -0.3, 0.5], [0.7, -0.2, 0.0]]))\n"
    "D ~ OneHotCategorical(logits=th) using {est}\ncost (D[0] @ A @ D[1]) + 3 * (D.sum(0) @ bvec)**2\n",
    "coin": "th = param(0.3)\nb ~ Bernoulli(logits=th) using {est}\ncost (b - 0.45)**2\n",
}
RUNS = 20000


def _truth(case: str) -> torch.Tensor:
    return sn.Story(CASES[case].format(est="enumerate")).exact(namespace=NS, dtype="float64").grads["th"]


def _run(case: str, est: str, seed: int, fit_calls: int = 0):
    story = sn.Story(CASES[case].format(est=est))
    for i in range(fit_calls):  # fit double_cv's alpha on other draws
        story.run(samples=1, runs=200, seed=10 + i, namespace=NS, dtype="float64")
    return story.run(samples=1, runs=RUNS, seed=seed, namespace=NS, dtype="float64")


def _total_var(res) -> float:
    return float(res.grads["th"].var(0).sum())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [3, 4, 8])
def test_arms_unbiased(case, k):
    res = _run(case, f"arms(n={k})", seed=0)
    assert_within(res.mean_grads()["th"], _truth(case), res.stderr["th"], what=f"arms(n={k}) on {case}")


@pytest.mark.parametrize("case", list(CASES))
def test_double_cv_unbiased_fresh_and_fitted(case):
    truth = _truth(case)
    fresh = _run(case, "double_cv(n=4)", seed=0)
    assert_within(fresh.mean_grads()["th"], truth, fresh.stderr["th"], what=f"double_cv fresh on {case}")
    fitted = _run(case, "double_cv(n=4)", seed=1, fit_calls=60)
    assert_within(fitted.mean_grads()["th"], truth, fitted.stderr["th"], what=f"double_cv fitted on {case}")


@pytest.mark.parametrize("case, at_most", [("categorical", 0.9), ("three-categoricals", 1.0),
                                           ("two-one-hots", 0.95)])
def test_arms_at_most_rloos_variance_at_four_evaluations(case, at_most):
    """arms(n=4) against rloo(n=4), one particle each, 20000 runs. Measured (seeds 1 and
    2): 0.79 and 0.78 on the categorical, 0.97 and 0.94 on three coupled categoricals,
    0.84 and 0.84 on two coupled one-hots. The variance estimates have a relative
    standard error of about 1-2% each."""
    ratio = _total_var(_run(case, "arms(n=4)", seed=1)) / _total_var(_run(case, "rloo(n=4)", seed=1))
    assert ratio < at_most, ratio


def test_double_cv_on_a_categorical_index_is_rloo():
    """The index is not differentiable (df/db = 0): the Taylor term vanishes, and the
    estimates are rloo's on the same draws whatever alpha the fit reached."""
    dcv = _run("categorical", "double_cv(n=4)", seed=1, fit_calls=5)
    rloo = _run("categorical", "rloo(n=4)", seed=1)
    assert torch.allclose(dcv.grads["th"], rloo.grads["th"])


def test_fitted_double_cv_on_one_hots_at_most_rloos_variance():
    """After 60 fitting calls, on the same draws as rloo(n=4) (seed 1): measured 0.990
    (seed 2: 0.991); asserted at most rloo's."""
    ratio = _total_var(_run("two-one-hots", "double_cv(n=4)", seed=1, fit_calls=60)) / _total_var(
        _run("two-one-hots", "rloo(n=4)", seed=1))
    assert ratio <= 1.0, ratio


def test_arms_correction_for_two_outcomes_is_the_bernoulli_one():
    """For two outcomes ``S L^+`` is ``c(p)/2 [[1, -1], [-1, 1]]`` with the Bernoulli
    ``c(p) = p (1 - p) / (q - C(q, q))``: the categorical ARMS is the paper's there."""
    for p in (0.1, 0.3, 0.5, 0.8):
        for k in (2, 3, 4, 8):
            probs = torch.tensor([1 - p, p], dtype=F64)
            order = probs.argsort()
            edges = torch.cat([torch.zeros(1, dtype=F64), probs[order].cumsum(0)])
            edges[-1] = 1.0
            q = min(p, 1 - p)
            c = p * (1 - p) / (q - max(2 * q ** (1 / (k - 1)) - 1, 0.0) ** (k - 1))
            want = c / 2 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=F64)
            assert torch.allclose(_correction(edges, order, k), want), (p, k)
            assert math.isfinite(c)


def test_arms_values_keep_the_site_type_and_float32_runs():
    res = sn.Story(CASES["categorical"].format(est="arms(n=4)")).run(samples=2, runs=2, seed=0, namespace={
        "w": NS["w"].float()})
    assert torch.isfinite(res.grads["th"]).all()
    text = "th = param(torch.zeros(2, 3))\nD ~ OneHotCategorical(logits=th) using arms(n=3)\ncost D.sum() + D[0, 1]\n"
    assert torch.isfinite(sn.Story(text).run(samples=2, seed=0).grads["th"]).all()


@pytest.mark.parametrize("spec, needle", [("arms(n=2)", "K >= 3"), ("arms", "n=K"), ("double_cv", "n=K")])
def test_categorical_refusals(spec, needle):
    with pytest.raises(sn.EstimatorError, match=needle) as info:
        sn.Story(CASES["categorical"].format(est=spec)).run(samples=2, namespace=NS)
    assert info.value.lineno == 2


@pytest.mark.parametrize("est, needle", [("arms(n=4)", "Bernoulli, Categorical and OneHotCategorical"),
                                         ("double_cv(n=4)", "Bernoulli, Categorical and OneHotCategorical")])
def test_continuous_site_refused(est, needle):
    with pytest.raises(sn.EstimatorError, match=needle) as info:
        sn.Story(f"m = param(0.0)\nx ~ Normal(m, 1) using {est}\ncost x**2\n").run(samples=2)
    assert info.value.lineno == 2
