"""The story language: graph, loops, costs, the namespace, modules, and the
"written for one draw" semantics. Numbers are checked against closed forms or
hand-written torch (exact sums over finite supports); Monte Carlo checks use 4 SE.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import SEED_STORY, assert_within, seed_truth, variance_se
from torch import nn

import storch_nb as sn

# ------------------------------------------------------------------ graph


def test_seed_story_graph():
    story = sn.Story(SEED_STORY)
    for graph in (story.graph, (story.run(samples=4, seed=0), story.graph)[1]):  # before and after a run
        kinds = {n.name: n.kind for n in graph.nodes}
        assert kinds == {
            "a": "param",
            "b": "param",
            "c": "param",
            "d": "deterministic",
            "e": "stochastic",
            "f": "deterministic",
            "cost": "cost",
        }
        lines = {n.name: n.line for n in graph.nodes}
        assert lines == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6, "cost": 7}
        assert set(graph.edges) == {
            ("a", "d"),
            ("b", "d"),
            ("b", "e"),
            ("c", "e"),
            ("d", "f"),
            ("e", "f"),
            ("f", "cost"),
        }
        assert len(graph.edges) == 7  # no duplicates
        assert all(isinstance(n, sn.Node) for n in graph.nodes)


def test_graph_inputs_and_namespace_params():
    w = torch.tensor(0.5, requires_grad=True)
    k = torch.tensor(2.0)
    story = sn.Story("x ~ Normal(w, 1)\ny = k * x\ncost y\n")
    story.run(samples=4, seed=0, namespace={"w": w, "k": k})
    kinds = {n.name: n.kind for n in story.graph.nodes}
    assert kinds["w"] == "param" and kinds["k"] == "input"
    assert kinds["x"] == "stochastic" and kinds["y"] == "deterministic" and kinds["cost"] == "cost"
    assert ("w", "x") in story.graph.edges and ("k", "y") in story.graph.edges


# ------------------------------------------------------------------ loops

LOOP = """\
w = param(0.3)
s = 0.0
for t in range(3):
    a ~ Bernoulli(logits=w + s)
    s = s + a
cost (s - 1.5)**2
"""


def _loop_truth():
    """Sum over the 8 paths by hand: a_t ~ Bernoulli(sigmoid(w + s_{t-1})), s the running count."""
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    e = 0
    for bits in itertools.product([0, 1], repeat=3):
        s, p = 0.0, 1
        for a in bits:
            q = torch.sigmoid(w + s)
            p = p * (q if a else 1 - q)
            s += a
        e = e + p * (s - 1.5) ** 2
    return e.item(), torch.autograd.grad(e, w)[0].item()


def test_loop_exact_and_node_names():
    cost, grad = _loop_truth()
    story = sn.Story(LOOP)
    ex = story.exact()
    assert ex.cost == pytest.approx(cost, abs=1e-6)
    assert ex.grads["w"].item() == pytest.approx(grad, abs=1e-6)
    assert set(ex.estimators) == {"a[0]", "a[1]", "a[2]"}
    sites = [n for n in story.graph.nodes if n.kind == "stochastic"]
    assert [n.name for n in sites] == ["a[0]", "a[1]", "a[2]"]
    assert all(n.line == 4 for n in sites)
    # each step depends on the one before it
    assert ("s[0]", "a[1]") in story.graph.edges and ("s[1]", "a[2]") in story.graph.edges


@pytest.mark.parametrize("estimator", ["score", "rloo"])
def test_loop_estimators_unbiased(estimator):
    _, grad = _loop_truth()
    res = sn.Story(LOOP).run(samples=16, runs=2000, estimator=estimator, seed=3)
    assert res.estimators == {f"a[{i}]": estimator for i in range(3)}
    assert_within(res.mean_grads()["w"], grad, res.stderr["w"], what=estimator)


def test_loop_bound_from_namespace_and_costs_inside():
    """K from the namespace; a cost inside the loop is a new cost each time (summed)."""
    story = sn.Story("m = param(0.5)\nfor i in range(K):\n    x ~ Normal(m * i, 1)\n    cost x**2\n")
    res = story.run(samples=10, seed=0, namespace={"K": 4}, estimator="pathwise", stderr=True)
    # E = sum_i (m^2 i^2 + 1); d/dm = 2 m sum i^2 = 14 for K = 4
    assert_within(res.grads["m"], 14.0, res.stderr["m"], atol=1e-5)
    costs = [n.name for n in story.graph.nodes if n.kind == "cost"]
    assert len(costs) == 4
    res = sn.Story("m = param(0.5)\nfor i in range(K):\n    x ~ Normal(m * i, 1)\n    cost x**2\n").run(
        samples=4000, seed=1, namespace={"K": 4}, estimator="pathwise", stderr=True
    )
    assert_within(res.grads["m"], 14.0, res.stderr["m"])


# ------------------------------------------------------------------ costs


def test_several_costs_are_summed_and_cost_call_form():
    """cost f and cost(g): E = E[f] + E[g]; with g = c^2 the derivative adds 2c."""
    text = SEED_STORY + "cost(c**2)\n"
    res = sn.Story(text).run(samples=20_000, estimator="pathwise", seed=0, stderr=True)
    truth = seed_truth()
    assert_within(res.grads["c"], truth["c"] + 2 * 0.5, res.stderr["c"])
    assert_within(res.grads["a"], truth["a"], res.stderr["a"])
    costs = [n.name for n in sn.Story(text).graph.nodes if n.kind == "cost"]
    assert len(costs) == 2


def test_comments_multiline_and_using_spanning_lines():
    text = """\
