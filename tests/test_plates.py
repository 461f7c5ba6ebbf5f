"""Plates (``for x_i in plate(x):``) and credit assignment, against ``exact()`` and closed forms.

Every statistical check compares a mean over ``runs`` independent estimates with
the truth within 4 standard errors (SE = spread over runs / sqrt(runs)), fixed
seeds, float64. Truths come from ``story.exact()`` (enumeration) where it
applies; where a cost outside a plate reads a site inside it (which ``exact()``
refuses by design), from ``exact()`` of the same model written without plates
(a site with N entries, a cost whose entries are averaged: the same objective).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_within, variance_se

import storch_nb as sn

F64 = torch.float64


def sig(t):
    return torch.sigmoid(torch.as_tensor(t, dtype=F64))


def dsig(t):
    p = sig(t)
    return p * (1 - p)


def check_unbiased(res, truth: dict, what: str, scale: float = 1.0) -> None:
    """Mean over runs of every gradient within 4 SE of ``scale * truth``."""
    for name, value in truth.items():
        assert res.grads[name].shape[0] == res.runs
        assert_within(res.mean_grads()[name], scale * value, res.stderr[name], atol=1e-9, what=f"{what} d/d{name}")


# =============================================================== 1. costs outside any plate

T3 = [0.0, 0.5, -0.5]
BERN3 = "t = param(torch.tensor([0., .5, -.5]))\nb ~ Bernoulli(logits=t)\ncost {cost}\n"


def _closed(cost: str):
    """Closed forms (p = sigmoid(t), d = p (1 - p)); the objective is the mean of the cost's entries."""
    p, d = sig(T3), dsig(T3)
    return {
        # every entry is b0 + b1 + b2: objective sum p, gradient d
        "b.sum() * torch.ones(3)": d,
        # entries (b2, 2 b1, 3 b0): objective (p2 + 2 p1 + 3 p0) / 3
        "b.flip(0) * torch.tensor([1., 2., 3.])": d * torch.tensor([3.0, 2.0, 1.0], dtype=F64) / 3,
        # entries b_k b_{k-1} (cyclic): objective (1/3) sum_k p_k p_{k-1}; each p_j appears with both others
        "b * b.roll(1)": d * (p.sum() - p) / 3,
        # row 0: b_{2-k} + sum b, row 1: -2 b_{2-k} + sum b: mean of the 6 entries = (5/6) sum b
        "torch.outer(torch.tensor([1., -2.]), b.flip(0)) + b.sum()": d * 5 / 6,
    }.get(cost)


OUTSIDE_COSTS = [
    "b.sum() * torch.ones(3)",
    "b.flip(0) * torch.tensor([1., 2., 3.])",
    "b * b.roll(1)",
    "(b.cumsum(0) - 1)**2",
    "torch.outer(torch.tensor([1., -2.]), b.flip(0)) + b.sum()",  # a (2, 3) cost from a (3,) site
]


@pytest.mark.parametrize("cost", OUTSIDE_COSTS, ids=["sum-ones", "flip", "roll", "cumsum", "shape-2x3"])
def test_cost_mixing_entries_outside_plate(cost):
    """Outside a plate every entry of a site is credited with the whole cost: estimators
    agree with exact(), and exact() with the closed form. (Crediting entry j with cost
    entry j only would give, e.g. for `b.flip(0) * [1, 2, 3]`, zero for entries 0 and 2.)"""
    story = sn.Story(BERN3.format(cost=cost))
    ex = story.exact(dtype="float64")
    closed = _closed(cost)
    if closed is not None:
        torch.testing.assert_close(ex.grads["t"], closed, rtol=0, atol=1e-12)
    if cost == "b.sum() * torch.ones(3)":  # the numbers from the brief: sigmoid'(t) = [0.25, 0.235, 0.235]
        torch.testing.assert_close(
            ex.grads["t"], torch.tensor([0.25, 0.23500371, 0.23500371], dtype=F64), atol=1e-8, rtol=0
        )
    for est in ("score", "rloo", "auto"):
        res = story.run(samples=8, runs=2000, estimator=est, seed=11, dtype="float64")
        check_unbiased(res, ex.grads, f"{est} on {cost}")


