"""``compile=True`` (``storch_nb.engine.compiled``): a compiled pass gives the eager
numbers for the same seed (to 1e-5 relative), is reused (no second compilation),
carries estimator state, keeps the eager pass's argument checks, and falls back to
eager execution with one warning where it cannot compile.

Compiling takes seconds on a small CPU, so the stories are shared by the tests of
a module-level fixture and every setting compiles once; nothing here times anything.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import SEED_STORY
from test_plates import NSA, plate_a
from torch import nn

import storch_nb as sn
from storch_nb.engine import compiled

RTOL = 1e-5
RLOO = "score(baseline='rloo')"
BERN = "t = param(0.3)\nb ~ Bernoulli(logits=t)\ncost (b - 0.45)**2\n"


def assert_same(got: sn.Result, want: sn.Result, what: str = "") -> None:
    """Cost and every gradient equal to ``RTOL`` relative (to the gradient's largest entry)."""
    assert got.cost == pytest.approx(want.cost, rel=RTOL), what
    assert set(got.grads) == set(want.grads)
    for k, g in want.grads.items():
        scale = float(g.abs().max()) or 1.0
        err = float((got.grads[k] - g).abs().max()) / scale
        assert err <= RTOL, f"{what} d/d{k}: {err:.2e} relative"


@pytest.fixture(scope="module")
def seed_pair() -> tuple[sn.Story, sn.Story]:
    """The seed story twice: one runs eagerly, the other compiled."""
    return sn.Story(SEED_STORY), sn.Story(SEED_STORY)


@pytest.mark.parametrize("runs", [1, 4])
@pytest.mark.parametrize("estimator", ["pathwise", RLOO])
def test_seed_story_compiled_equals_eager_and_compiles_once(seed_pair, estimator, runs):
    eager, fast = seed_pair
    for i, seed in enumerate((0, 1, 2)):
        want = eager.run(samples=1000, estimator=estimator, seed=seed, runs=runs)
        got = fast.run(samples=1000, estimator=estimator, seed=seed, runs=runs, compile=True)
        assert_same(got, want, f"{estimator} runs={runs} seed={seed}")
        assert want.compile_seconds is None
        if i == 0:
            assert got.compile_seconds > 0
        else:
            assert got.compile_seconds == 0.0  # cached: no second compilation
    assert got.grads["c"].shape == ((runs,) if runs > 1 else ())
    from torch._inductor import config

    assert config.fallback_random is False  # set for each compile only


def test_unseeded_compiled_run_draws_from_the_global_generator(seed_pair):
    eager, fast = seed_pair
    fast.run(samples=1000, estimator="pathwise", seed=0, compile=True)  # compiled (or cached)
    torch.manual_seed(5)
    got = fast.run(samples=1000, estimator="pathwise", compile=True)
    after = torch.rand(1)
    torch.manual_seed(5)
    want = eager.run(samples=1000, estimator="pathwise")
    assert_same(got, want)
    assert torch.equal(torch.rand(1), after)  # both consumed the same random numbers


def test_surrogate_compiled_equals_eager(seed_pair):
    eager, fast = seed_pair
    for story in seed_pair:
        for p in story.parameters():
            p.grad = None
    want = eager.surrogate(samples=1000, estimator=RLOO, seed=3)
    want.backward()
    got = fast.surrogate(samples=1000, estimator=RLOO, seed=3, compile=True)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=RTOL)
    for k in "abc":
        assert fast.params[k].grad.item() == pytest.approx(eager.params[k].grad.item(), rel=RTOL)
    loss = fast.surrogate(samples=1000, estimator=RLOO, seed=4, compile=True)
    with pytest.raises(sn.EstimatorError, match="first derivatives only"):
        torch.autograd.grad(loss, fast.parameters(), create_graph=True)


def test_bernoulli_disarm_and_moving_average_state():
    """DisARM (antithetic uniforms) and a moving-average baseline, whose state the
    compiled pass reads and writes back on every call (float64: float32 sums of a
    thousand 0/1 costs differ by up to ~1e-5 between Inductor's and eager's order)."""
    for estimator in ("disarm", "score(baseline='moving_average')"):
        eager, fast = sn.Story(BERN), sn.Story(BERN)
        for seed in range(4):
            want = eager.run(samples=1000, estimator=estimator, seed=seed, dtype="float64")
            got = fast.run(samples=1000, estimator=estimator, seed=seed, dtype="float64", compile=True)
            assert_same(got, want, f"{estimator} seed={seed}")
    state = fast._runner.state
    assert any("average" in v for v in state.values() if isinstance(v, dict))


