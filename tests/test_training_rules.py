"""Training and control-variate rules of the plates issue: minibatch training from
``plate(..., batch=B)``, an optimizer instance whose state carries over, distribution
arguments checked on every pass (an error names the training step), and learned
control variates fitted wherever their estimator runs (``surrogate``, ``compare``,
``runs > 1``, stories that call ``nn.Module``s)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import storch_nb as sn

COIN = "t = param(0.3)\nb ~ Bernoulli(logits=t)\ncost (b - 0.45)**2\n"


def _lin(story: sn.Story, site: str = "b", est: str = "relax") -> torch.Tensor:
    return story._runner.state[(site, "estimator", est)]["cv"]["lin"].detach().clone()


def test_optimizer_instance_state_carries_over():
    """Two calls of train with one Adam: its step count goes on (50 then 100), and the
    second call continues from the first's moments instead of a fresh optimizer."""
    story = sn.Story("m = param(0.0)\nx ~ Normal(m, 1)\ncost (x - 2.0)**2\n")
    story.run(samples=2)  # creates the story's parameter
    opt = torch.optim.Adam(story.parameters(), lr=0.05)
    h1 = story.train(steps=50, optimizer=opt, samples=16, seed=0)
    state = opt.state[story.params["m"]]
    assert int(state["step"]) == 50 and h1.optimizer == "adam"
    moment = state["exp_avg"].clone()
    story.train(steps=50, optimizer=opt, samples=16, seed=1)
    assert int(state["step"]) == 100
    assert not torch.equal(state["exp_avg"], moment)
    # 100 Adam steps of 0.05 from 0 towards 2 (gradient 2 (m - 2)): m moves by about 100 * 0.05
    assert 1.5 < story.params["m"].item() < 2.5


def test_optimizer_instance_gets_missing_tensors_as_a_group():
    w = torch.zeros(2, requires_grad=True)
    story = sn.Story("m = param(0.0)\nx ~ Normal(m + w, 1)\ncost ((x - 1.0)**2).sum()\n")
    opt = torch.optim.SGD([w], lr=0.1)
    story.train(steps=5, optimizer=opt, samples=8, seed=0, namespace={"w": w})
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(w) in held and id(story.params["m"]) in held and len(opt.param_groups) == 2


def test_minibatch_training_from_a_plate():
    """Each step draws B of the N datapoints: with y = [0, ..., 9] and B = 2, the fitted
    mean approaches mean(y) = 4.5 although no step ever sees all of them."""
    y = torch.arange(10.0)
    story = sn.Story("m = param(0.0)\nfor y_i in plate(y, batch=2):\n    x ~ Normal(m, 1)\n    cost (x - y_i)**2\n")
    hist = story.train(steps=600, lr=0.05, samples=8, seed=0, namespace={"y": y})
    assert hist.steps == 600
    assert abs(story.params["m"].item() - 4.5) < 0.6


def test_scale_trained_negative_stops_with_the_step_named():
    """Normal(0, s) with a cost that pushes s below zero: the pass that sees a negative
    scale raises a StoryError naming the line, the argument and the training step."""
    story = sn.Story("s = param(0.3)\nx ~ Normal(0, s)\ncost (x - 2)**2 + 3 * s\n")
    with pytest.raises(sn.StoryError) as info:
        story.train(steps=200, lr=0.1, samples=10, seed=0)
    err = info.value
    assert err.lineno == 2 and "scale" in err.message and "positive" in err.message
    assert err.message.startswith("at training step ") and getattr(err, "step", 0) > 1
    assert err.col == err.line.index("s)")


def test_surrogate_fits_the_control_variate_and_stays_differentiable():
    story = sn.Story(COIN)
    loss = story.surrogate(samples=20, estimator="relax", seed=0)
    before = _lin(story)
    loss2 = story.surrogate(samples=20, estimator="relax", seed=1)
    after = _lin(story)
    assert not torch.equal(before, after)  # fitted on the second call's draws too
    loss.backward()  # the first surrogate still backpropagates (its coefficients were copied)
    loss2.backward()
    assert story.params["t"].grad is not None and torch.isfinite(story.params["t"].grad)
    with pytest.raises(sn.EstimatorError):  # and still refuses a second differentiation
        loss3 = story.surrogate(samples=20, estimator="relax", seed=2)
        (g,) = torch.autograd.grad(loss3, story.params["t"], create_graph=True)
        torch.autograd.grad(g, story.params["t"])


def test_surrogate_with_relax_is_unbiased_across_fits():
    """Mean of 400 surrogate gradients (the control variate refitted after each) within
    4 SE of the exact gradient sigmoid'(0.3) (1 - 0.9) = 0.02445."""
    story = sn.Story(COIN)
    story.run(samples=2)
    t = story.params["t"]
    gs = []
    for i in range(400):
        loss = story.surrogate(samples=10, estimator="relax", seed=i, dtype="float32")
        (g,) = torch.autograd.grad(loss, t)
        gs.append(g.item())
    g = torch.tensor(gs, dtype=torch.float64)
    exact = story.exact().grads["t"].item()
    assert abs(g.mean().item() - exact) < 4 * g.std().item() / 20 + 1e-6


def test_compare_measures_the_fitted_control_variate():
    story = sn.Story(COIN)
    fitted = story.compare(["relax"], samples=10, runs=1000, seed=0).row("relax", "t")
    fresh = story.compare(["relax"], samples=10, runs=1000, seed=0, fit_steps=0).row("relax", "t")
    rloo = story.compare(["rloo"], samples=10, runs=1000, seed=0).row("rloo", "t")
    # unfitted RELAX is RLOO in distribution (its own uniforms draw the coin): the ratio of two
    # variance estimates over 1000 runs each has a relative SE of about sqrt(4 / 999) = 6.3%
    assert 1 / 1.25 < fresh["variance"] / rloo["variance"] < 1.25
    assert fitted["variance"] < 0.5 * fresh["variance"]  # measured: about 1/12
    assert abs(fitted["bias"]) < 4 * fitted["std"] / 1000**0.5
    with pytest.raises(sn.StoryError):
        story.compare(["relax"], fit_steps=-1)


def test_runs_and_modules_fit_the_control_variate():
    story = sn.Story(COIN)
    story.run(samples=10, runs=50, estimator="relax", seed=0)
    assert not torch.equal(_lin(story), torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
    torch.manual_seed(0)
    lin = nn.Linear(1, 1)
    mod = sn.Story("b ~ Bernoulli(logits=lin(torch.ones(1)))\ncost ((b - 0.45)**2).sum()\n")
    mod.run(samples=10, runs=5, estimator="relax", seed=0, namespace={"lin": lin})
    assert not torch.equal(_lin(mod), torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