def test_normal_cumsum_cost_score():
    """x ~ Normal(m, 1) with 3 entries, cost x.cumsum(0)**2 (entries mix x's entries).

    With M_k = m_0 + ... + m_k, E[(x_0 + ... + x_k)^2] = M_k^2 + (k + 1), so the objective
    (mean of the 3 entries) is (1/3) sum_k (M_k^2 + k + 1) and
    d/dm_j = (2/3) sum_{k >= j} M_k. With m = (0.5, -0.3, 1.0): M = (0.5, 0.2, 1.2) and
    the gradient is (2/3) (1.9, 1.4, 1.2) = (1.2667, 0.9333, 0.8). (Entry-wise credit,
    entry j with cost entry j only, would give (2/3) M = (0.333, 0.133, 0.8).)"""
    story = sn.Story("m = param(torch.tensor([0.5, -0.3, 1.0]))\nx ~ Normal(m, 1)\ncost x.cumsum(0)**2\n")
    truth = torch.tensor([1.9, 1.4, 1.2], dtype=F64) * 2 / 3
    res = story.run(samples=16, runs=2000, estimator="score", seed=5, dtype="float64")
    check_unbiased(res, {"m": truth}, "score on x.cumsum(0)**2")
    assert res.stderr["m"].max() < 0.05  # the check has power: 4 SE < 0.2, wrong credit is off by >= 0.8


# =============================================================== 2. plates against exact()

# A global latent g outside the plate, a local latent z inside, a cost inside the plate
# and one outside it that reads z through the stacked name h.
PLATE_A = """\
t = param(0.2)
w = param(torch.tensor([0.3, -0.4, 0.1, 0.6]))
g ~ Bernoulli(logits=t)
for x_i, w_i in plate(x, w{opts}):
    z ~ Bernoulli(logits=w_i + x_i - g)
    h = z * x_i
    cost (z - x_i + g)**2
{outside}"""
OUTSIDE_A = "cost (h.sum() - g)**2\n"
# The same model without a plate: z has 4 entries; a (4,) cost averages its entries
# (reduce="mean"), a scalar .sum() adds them (reduce="sum").
FLAT_A = """\
t = param(0.2)
w = param(torch.tensor([0.3, -0.4, 0.1, 0.6]))
g ~ Bernoulli(logits=t)
z ~ Bernoulli(logits=w + x - g)
h = z * x
cost {inside}
{outside}"""
XA = torch.tensor([0.5, -1.0, 0.2, 1.3], dtype=F64)
NSA = {"x": XA}


def plate_a(outside: bool = True, reduce: str = "mean", batch: int | None = None) -> str:
    opts = "" if reduce == "mean" else f", reduce={reduce!r}"
    opts += "" if batch is None else f", batch={batch}"
    return PLATE_A.format(opts=opts, outside=OUTSIDE_A if outside else "")


def flat_a(outside: bool = True, reduce: str = "mean") -> str:
    inside = "(z - x + g)**2" if reduce == "mean" else "((z - x + g)**2).sum()"
    return FLAT_A.format(inside=inside, outside=OUTSIDE_A if outside else "")


@pytest.fixture(scope="module")
def exact_a():
    return sn.Story(flat_a()).exact(namespace=NSA, dtype="float64")


def test_plate_exact_equals_flat_exact():
    """Without the outside cost exact() sums the plate story itself: the same as the flat story."""
    a = sn.Story(plate_a(outside=False)).exact(namespace=NSA, dtype="float64")
    b = sn.Story(flat_a(outside=False)).exact(namespace=NSA, dtype="float64")
    for name in ("t", "w"):
        torch.testing.assert_close(a.grads[name], b.grads[name], rtol=0, atol=1e-12)
    assert a.cost == pytest.approx(b.cost, abs=1e-12)


@pytest.mark.parametrize(
    "est",
    ["score", "rloo", "auto", "arm", "disarm", "rebar", "relax", {"g": "enumerate", "z": "disarm"}],
    ids=["score", "rloo", "auto", "arm", "disarm", "rebar", "relax", "enum+disarm"],
)
def test_plate_with_outside_cost_unbiased(est, exact_a):
    """Global + local latents, costs inside and outside the plate: every estimator that
    supports an outside cost reading a plated site is unbiased (truth: the flat story's exact())."""
    res = sn.Story(plate_a()).run(samples=4, runs=3000, estimator=est, seed=3, namespace=NSA, dtype="float64")
    check_unbiased(res, exact_a.grads, f"plate A {est}")


def test_plate_batch_average_bias_is_exactly_one_minus_one_over_s(exact_a):
    """score(baseline='batch_average') with S samples: sample s's baseline (1/S) sum_j f_j
    contains f_s itself, so E[(f_s - fbar) d log p_s] = (1 - 1/S) E[f_s d log p_s] (the
    terms j != s have mean 0). No parameter reaches a cost except through a site here,
    so the whole gradient is scaled by (1 - 1/S) = 3/4 at S = 4."""
    res = sn.Story(plate_a()).run(
        samples=4, runs=3000, estimator="score(baseline='batch_average')", seed=3, namespace=NSA, dtype="float64"
    )
    check_unbiased(res, exact_a.grads, "batch_average", scale=0.75)