# the seed story, written differently
a = param(1.0)   # a learnable leaf
b = param(2.0)
c = param(0.5)
d = (a
     + b)
e ~ Normal(c + b,
           1) using score(
               baseline="rloo")
f = d * e**2
cost f
"""
    story = sn.Story(text)
    res = story.run(samples=20_000, seed=4, stderr=True)
    assert res.estimators == {"e": "score(baseline='rloo')"}
    truth = seed_truth()
    for k in "abc":
        assert_within(res.grads[k], truth[k], res.stderr[k], what=k)
    lines = {n.name: n.line for n in story.graph.nodes}
    assert lines["e"] == 7 and lines["f"] == 10 and lines["cost"] == 11


# --------------------------------------------------------------- namespace


def test_namespace_tensors_and_parameters():
    """A requires_grad tensor and an nn.Parameter are parameters (grads keyed by name);
    a plain tensor is a constant. Checked against exact sums by hand."""
    w = torch.tensor(0.4, requires_grad=True)
    v = nn.Parameter(torch.tensor([0.1, -0.2]))
    k = torch.tensor(2.0)
    ns = {"w": w, "v": v, "k": k}
    story = sn.Story("x ~ Bernoulli(logits=w)\ny ~ Bernoulli(logits=v)\ncost k * x + (y * v).sum()\n")
    ex = story.exact(namespace=ns)
    assert set(ex.grads) == {"w", "v"}
    assert ex.params["w"] is w and ex.params["v"] is v
    sw = torch.sigmoid(w.detach())
    sv = torch.sigmoid(v.detach())
    # E = k sigmoid(w) + sum_i sigmoid(v_i) v_i
    assert ex.grads["w"].item() == pytest.approx((2.0 * sw * (1 - sw)).item(), abs=1e-6)
    torch.testing.assert_close(ex.grads["v"], sv * (1 - sv) * v.detach() + sv, rtol=0, atol=1e-6)
    res = story.run(samples=16, runs=1000, namespace=ns, seed=0)
    assert res.grads["v"].shape == (1000, 2)
    for name in ("w", "v"):
        assert_within(res.mean_grads()[name], ex.grads[name], res.stderr[name], what=name)


def test_story_names_shadow_namespace():
    ns = {"c": torch.tensor(100.0, requires_grad=True), "e": 7.0}
    res = sn.Story(SEED_STORY).run(samples=20_000, estimator="pathwise", seed=2, namespace=ns, stderr=True)
    assert res.params["c"].item() == 0.5
    assert_within(res.grads["c"], 15.0, res.stderr["c"])
    assert ns["c"].grad is None


def test_story_never_writes_namespace():
    w = torch.tensor(0.4, requires_grad=True)
    k = torch.tensor(2.0)
    ns = {"w": w, "k": k, "other": "untouched"}
    before = dict(ns)
    story = sn.Story("a = param(1.0)\nx ~ Bernoulli(logits=w)\nd = a * k\ncost d * x\n")
    story.run(samples=8, seed=0, namespace=ns)
    story.run(samples=8, runs=3, seed=0, namespace=ns)
    story.exact(namespace=ns)
    story.compare(["score"], samples=4, runs=5, namespace=ns)
    assert ns == before and all(ns[key] is before[key] for key in ns)
    assert w.item() == pytest.approx(0.4) and k.item() == 2.0
    assert w.grad is None  # run() returns gradients, it does not accumulate .grad


# ----------------------------------------------------------------- modules

LIN_STORY = """\
x ~ Normal(mu, 1)
h = lin(x)
cost (h**2).sum()
"""


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(2, 1)


def test_module_pathwise_closed_form():
    """E[(W x + b)^2] with x ~ N(mu, I): d/dW = 2 (W mu + b) mu + 2 W, d/db = 2 (W mu + b)."""
    lin = _linear()
    mu = torch.tensor([0.5, -1.0])
    ns = {"lin": lin, "mu": mu}
    res = sn.Story(LIN_STORY).run(samples=500, runs=40, estimator="pathwise", seed=1, namespace=ns)
    assert set(res.grads) == {"lin.weight", "lin.bias"}
    assert res.grads["lin.weight"].shape == (40, 1, 2) and res.grads["lin.bias"].shape == (40, 1)
    W, b = lin.weight.detach(), lin.bias.detach()
    m = W @ mu + b
    g = res.mean_grads()
    assert_within(g["lin.weight"], 2 * m * mu + 2 * W, res.stderr["lin.weight"], what="weight")
    assert_within(g["lin.bias"], 2 * m, res.stderr["lin.bias"], what="bias")
    assert lin.weight.grad is None
    one = sn.Story(LIN_STORY).run(samples=100, estimator="pathwise", seed=1, namespace=ns)
    assert one.grads["lin.weight"].shape == (1, 2)
    # stderr=True gives per-sample standard errors for module parameters too
    big = sn.Story(LIN_STORY).run(samples=20_000, estimator="pathwise", seed=2, namespace=ns, stderr=True)
    assert big.stderr is not None and set(big.stderr) == {"lin.weight", "lin.bias"}
    assert_within(big.grads["lin.weight"], 2 * m * mu + 2 * W, big.stderr["lin.weight"], what="weight, stderr")


def test_module_exact_matches_autograd():
    """A module in the distribution's parameters and in the cost, against the hand-written
    exact sum over the 4 outcomes of x, differentiated by torch.autograd."""
    lin = _linear(1)
    q = torch.tensor([0.3, 0.6])
    story = sn.Story("x ~ Bernoulli(probs=q)\ny ~ Bernoulli(logits=lin(x))\ncost (lin(x)**2).sum() + 2 * y.sum()\n")
    ex = story.exact(namespace={"lin": lin, "q": q})
    e = 0
    for bits in itertools.product([0.0, 1.0], repeat=2):
        x = torch.tensor(bits)
        px = torch.where(x == 1, q, 1 - q).prod()
        h = lin(x)
        e = e + px * ((h**2).sum() + 2 * torch.sigmoid(h).sum())
    gw, gb = torch.autograd.grad(e, [lin.weight, lin.bias])
    assert ex.cost == pytest.approx(e.item(), abs=1e-5)
    torch.testing.assert_close(ex.grads["lin.weight"], gw, rtol=0, atol=1e-6)
    torch.testing.assert_close(ex.grads["lin.bias"], gb, rtol=0, atol=1e-6)
    res = story.run(samples=64, runs=60, seed=0, namespace={"lin": lin, "q": q})
    for k in ("lin.weight", "lin.bias"):
        assert_within(res.mean_grads()[k], ex.grads[k], res.stderr[k], what=k)


# ------------------------------------------------------ one-draw semantics

VEC = "m = param(torch.tensor([0.1, 0.2, 0.3]))\nx ~ Normal(m, 1)\ncost {cost}\n"


@pytest.mark.parametrize(
    "cost, grad",
    [
        ("x.sum()**2", [1.2, 1.2, 1.2]),  # E = (sum m)^2 + 3
        ("mean(x)**2", [0.4 / 3] * 3),  # E = (mean m)^2 + 1/3
        ("x[0]**2 + x[2]", [0.2, 0.0, 1.0]),  # E = m0^2 + 1 + m2
        ("sum(x * x) + x.sum()", [1.2, 1.4, 1.6]),  # E = sum (m^2 + 1 + m)
        ("(x.max() - x.min()) * 0 + x @ torch.tensor([1.0, -2.0, 3.0])", [1.0, -2.0, 3.0]),
    ],
)
def test_reductions_act_on_one_draw(cost, grad):
    story = sn.Story(VEC.format(cost=cost))
    res = story.run(samples=20_000, estimator="pathwise", seed=1, stderr=True)
    assert res.grads["m"].shape == (3,)
    assert_within(res.grads["m"], grad, res.stderr["m"], atol=1e-5, what=cost)
    runs = story.run(samples=50, runs=200, estimator="pathwise", seed=1)
    assert runs.grads["m"].shape == (200, 3)
    assert_within(runs.mean_grads()["m"], grad, runs.stderr["m"], atol=1e-5, what=cost)


def test_site_value_has_distribution_shape():
    """Inside the story a draw of Normal(zeros(3), 1) has shape (3,): it has 3 entries."""
    story = sn.Story("m = param(0.0)\nx ~ Normal(torch.zeros(3) + m, 1)\nn = torch.ones_like(x).sum()\ncost n * m\n")
    res = story.run(samples=10, seed=0)
    assert res.grads["m"].item() == pytest.approx(3.0)


def test_indexing_a_parameter():
    story = sn.Story("theta = param(torch.tensor([0.5, -1.0, 2.0]))\nx ~ Normal(theta[1], 1)\ncost x**2 + theta[0]\n")
    res = story.run(samples=20_000, estimator="pathwise", seed=0, stderr=True)
    # E = theta1^2 + 1 + theta0
    assert_within(res.grads["theta"], [1.0, -2.0, 0.0], res.stderr["theta"], atol=1e-5)


MINIBATCH = """\
t = param(torch.tensor([0.3, -0.2, 0.5, 0.0]))
for t_i, y_i in plate(t, y):
    b ~ Bernoulli(logits=t_i)
    cost (b - y_i)**2