def test_plate_story_with_minibatches():
    """A plate with batch=2 (datapoints drawn by randperm), an enumerated global site and
    DisARM inside the plate, a cost outside it; runs=3 and the per-sample path (stderr)."""
    eager, fast = sn.Story(plate_a(batch=2)), sn.Story(plate_a(batch=2))
    est = {"g": "enumerate", "z": "disarm"}
    for seed in range(2):
        want = eager.run(samples=16, runs=3, estimator=est, seed=seed, namespace=NSA)
        got = fast.run(samples=16, runs=3, estimator=est, seed=seed, namespace=NSA, compile=True)
        assert_same(got, want, f"plate seed={seed}")
    want = eager.run(samples=16, estimator="rloo", seed=7, namespace=NSA, stderr=True)
    got = fast.run(samples=16, estimator="rloo", seed=7, namespace=NSA, stderr=True, compile=True)
    assert_same(got, want, "plate stderr")
    for k, se in want.stderr.items():
        torch.testing.assert_close(got.stderr[k], se, rtol=1e-4, atol=1e-6)


def test_train_compiled_equals_eager():
    """20 Adam steps: the same costs and final parameters; a module, a namespace tensor
    with requires_grad and a namespace constant are inputs of the compiled pass."""
    text = "x ~ Normal(w, 1)\nb ~ Bernoulli(logits=w)\ncost (x - 3)**2 + b * (net(torch.ones(1)).sum() - frozen)**2\n"

    def namespace():
        torch.manual_seed(0)
        return {"w": torch.tensor(0.0, requires_grad=True), "net": nn.Linear(1, 1), "frozen": torch.tensor(2.0)}

    ns_e, ns_c = namespace(), namespace()
    want = sn.Story(text).train(steps=20, lr=0.05, estimator="rloo", samples=50, seed=0, namespace=ns_e)
    got = sn.Story(text).train(steps=20, lr=0.05, estimator="rloo", samples=50, seed=0, namespace=ns_c, compile=True)
    assert want.compile_seconds is None and got.compile_seconds > 0
    assert got.steps == want.steps == 20
    assert got.cost == pytest.approx(want.cost, rel=RTOL)
    for k, v in want.params.items():
        torch.testing.assert_close(got.params[k], v, rtol=RTOL, atol=1e-7)
    assert ns_c["w"].item() == pytest.approx(ns_e["w"].item(), rel=RTOL)


def test_a_failed_argument_check_reruns_eagerly_and_reports_it():
    story = sn.Story("s = param(1.0)\ne ~ Normal(0, s)\ncost e**2\n")
    assert story.run(samples=10, seed=0, compile=True).compile_seconds > 0
    with torch.no_grad():
        story.params["s"].fill_(-1.0)  # as training could drive it
    with pytest.raises(sn.StoryError, match="scale` must be positive"):
        story.run(samples=10, seed=0, compile=True)


def test_learned_control_variates_run_eagerly_with_one_warning():
    eager, fast = sn.Story(BERN), sn.Story(BERN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(2):
            want = eager.run(samples=10, estimator="relax", seed=seed)
            got = fast.run(samples=10, estimator="relax", seed=seed, compile=True)
            assert got.compile_seconds is None
            assert_same(got, want)
    mine = [w for w in caught if "compile=True" in str(w.message)]
    assert len(mine) == 1 and "second derivatives" in str(mine[0].message)


@pytest.mark.parametrize("how", ["compiler raises", "dynamo unsupported"])
def test_no_compiler_falls_back_to_eager_with_one_warning(monkeypatch, how):
    """Simulated: the compiling function raises (no C++ compiler), or torch says that
    torch.compile is not supported here. One warning per story, then eager runs."""
    if how == "compiler raises":
        def broken(gm, example_inputs):
            raise RuntimeError("no working C++ compiler found")

        monkeypatch.setattr(compiled, "compile_graph", broken)
    else:
        monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    eager, fast = sn.Story(SEED_STORY), sn.Story(SEED_STORY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            want = eager.run(samples=100, estimator="pathwise", seed=seed)
            got = fast.run(samples=100, estimator="pathwise", seed=seed, compile=True)
            assert got.compile_seconds is None
            assert_same(got, want)
        hist = fast.train(steps=3, samples=10, seed=0, compile=True)
    assert hist.compile_seconds is None and hist.steps == 3
    mine = [w for w in caught if "compile=True" in str(w.message)]
    assert len(mine) == 1 and "not available" in str(mine[0].message)


def test_compile_must_be_a_bool(seed_pair):
    with pytest.raises(sn.StoryError, match="compile must be True or False"):
        seed_pair[0].run(samples=10, compile="yes")