@pytest.mark.parametrize(
    "est",
    ["rloo", "arm", "disarm", "indecater", "enumerate", {"g": "indecater", "z": "enumerate"}],
    ids=["rloo", "arm", "disarm", "indecater", "enumerate", "indecater+enum"],
)
def test_plate_inside_costs_unbiased(est):
    """Only costs inside the plate: every Bernoulli estimator, including those that vary one
    coordinate at a time (indecater, enumerate), against exact() of the plate story."""
    story = sn.Story(plate_a(outside=False))
    ex = story.exact(namespace=NSA, dtype="float64")
    res = story.run(samples=4, runs=2000, estimator=est, seed=4, namespace=NSA, dtype="float64")
    check_unbiased(res, ex.grads, f"plate A inside {est}")


@pytest.mark.parametrize("est", ["gumbel", "st_gumbel"])
def test_plate_biased_relaxations_run(est):
    """gumbel / st_gumbel are biased (no unbiasedness asserted): they run on the plate story
    with an outside cost and give finite gradients of the parameters' shapes."""
    res = sn.Story(plate_a()).run(samples=4, runs=50, estimator=est, seed=3, namespace=NSA, dtype="float64")
    assert res.grads["t"].shape == (50,) and res.grads["w"].shape == (50, 4)
    assert all(bool(torch.isfinite(g).all()) for g in res.grads.values())


def test_plate_reduce_sum(exact_a):
    """reduce='sum': exact() is N times the mean version (inside costs only); with the outside
    cost the estimate matches the flat story whose inside cost is summed."""
    mean = sn.Story(plate_a(outside=False)).exact(namespace=NSA, dtype="float64")
    summ = sn.Story(plate_a(outside=False, reduce="sum")).exact(namespace=NSA, dtype="float64")
    for name in ("t", "w"):
        torch.testing.assert_close(summ.grads[name], 4 * mean.grads[name], rtol=0, atol=1e-12)
    assert summ.cost == pytest.approx(4 * mean.cost, abs=1e-12)
    truth = sn.Story(flat_a(reduce="sum")).exact(namespace=NSA, dtype="float64")
    # sanity: the flat sum story differs from the mean one (the check discriminates)
    assert (truth.grads["w"] - exact_a.grads["w"]).abs().max() > 0.1
    for est in ("rloo", "disarm"):
        res = sn.Story(plate_a(reduce="sum")).run(
            samples=4, runs=3000, estimator=est, seed=6, namespace=NSA, dtype="float64"
        )
        check_unbiased(res, truth.grads, f"reduce=sum {est}")


# A Categorical local latent (K = 3 outcomes) under a global Bernoulli.
CAT = """\
t = param(0.2)
W = param(torch.tensor([[0.1, -0.3, 0.4], [0.0, 0.5, -0.2], [0.3, 0.2, -0.6]]))
g ~ Bernoulli(logits=t) using rloo
for x_i, w_i in plate(x, W):
    z ~ Categorical(logits=w_i + g * x_i)
    cost (z - 1.0 + g - x_i.sum())**2
"""
XC = torch.tensor([[0.5, -1.0, 0.2], [1.3, -0.4, 0.8], [0.0, 0.7, -0.3]], dtype=F64)
FLAT_CAT = """\
t = param(0.2)
W = param(torch.tensor([[0.1, -0.3, 0.4], [0.0, 0.5, -0.2], [0.3, 0.2, -0.6]]))
g ~ Bernoulli(logits=t) using rloo
z ~ Categorical(logits=W + g * x)
cost (z - 1.0 + g - x.sum(1))**2
"""


@pytest.fixture(scope="module")
def exact_cat():
    ex = sn.Story(CAT).exact(namespace={"x": XC}, dtype="float64")
    flat = sn.Story(FLAT_CAT).exact(namespace={"x": XC}, dtype="float64")
    for name in ("t", "W"):
        torch.testing.assert_close(ex.grads[name], flat.grads[name], rtol=0, atol=1e-12)
    return ex


@pytest.mark.parametrize("est", ["rloo", "score", "unordered_set(k=2)", "score_wor(k=3)", "indecater", "enumerate"])
def test_plate_categorical_unbiased(est, exact_cat):
    """Categorical local latent under a global Bernoulli (rloo): every categorical estimator
    against exact(). score_wor(k=3) samples all 3 outcomes (k = K): then the set weights are
    the probabilities and the estimate of d/dt (through g's rloo signal) must still be unbiased."""
    res = sn.Story(CAT).run(samples=4, runs=2000, estimator=est, seed=8, namespace={"x": XC}, dtype="float64")
    assert res.estimators["z"].startswith(est.split("(")[0])
    check_unbiased(res, exact_cat.grads, f"categorical plate {est}")


@pytest.mark.parametrize("est", ["unordered_set", "score_wor"])
def test_plate_without_replacement_k_defaults_to_outcomes(est, exact_cat):
    """STORY.md section 2: the `k` of unordered_set / score_wor defaults to the site's number of
    outcomes when that is smaller (here 3 < the default). Not plate-specific, but met here."""
    res = sn.Story(CAT).run(samples=4, runs=2000, estimator=est, seed=8, namespace={"x": XC}, dtype="float64")
    check_unbiased(res, exact_cat.grads, f"categorical plate {est} (default k)")