"""


def test_minibatch_datapoints_stay_independent():
    """A plate over N datapoints, its cost per datapoint: the objective is the mean over
    datapoints, and datapoint i's sample is scored with datapoint i's cost only, so the
    variance of the S-sample score estimate of d/dt_i is Var_1(i) / (N^2 S) (NOTES.md
    formula per datapoint), not the much larger variance of a summed log-probability.
    (Without the plate, the same shapes are not independence: see test_plates.py.)"""
    t = torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=torch.float64)
    y = torch.tensor([0.45, 0.2, 0.9, 0.499], dtype=torch.float64)
    n, S, R = 4, 8, 20_000
    story = sn.Story(MINIBATCH)
    ns = {"y": y}
    p = torch.sigmoid(t)
    g = p * (1 - p) * (1 - 2 * y)
    ex = story.exact(namespace=ns, dtype="float64")
    torch.testing.assert_close(ex.grads["t"], g / n, rtol=0, atol=1e-7)
    res = story.run(samples=S, runs=R, estimator="score", seed=0, namespace=ns, dtype="float64")
    var1 = p * (1 - y) ** 4 * (1 - p) ** 2 + (1 - p) * y**4 * p**2 - g**2
    est = res.grads["t"]
    for i in range(n):
        assert_within(est[:, i].var(), var1[i] / (n * n * S), variance_se(est[:, i]), what=f"Var datapoint {i}")
    assert_within(res.mean_grads()["t"], g / n, res.stderr["t"], what="mean")


def test_minibatch_pathwise_per_datapoint():
    """Normal site with batch shape (N,), cost (x - y)^2 per datapoint: d/dm_i = 2 (m_i - y_i) / N."""
    y = torch.tensor([1.0, -1.0, 0.5])
    story = sn.Story("m = param(torch.zeros(3))\nx ~ Normal(m, 1)\ncost (x - y)**2\n")
    res = story.run(samples=20_000, estimator="pathwise", seed=0, namespace={"y": y}, stderr=True)
    assert_within(res.grads["m"], 2 * (0 - y) / 3, res.stderr["m"], atol=1e-5)
    assert res.cost == pytest.approx(((y**2).mean() + 1).item(), rel=0.02)  # sd of cost ~ 0.04 / mean 1.75
    assert math.isfinite(res.cost)
