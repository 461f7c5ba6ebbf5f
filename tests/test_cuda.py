"""CUDA checks: skipped cleanly on machines without a GPU (CI has none).

Where a GPU is at hand they check that a story runs there end to end and that
CPU and GPU estimates agree statistically (both are unbiased estimates of the
same closed form, so their difference is within 4 combined standard errors).
"""

import math

import pytest
import torch
from conftest import SEED_STORY

import storch_nb as sn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TRUE = {"a": 7.25, "b": 22.25, "c": 15.0}


@cuda
@pytest.mark.parametrize("estimator", ["pathwise", "score(baseline='rloo')"])
def test_cuda_matches_cpu_and_closed_form(estimator):
    story = sn.Story(SEED_STORY)
    gpu = story.run(samples=200_000, estimator=estimator, seed=0, device="cuda", stderr=True)
    cpu = story.run(samples=200_000, estimator=estimator, seed=1, device="cpu", stderr=True)
    assert gpu.device.startswith("cuda")
    for name, true in TRUE.items():
        g, c = gpu.grads[name].item(), cpu.grads[name].item()
        sg, sc = gpu.stderr[name].item(), cpu.stderr[name].item()
        assert abs(g - true) < 4 * sg + 1e-4
        assert abs(g - c) < 4 * math.hypot(sg, sc) + 1e-4


@cuda
def test_cuda_runs_vectorized_and_seeded():
    story = sn.Story(SEED_STORY)
    state = torch.cuda.get_rng_state()
    r1 = story.run(samples=100, runs=1000, estimator="pathwise", seed=3, device="cuda")
    r2 = story.run(samples=100, runs=1000, estimator="pathwise", seed=3, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert r1.grads["c"].shape == (1000,)
    assert torch.equal(r1.grads["c"], r2.grads["c"])
    # single-sample-average pathwise variance of dE/dc: Var = 4 d^2 / S = 36/100
    var = r1.grads["c"].double().var().item()
    se = 0.36 * math.sqrt(2 / 999)
    assert abs(var - 0.36) < 4 * se


@cuda
def test_device_auto_picks_cuda():
    story = sn.Story(SEED_STORY)
    res = story.run(samples=10, device="auto", seed=0)
    assert res.device.startswith("cuda")
    assert res.grads["c"].device.type == "cuda"