# -------------------------------------------------------- refusals of an outside cost

REFUSE = """\
w = param(torch.tensor([0.1, 0.2, 0.3]))
for x_i, w_i in plate(x, w):
    z ~ {dist}
    cost (z - x_i)**2
cost z.float().sum()**2
"""
REFUSALS = [
    ("Bernoulli(logits=w_i + x_i)", "enumerate"),
    ("Bernoulli(logits=w_i + x_i)", "indecater"),
    ("Categorical(logits=torch.stack([w_i, x_i, w_i - x_i]))", "unordered_set(k=2)"),
    ("Categorical(logits=torch.stack([w_i, x_i, w_i - x_i]))", "score_wor(k=2)"),
    ("Normal(w_i + x_i, 1.0)", "measure_valued"),
    ("Gamma(torch.exp(w_i) + 1, 1.0)", "go"),
]
XR = torch.tensor([0.5, -1.0, 0.2], dtype=F64)


@pytest.mark.parametrize("dist, est", REFUSALS, ids=[e.split("(")[0] for _, e in REFUSALS])
def test_outside_cost_refused_by_coordinatewise_estimators(dist, est):
    """A cost outside the plate reading a plated site: estimators that vary one entry or
    outcome at a time refuse with an EstimatorError (and a hint); the same site inside-only
    runs; rloo (or pathwise) supports the outside cost; the story still runs afterwards."""
    story = sn.Story(REFUSE.format(dist=dist))
    ns = {"x": XR}
    with pytest.raises(sn.EstimatorError, match="inside a plate") as info:
        story.run(samples=4, estimator=est, seed=0, namespace=ns)
    assert "line 5" in info.value.message and info.value.hint
    other = "pathwise" if dist.startswith(("Normal", "Gamma")) else "rloo"
    res = story.run(samples=4, runs=3, estimator=other, seed=0, namespace=ns)
    assert all(bool(torch.isfinite(g).all()) for g in res.grads.values())
    inside_only = sn.Story(REFUSE.format(dist=dist).replace("cost z.float().sum()**2\n", ""))
    inside_only.run(samples=4, runs=3, estimator=est, seed=0, namespace=ns)
    if dist.startswith(("Bernoulli", "Categorical")):
        with pytest.raises(sn.StoryError, match="exact"):
            story.exact(namespace=ns)


def test_outside_cost_refusal_has_lineno():
    """STORY.md: every error carries .lineno where it has one. The refusal names the cost's
    line (5) in its message; .lineno should say it (or the site's line, 3), for run() and exact()."""
    story = sn.Story(REFUSE.format(dist="Bernoulli(logits=w_i + x_i)"))
    with pytest.raises(sn.EstimatorError) as info:
        story.run(samples=4, estimator="enumerate", seed=0, namespace={"x": XR})
    assert info.value.lineno in (3, 5), info.value.lineno
    with pytest.raises(sn.StoryError) as info:
        story.exact(namespace={"x": XR})
    assert info.value.lineno in (3, 5), info.value.lineno


def test_normal_plate_closed_form():
    """z_i ~ Normal(w_i + x_i, 1) in a plate, cost (z_i - x_i)^2 inside and (sum z)^2 outside:
    E = mean_i (w_i^2 + 1) + (sum_i (w_i + x_i))^2 + N, so d/dw_i = 2 w_i / N + 2 sum(w + x)."""
    w = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    truth = 2 * w / 3 + 2 * (w + XR).sum()
    story = sn.Story(REFUSE.format(dist="Normal(w_i + x_i, 1.0)"))
    for est, samples in (("pathwise", 16), ("rloo", 16)):
        res = story.run(samples=samples, runs=1000, estimator=est, seed=9, namespace={"x": XR}, dtype="float64")
        check_unbiased(res, {"w": truth}, f"normal plate {est}")
    inside = sn.Story(REFUSE.format(dist="Normal(w_i + x_i, 1.0)").replace("cost z.float().sum()**2\n", ""))
    res = inside.run(samples=4, runs=1000, estimator="measure_valued", seed=9, namespace={"x": XR}, dtype="float64")
    check_unbiased(res, {"w": 2 * w / 3}, "normal plate measure_valued (inside only)")


# -------------------------------------------------------------------- nested plates

NEST = """\
t = param(0.3)
v = param(torch.tensor([0.2, -0.5]))
for x_i, v_i in plate(x, v):
    z ~ Bernoulli(logits=t + v_i)
    for y_ij in plate(x_i):
        u ~ Bernoulli(logits=y_ij + z - t)
        cost (u - z + y_ij)**2
    cost (z - x_i.sum())**2
{extra}"""
# the same model without plates: z (2,), u (2, 3); a cost inside both plates averages all 6
# entries, one inside the outer plate averages over its 2 datapoints
FLAT_NEST = """\
t = param(0.3)
v = param(torch.tensor([0.2, -0.5]))
z ~ Bernoulli(logits=t + v)
u ~ Bernoulli(logits=x + z[:, None] - t)
cost (u - z[:, None] + x)**2
cost (z - x.sum(1))**2
{extra}"""
# costs reading the inner plate's stacked u from the outer plate (outside the inner plate),
# and from outside both plates (u stacked twice: shape (2, 3))
NEST_EXTRA = "    cost (u.sum() - z)**2\ncost (u.sum() - 3.0)**2 / 4\n"
FLAT_EXTRA = "cost (u.sum(1) - z)**2\ncost (u.sum() - 3.0)**2 / 4\n"
XN = torch.tensor([[0.5, -1.0, 0.2], [1.3, -0.4, 0.8]], dtype=F64)


def test_nested_plates_exact_equals_flat():
    a = sn.Story(NEST.format(extra="")).exact(namespace={"x": XN}, dtype="float64")
    b = sn.Story(FLAT_NEST.format(extra="")).exact(namespace={"x": XN}, dtype="float64")
    for name in ("t", "v"):
        torch.testing.assert_close(a.grads[name], b.grads[name], rtol=0, atol=1e-12)
    assert a.cost == pytest.approx(b.cost, abs=1e-12)
    for est in ("indecater", "enumerate"):  # inside costs only: coordinate-wise estimators fit
        res = sn.Story(NEST.format(extra="")).run(
            samples=4, runs=1000, estimator=est, seed=2, namespace={"x": XN}, dtype="float64"
        )
        check_unbiased(res, a.grads, f"nested {est}")


@pytest.mark.parametrize("est", ["score", "rloo", "disarm"])
def test_nested_plates_cross_level_costs(est):
    truth = sn.Story(FLAT_NEST.format(extra=FLAT_EXTRA)).exact(namespace={"x": XN}, dtype="float64")
    res = sn.Story(NEST.format(extra=NEST_EXTRA)).run(
        samples=4, runs=3000, estimator=est, seed=2, namespace={"x": XN}, dtype="float64"
    )
    check_unbiased(res, truth.grads, f"nested cross-level {est}")


# =============================================================== 3. batch=B is unbiased

PLATE_B = """\
t = param(0.2)
w = param(torch.tensor([0.3, -0.4, 0.1, 0.6, -0.2, 0.0]))
g ~ Bernoulli(logits=t)
for x_i, w_i in plate(x, w{opts}):
    z ~ Bernoulli(logits=w_i + x_i - g)
    cost (z - x_i + g)**2
"""
XB = torch.tensor([0.7, -1.0, 0.2, 1.3, -0.4, 0.8], dtype=F64)  # no x_i in {0.5, 1.5}: d/dw_i never 0 exactly


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("est", ["rloo", {"g": "rloo", "z": "enumerate"}], ids=["rloo", "rloo+enum"])
def test_batch_unbiased_for_full_data(reduce, est):
    """N = 6, batch=2: the mean over runs of the subsampled estimate equals the full-data
    exact() gradient (reduce='sum': the B drawn datapoints' sum scaled by N/B)."""
    ns = {"x": XB}
    red = "" if reduce == "mean" else f", reduce={reduce!r}"
    full = sn.Story(PLATE_B.format(opts=red)).exact(namespace=ns, dtype="float64")
    runs = 20_000
    res = sn.Story(PLATE_B.format(opts=red + ", batch=2")).run(
        samples=4, runs=runs, estimator=est, seed=12, namespace=ns, dtype="float64"
    )
    check_unbiased(res, full.grads, f"batch=2 reduce={reduce} {est}")
    if isinstance(est, dict):
        # z enumerated: exactly the B = 2 drawn datapoints have a nonzero d/dw_i in each run
        # (drawn without replacement), each datapoint in a fraction B/N = 1/3 of the runs
        drawn = res.grads["w"] != 0
        assert bool((drawn.sum(1) == 2).all())
        freq = drawn.double().mean(0)
        assert_within(freq, 1 / 3, math.sqrt(1 / 3 * 2 / 3 / runs), what="datapoint draw frequency")


# =============================================================== 4. per-datapoint credit

# N i.i.d. copies of one datapoint (x = zeros(N)); each has its own parameter w_i and
# shares the global t. The plate averages costs over datapoints, so
#   N * dE/dw_0   is datapoint 0's own gradient (identical for every N), and
#   dE/dt = mean_i dE/dw_i, the mean of N i.i.d. per-datapoint estimates, so
#   sqrt(N) * dE/dt has the variance of one datapoint's estimate.
# With per-datapoint credit both variances are flat in N. Crediting datapoint 0's site with
# the whole (plate-averaged) cost instead adds the other N - 1 costs' noise: for rloo at S = 4,
# Var(N g_w0) = V_1 + (N - 1) Var(c) (S / (S - 1)) E[score^2] / S
#             = 0.030 + 31 * 0.317 * (4/3) * 0.458 / 4 ~ 1.5 at N = 32, ~50x V_1;
# sqrt(N) g_t likewise ~ N Var(c) E[score^2] / (S - 1) ~ 1.55, ~50x; for plain score (no
# baseline) the growth is quadratic in N (the other datapoints' mean cost multiplies the score).
CREDIT = """\
t = param(0.3)
w = param(torch.zeros(len(x)))
for x_i, w_i in plate(x, w):
    b ~ Bernoulli(logits=t + w_i + x_i + torch.tensor([0.0, 0.5]))
    cost (b.sum() - 0.9)**2
"""


@pytest.mark.parametrize(
    "est",
    ["score", "rloo", "arm", "disarm", "rebar", "relax", "indecater", "score(baseline='batch_average')"],
    ids=["score", "rloo", "arm", "disarm", "rebar", "relax", "indecater", "batch_average"],
)
def test_per_datapoint_variance_flat_in_n(est):
    runs, S = 4000, 4
    truth1 = sn.Story(CREDIT).exact(namespace={"x": torch.zeros(1, dtype=F64)}, dtype="float64").grads["t"]
    scale = (1 - 1 / S) if "batch_average" in est else 1.0
    stats = {}
    for n in (1, 32):
        story = sn.Story(CREDIT)  # fresh: rebar / relax start from the same control variate
        res = story.run(
            samples=S, runs=runs, estimator=est, seed=21, namespace={"x": torch.zeros(n, dtype=F64)}, dtype="float64"
        )
        own = n * res.grads["w"][:, 0]
        glob = math.sqrt(n) * res.grads["t"]
        # datapoint 0's estimate is unbiased for the one-datapoint gradient
        assert_within(own.mean(), scale * truth1, own.std() / math.sqrt(runs), what=f"{est} N={n} mean")
        for key, x in (("own", own), ("global", glob)):
            v = x.var().item()
            assert v > 0 and variance_se(x) / v < 0.1, (est, n, key, v, variance_se(x))
            stats[(key, n)] = v
    for key in ("own", "global"):
        ratio = stats[(key, 32)] / stats[(key, 1)]
        assert 1 / 1.5 <= ratio <= 1.5, f"{est}: Var at N=32 / N=1 for {key} = {ratio:.3f} ({stats})"


# The same model without the plate: b has N x 2 entries, and outside a plate every entry is
# credited with the whole cost (no independence is guessed from shapes). This is the
# joint credit of the comment above, and shows that the statistics have the power to see it.
CREDIT_FLAT = """\
t = param(0.3)
w = param(torch.zeros(len(x)))
b ~ Bernoulli(logits=t + w[:, None] + x[:, None] + torch.tensor([0.0, 0.5]))
cost (b.sum(1) - 0.9)**2
"""


@pytest.mark.parametrize("est, low", [("rloo", 20.0), ("score", 150.0)])
def test_joint_credit_without_plate_grows_with_n(est, low):
    """Predicted at N = 32: rloo ~50x (1.5 / 0.030), score ~400x; measured 49x / 408x (own),
    64x / 404x (global). Asserted: more than 20x / 150x, far from the plate's [1/1.5, 1.5]."""
    var = {}
    for n in (1, 32):
        res = sn.Story(CREDIT_FLAT).run(
            samples=4, runs=4000, estimator=est, seed=21, namespace={"x": torch.zeros(n, dtype=F64)}, dtype="float64"
        )
        var[n] = ((n * res.grads["w"][:, 0]).var().item(), (math.sqrt(n) * res.grads["t"]).var().item())
    assert var[32][0] / var[1][0] > low and var[32][1] / var[1][1] > low, var


# =============================================================== 5. stacking and errors

STACK = """\
m = param(torch.tensor([0.5, -1.0, 2.0]))
for x_i, m_i in plate(x{opts}):
    h = torch.stack([x_i * m_i, x_i + m_i])
cost (h * k).sum() + m.sum() * (10 * h.shape[0] + h.shape[1])
"""


def test_stacked_name_shape_and_order():
    """h, defined in the plate with shape (2,) per datapoint, is (N, 2) after it, row i for
    datapoint i: d/dm_i = k[i,0] x_i + k[i,1] + (10 N + 2). With batch=2 it is (2, 2)."""
    x = torch.tensor([1.5, -2.0, 0.5], dtype=F64)
    k = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]], dtype=F64)
    story = sn.Story(STACK.format(opts=", m"))
    ex = story.exact(namespace={"x": x, "k": k}, dtype="float64")
    torch.testing.assert_close(ex.grads["m"], k[:, 0] * x + k[:, 1] + 32, rtol=0, atol=1e-12)
    # batch=2 (k reduced to the rows of the drawn datapoints is not available in a story, so
    # use a k of 2 rows): the stacked h has 2 rows, h.shape[0] = 2
    k2 = torch.ones(2, 2, dtype=F64)
    res = sn.Story(STACK.format(opts=", m, batch=2")).run(
        samples=2, runs=200, seed=0, namespace={"x": x, "k": k2}, dtype="float64"
    )
    g = res.grads["m"]
    drawn = g != 22  # undrawn datapoints get only the (10 * 2 + 2) term
    assert bool((drawn.sum(1) == 2).all())
    torch.testing.assert_close(g[drawn].view(-1, 2), (x + 1 + 22).expand(200, 3)[drawn].view(-1, 2))


STACK_SITE = """\
t = param(torch.tensor([0.3, -0.2, 0.5]))
for x_i, t_i in plate(x, t):
    b ~ Bernoulli(logits=t_i + x_i)
    h = torch.stack([b * x_i, b + x_i])
cost (h * k).sum()
"""
FLAT_STACK_SITE = """\
t = param(torch.tensor([0.3, -0.2, 0.5]))
b ~ Bernoulli(logits=t + x)
h = torch.stack([b * x, b + x], 1)
cost (h * k).sum()
"""


def test_stacked_site_name_against_story_without_plate():
    """A stacked name that depends on a plated site, read by `cost (h * k).sum()` outside the
    plate: the estimate matches exact() of the story written without the plate."""
    x = torch.tensor([1.5, -2.0, 0.5], dtype=F64)
    k = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]], dtype=F64)
    ns = {"x": x, "k": k}
    truth = sn.Story(FLAT_STACK_SITE).exact(namespace=ns, dtype="float64")
    torch.testing.assert_close(truth.grads["t"], dsig(torch.tensor([0.3, -0.2, 0.5]) + x) * (k[:, 0] * x + k[:, 1]))
    res = sn.Story(STACK_SITE).run(samples=4, runs=2000, estimator="rloo", seed=1, namespace=ns, dtype="float64")
    check_unbiased(res, truth.grads, "stacked site name")


def test_datapoint_name_after_block_is_name_error():
    story = sn.Story("t = param(0.1)\nfor x_i in plate(x):\n    b ~ Bernoulli(logits=t + x_i)\n    cost b\ncost x_i\n")
    for _ in range(2):  # the same error each time (nothing cached from the failed run)
        with pytest.raises(sn.StoryNameError) as info:
            story.run(samples=4, seed=0, namespace={"x": XR})
        assert info.value.lineno == 5 and info.value.hint and "x_i" in info.value.message


GOOD = """\
t = param(0.1)
for x_i, y_i in plate(x, y{opts}):
    b ~ Bernoulli(logits=t + x_i)
    cost (b - y_i)**2
"""
Y = torch.tensor([0.2, 0.9, 0.4], dtype=F64)


@pytest.mark.parametrize(
    "opts, ns, needle",
    [
        ("", {"x": torch.tensor(1.0), "y": torch.tensor(0.5)}, "scalar"),
        ("", {"x": XR, "y": torch.zeros(4)}, "differ"),
        (", batch=B", {"x": XR, "y": Y, "B": 5}, "more than"),
        (", batch=B", {"x": XR, "y": Y, "B": 0}, "positive int"),
        (", batch=B", {"x": XR, "y": Y, "B": 2.5}, "positive int"),
    ],
    ids=["scalar", "lengths", "batch>N", "batch=0", "batch=2.5"],
)
def test_bad_plate_input_then_good(opts, ns, needle):
    """A bad plate input is a StoryError on the plate's line with a hint; the same Story object
    then runs with good input and gives exactly what a fresh Story gives (nothing lost)."""
    story = sn.Story(GOOD.format(opts=opts))
    with pytest.raises(sn.StoryError, match=needle) as info:
        story.run(samples=4, seed=0, namespace=ns, estimator="rloo", dtype="float64")
    assert info.value.lineno == 2 and info.value.hint
    good = {"x": XR, "y": Y, "B": 2}
    after = story.run(samples=4, runs=5, seed=7, namespace=good, estimator="rloo", dtype="float64")
    fresh = sn.Story(GOOD.format(opts=opts)).run(
        samples=4, runs=5, seed=7, namespace=good, estimator="rloo", dtype="float64"
    )
    torch.testing.assert_close(after.grads["t"], fresh.grads["t"], rtol=0, atol=0)
    assert torch.equal(XR, torch.tensor([0.5, -1.0, 0.2], dtype=F64))  # the namespace is untouched


@pytest.mark.parametrize(
    "opts, needle", [(", batch=0", "positive int"), (", batch=2.5", "positive int"), (", batch=4", "more than")]
)
def test_bad_literal_batch(opts, needle):
    story = sn.Story(GOOD.format(opts=opts))
    with pytest.raises(sn.StoryError, match=needle) as info:
        story.run(samples=4, seed=0, namespace={"x": XR, "y": Y})
    assert info.value.lineno == 2 and info.value.hint


def test_plate_inside_range_loop():
    text = "t = param(0.1)\nfor i in range(3):\n    for x_i in plate(x):\n        b ~ Bernoulli(logits=t + x_i)\n        cost b\n"
    with pytest.raises(sn.StoryError) as info:
        sn.Story(text)
    assert info.value.lineno == 3 and info.value.hint


def test_param_inside_plate():
    story = sn.Story(
        "t = param(0.1)\nfor x_i in plate(x):\n    u = param(0.0)\n    b ~ Bernoulli(logits=t + x_i + u)\n    cost b\n"
    )
    with pytest.raises(sn.StoryError, match="param") as info:
        story.run(samples=4, seed=0, namespace={"x": XR})
    assert info.value.lineno == 3 and info.value.hint
    # a second call raises the same error (nothing half-built is left on the story), and the
    # story with the param declared before the plate runs: d/du = mean_i sigmoid'(t + x_i)
    with pytest.raises(sn.StoryError, match="param"):
        story.run(samples=4, seed=0, namespace={"x": XR})
    ok = sn.Story(
        "t = param(0.1)\nu = param(0.0)\nfor x_i in plate(x):\n    b ~ Bernoulli(logits=t + x_i + u)\n    cost b\n"
    )
    ex = ok.exact(namespace={"x": XR}, dtype="float64")
    torch.testing.assert_close(ex.grads["u"], dsig(0.1 + XR).mean(), rtol=0, atol=1e-12)


# ========================================= 6. continuous and integer sites inside a plate

def test_lax_inside_plate_closed_form():
    """LAX on a Normal site in a plate, cost (z - x_i)^2 per datapoint:
    d/dm mean_i E (z_i - x_i)^2 = 2 (m - mean(x)) for z_i ~ N(m, 1)."""
    x = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=F64)
    story = sn.Story("m = param(0.2)\nfor x_i in plate(x):\n    z ~ Normal(m, 1) using lax\n    cost (z - x_i)**2\n")
    res = story.run(samples=8, runs=4000, seed=0, namespace={"x": x}, dtype="float64")
    truth = 2 * (0.2 - x.mean())
    assert_within(res.mean_grads()["m"], truth, res.stderr["m"], atol=1e-9, what="lax in a plate")


def test_go_on_binomial_inside_plate_against_exact():
    """GO on a Binomial site per datapoint (finite support: exact() enumerates it)."""
    x = torch.tensor([0.3, -0.4, 1.1], dtype=F64)
    text = ("t = param(0.1)\nfor x_i in plate(x):\n    k ~ Binomial(4, logits=t + x_i) using {est}\n"
            "    cost (k - 2.0 - x_i)**2\n")
    truth = sn.Story(text.format(est="enumerate")).exact(namespace={"x": x}, dtype="float64").grads["t"]
    res = sn.Story(text.format(est="go")).run(samples=16, runs=3000, seed=0, namespace={"x": x}, dtype="float64")
    assert_within(res.mean_grads()["t"], truth, res.stderr["t"], atol=1e-9, what="go in a plate")


@pytest.mark.parametrize("zest", ["disarm", "relax", "indecater", "score_wor(k=3)"])
def test_baseline_upstream_of_a_plated_site_with_a_plate_after_it(zest):
    """A score site (rloo baseline) upstream of a plated global site, then a plate whose
    costs read both: the baseline is taken on the plated site's cost estimate over every
    dim made after the score site (variants and datapoints), so the score site stays
    unbiased whatever the variants' weights (score_wor's depend on its draw)."""
    x = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    cat = zest.startswith("score_wor")
    v_dist = "Categorical(logits=W + g)" if cat else "Bernoulli(logits=W[0] + g)"
    text = ("t = param(0.2)\nW = param(torch.tensor([0.1, -0.3, 0.4]))\ng ~ Bernoulli(logits=t) using {g}\n"
            f"v ~ {v_dist} using {{v}}\nfor x_i in plate(x):\n    z ~ Bernoulli(logits=x_i + v) using {{g}}\n"
            "    cost (z - x_i + g * v)**2\n")
    truth = sn.Story(text.format(g="enumerate", v="enumerate")).exact(namespace={"x": x}, dtype="float64").grads
    res = sn.Story(text.format(g="rloo", v=zest)).run(samples=8, runs=4000, seed=0, namespace={"x": x},
                                                       dtype="float64")
    assert_within(res.mean_grads()["t"], truth["t"], res.stderr["t"], atol=1e-9, what=f"d/dt with {zest}")
    if cat:
        assert_within(res.mean_grads()["W"], truth["W"], res.stderr["W"], atol=1e-9, what=f"d/dW with {zest}")
