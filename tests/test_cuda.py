"""CUDA checks: skipped cleanly on machines without a GPU (CI has none).

Where a GPU is at hand they check that stories run there end to end and give
the right numbers: CPU and GPU estimates agree statistically (both are unbiased
estimates of the same closed form, so their difference is within 4 combined
standard errors), every registered estimator's mean gradient over runs is within
4 standard errors of the exact value, exact enumeration on the GPU equals the
CPU's to rounding, chunked runs, training, seeded runs and float64 work there.

Statistics as in test_estimator_library.py: ``runs=R`` gives R independent
estimates, whose mean has standard error std/sqrt(R); a correct estimator fails
one 4-SE check with probability ~6e-5 (Gaussian tail), and every test has a
fixed seed, so the suite is deterministic on a given GPU and torch build. The
stories, closed forms and oracles are those of test_estimator_library.py and
conftest.py, imported, not copied.

The module imports nothing beyond torch, numpy and the test helpers (no
IPython), so ``python -m pytest tests/test_cuda.py`` runs on a bare GPU machine
with ``PYTHONPATH`` set to the checkout.

The last tests put CPU tensors and GPU runs together (a tensor made inside the
story, a namespace constant, estimator state left by a CPU run, a CPU namespace
parameter trained on the GPU); they are last so that ``-x`` stops on them only
after everything else ran.
"""

import math

import pytest
import test_estimator_library as lib
import torch
from conftest import SEED_STORY, assert_within, bernoulli_text, bernoulli_truth
from torch.distributions import Bernoulli, Categorical, Gamma, Normal, Poisson

import storch_nb as sn
from storch_nb.estimators.base import make_estimator

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TRUE = {"a": 7.25, "b": 22.25, "c": 15.0}

DEV = "cuda"


def _rng() -> tuple[torch.Tensor, torch.Tensor]:
    """The states of torch's CPU generator and of the current CUDA device's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state()


def _same_rng(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


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


# ------------------------------------------------ every estimator, every family
#
# One story per distribution family, each with an oracle computed without
# storch_nb on the GPU: (story text, a distribution of the site's family for
# the fits check, exact gradients).
T0, P0 = 0.3, 0.45  # the Bernoulli toy b ~ Bernoulli(logits=0.3), cost (b - 0.45)**2
FAMILIES = {
    "bernoulli": (bernoulli_text(T0, P0), Bernoulli(logits=torch.tensor(T0)), {"t": bernoulli_truth(T0, P0)["grad"]}),
    # k ~ Categorical(logits=theta), 5 outcomes, cost (k - 2)**2: the hand-written sum over the support
    "categorical": (lib.TEXTS["cat"], Categorical(logits=torch.tensor(lib.THETA)), None),
    # x ~ N(mu, s), cost x^2: dE/dmu = 2 mu, dE/ds = 2 s
    "normal": (lib.CLOSED["normal"][0], Normal(torch.tensor(0.5), torch.tensor(1.2)), lib.CLOSED["normal"][1]),
    # x ~ Gamma(alpha, 1), cost x^2: dE/dalpha = 2 alpha + 1
    "gamma": (lib.CLOSED["gamma"][0], Gamma(torch.tensor(1.5), torch.tensor(1.0)), lib.CLOSED["gamma"][1]),
    # k ~ Poisson(rate), cost k^2: dE/drate = 1 + 2 rate
    "poisson": (lib.CLOSED["poisson"][0], Poisson(torch.tensor(2.0)), lib.CLOSED["poisson"][1]),
}
#: every registered name (aliases too) and the score function's other baselines
SPECS = sorted(lib.REGISTERED) + [
    "score(baseline='moving_average')",
    "score(baseline='rloo')",
    "score(baseline='batch_average')",
]
SAMPLES, RUNS = 8, 2000
#: float32 (the default dtype) rounding of a zero-variance estimate (enumerate) at these
#: magnitudes (|grad| <= 5) is ~1e-6 at most; any real bias of a GPU kernel is far larger
ATOL32 = 2e-6


def _fits(spec: str, dist) -> bool:
    est = make_estimator(spec)
    return est is None or est.fits(dist) is None  # None: auto, which fits every site


#: biased estimators without a closed-form expectation here (their bias is measured on the
#: CPU: tests/test_straight_through.py); the GPU check below compares means with the truth
NO_REFERENCE = {"reinmax", "gumbel_rao"}

GPU_CASES = [
    pytest.param(family, spec, id=f"{family}-{spec}")
    for family, (_, dist, _) in FAMILIES.items()
    for spec in SPECS
    if _fits(spec, dist) and spec.split("(")[0] not in NO_REFERENCE
]


def _expected(family: str, spec: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(expected mean gradient, its own standard error) for ``spec`` on ``family``.

    Unbiased estimators: the exact gradient. ``batch_average`` is biased by exactly
    (1 - 1/S) (test_estimator_library.py). The relaxations (gumbel, st_gumbel)
    against their own expectation: quadrature on the Bernoulli toy, a hand-written
    Gumbel-softmax (1e5 draws, with its standard error) on the Categorical."""
    name = spec.split("(")[0]
    zero = {}
    if family == "categorical":
        truth = lib.closed_grad("cat")
    else:
        truth = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in FAMILIES[family][2].items()}
    if name in lib.RELAXATIONS:
        temperature = make_estimator(spec).opts["temperature"]
        if family == "bernoulli":
            return {"t": torch.tensor(lib.relaxed_toy(temperature, T0, P0)[name], dtype=torch.float64)}, zero
        mean, se = lib.relaxed_categorical(temperature, straight=name == "st_gumbel")
        return {"theta": mean}, {"theta": se}
    if "batch_average" in spec:
        return {k: (1 - 1 / SAMPLES) * v for k, v in truth.items()}, zero
    return truth, zero


@cuda
@pytest.mark.parametrize(("family", "spec"), GPU_CASES)
def test_cuda_every_estimator_unbiased(family, spec):
    """Every registered estimator that fits the site, on the GPU in float32, runs=2000
    of 8 samples: gradients on the GPU, finite, and their mean within 4 SE (the
    spread over runs / sqrt(runs), combined with the oracle's own SE where it has one)
    of the exact value. Stateful estimators (moving average, REBAR/RELAX/LAX with
    their trained control variates) are checked on the first call and again on the
    second, after their state has moved on the GPU. Power: on the first call the SE
    must be under 10% of the largest |exact| entry (0.3-6% measured on the CPU), so
    a 40% bias is caught; after one control-variate step REBAR's estimates can be
    heavy-tailed (relative SE ~3 on the CPU as well), which leaves its second check weak."""
    text = FAMILIES[family][0]
    want, want_se = _expected(family, spec)
    story = sn.Story(text)
    calls = 2 if any(s in spec for s in lib.STATEFUL) else 1
    for i in range(calls):
        res = story.run(samples=SAMPLES, runs=RUNS, estimator=spec, seed=101 + i, device=DEV)
        assert res.device.startswith(DEV)
        for name, truth in want.items():
            g = res.grads[name]
            assert g.device.type == DEV and g.dtype == torch.float32
            assert g.shape == (RUNS, *truth.shape)
            assert torch.isfinite(g).all(), f"{spec}: non-finite gradients"
            g = g.double().cpu()
            se = g.std(0) / math.sqrt(RUNS)
            if name in want_se:
                se = torch.sqrt(se**2 + want_se[name] ** 2)
            if i == 0:
                assert (se <= 0.1 * truth.abs().max()).all(), f"{spec}: too noisy to test, SE {se.tolist()}"
            assert_within(g.mean(0), truth, se, atol=ATOL32, what=f"cuda {family} {spec} d/d{name}, call {i + 1}")


# ----------------------------------------------------------------- exact()


@cuda
@pytest.mark.parametrize("story", [s for s in lib.TEXTS if s != "onehot"])
def test_cuda_exact_equals_cpu_exact(story):
    """exact() on the GPU in float64 equals the CPU's exact() (itself checked against
    the hand-written closed form in test_estimator_library.py) to 1e-12, gradients
    and cost: the sum over the joint support is deterministic, so only rounding
    differs. In float32 the GPU agrees with the CPU to float32 rounding. (The
    ``onehot`` story makes a tensor inside the story: it is checked at the end.)"""
    cpu = lib.exact(story)
    gpu = sn.Story(lib.TEXTS[story]).exact(device=DEV, dtype="float64")
    assert gpu.device.startswith(DEV)
    assert set(gpu.grads) == set(cpu.grads)
    for name, g in gpu.grads.items():
        assert g.device.type == DEV and g.dtype == torch.float64
        torch.testing.assert_close(g.cpu(), cpu.grads[name], rtol=0, atol=1e-12)
    assert gpu.cost == pytest.approx(cpu.cost, abs=1e-12)
    g32 = sn.Story(lib.TEXTS[story]).exact(device=DEV)
    for name, g in g32.grads.items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.cpu().double(), cpu.grads[name], rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize("story", ["toy045", "cat", "nested"])
def test_cuda_enumerate_surrogate_hessian_is_exact(story):
    """story.surrogate(estimator='enumerate', device='cuda') differentiated twice is the
    exact Hessian (the hand-written closed form, 1e-10, float64): the second-order
    path of the engine works on the GPU too."""
    names = list(lib.initial(story))
    obj = sn.Story(lib.TEXTS[story])
    loss = obj.surrogate(samples=1, estimator="enumerate", seed=0, device=DEV, dtype="float64")
    assert loss.device.type == DEV
    params = [obj.params[n] for n in names]
    assert all(p.device.type == DEV for p in params)
    flat = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    rows = []
    for i in range(flat.numel()):
        hs = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1) for h, p in zip(hs, params)]))
    torch.testing.assert_close(torch.stack(rows).cpu(), lib.closed_hessian(story), rtol=0, atol=1e-10)


# --------------------------------------------------------------------- train

TOY = bernoulli_text(0.0, 0.499)


@cuda
def test_cuda_train_moves_the_parameter_down_and_keeps_it_on_the_gpu():
    """The Bernoulli toy at p0 = 0.499 (tests/test_train.py): the cost is affine in b,
    f(b) = p0^2 + (1 - 2 p0) b, so rloo's estimate is (1 - 2 p0) S/(S-1) times the
    sample variance of the b_i: never negative. Adam therefore never moves t up: the
    trace falls at every step (strictly, since Adam's first moment stays positive),
    and t ends well below 0. The story's parameter and the history live on the GPU;
    seeded training restores both generators and is reproducible."""
    story = sn.Story(TOY)
    before = _rng()
    h1 = story.train(steps=60, lr=0.1, estimator="rloo", optimizer="adam", samples=20, seed=0, device=DEV)
    assert _same_rng(_rng(), before)
    assert h1.steps == 60 and len(h1.cost) == 60 and all(math.isfinite(c) for c in h1.cost)
    trace = h1.trace["t"]
    assert trace[0] == 0.0
    assert all(b < a for a, b in zip(trace, trace[1:])), trace
    t = h1.params["t"].item()
    assert t < trace[-1] < -1.0, (t, trace[-5:])
    assert story.params["t"].device.type == DEV and h1.params["t"].device.type == DEV
    assert story.params["t"].item() == t  # trained in place
    story.reset()
    h2 = story.train(steps=60, lr=0.1, estimator="rloo", optimizer="adam", samples=20, seed=0, device=DEV)
    assert h2.cost == h1.cost and h2.params["t"].item() == t


# ------------------------------------------------------------------- chunked


@cuda
def test_cuda_chunked_run_is_the_same_estimator(monkeypatch):
    """200,000 samples under max_memory = 1 MB run in chunks on the GPU: the engine
    really split the run (spied), the chunked estimate is within 4 SE of the closed
    form, its standard error is that of 200,000 samples (pathwise dE/dc per sample is
    2 d e, sd 2 * 3 * 1 = 6, so SE = 6 / sqrt(2e5) = 0.0134; the estimated SE is
    within 5% of it: its own relative error is ~sqrt(2 / 2e5)), and it is seeded:
    reproducible, with both generators restored. runs=50 x 4,000 samples chunked:
    shape (50,), mean within 4 SE (49 degrees of freedom: P(|t| > 4) ~ 2e-4)."""
    chunks = []
    real = sn.Story._run_chunked

    def spy(self, chunk, samples, *args, **kwargs):
        chunks.append((chunk, samples))
        return real(self, chunk, samples, *args, **kwargs)

    monkeypatch.setattr(sn.Story, "_run_chunked", spy)
    story = sn.Story(SEED_STORY)
    before = _rng()
    res = story.run(samples=200_000, estimator="pathwise", seed=1, stderr=True, max_memory=1_000_000, device=DEV)
    assert _same_rng(_rng(), before)
    assert chunks and chunks[0][0] < 200_000, chunks
    assert res.samples == 200_000 and res.device.startswith(DEV)
    for name, true in TRUE.items():
        assert res.grads[name].device.type == DEV
        assert_within(res.grads[name], true, res.stderr[name], what=f"chunked cuda d/d{name}")
    assert res.stderr["c"].item() == pytest.approx(6 / math.sqrt(200_000), rel=0.05)
    again = story.run(samples=200_000, estimator="pathwise", seed=1, stderr=True, max_memory=1_000_000, device=DEV)
    for name in TRUE:
        assert torch.equal(again.grads[name], res.grads[name])
    chunks.clear()
    runs = story.run(samples=4000, runs=50, estimator="score", seed=2, max_memory=1_000_000, device=DEV)
    assert chunks and chunks[0][0] < 4000, chunks
    for name, true in TRUE.items():
        g = runs.grads[name]
        assert g.shape == (50,) and g.device.type == DEV
        g = g.double().cpu()
        assert_within(g.mean(), true, g.std() / math.sqrt(50), what=f"chunked cuda runs d/d{name}")


# ------------------------------------------------------------------- seeding

RNG_CASES = [
    ("normal", "pathwise"),
    ("bernoulli", "rloo"),
    ("bernoulli", "disarm"),  # torch.rand in the estimator
    ("bernoulli", "relax"),  # torch.rand twice, learned control variates
    ("bernoulli", "gumbel"),
    ("normal", "measure_valued"),  # Weibull, randint, Chi2, rand
    ("categorical", "unordered_set"),  # exponential_ (Gumbel-top-k)
    ("poisson", "go"),
]


@cuda
@pytest.mark.parametrize(("family", "spec"), [c for c in RNG_CASES if c[1] in lib.REGISTERED])
def test_cuda_seeded_runs_restore_the_generators_and_repeat(family, spec):
    """seed=5 on the GPU: both generators are as they were afterwards, a fresh story
    with the same seed gives bit-identical gradients, another seed different ones.
    seed=None: the draws come from the GPU's generator (it moved) and never from the
    CPU's (it did not: a torch.rand without device= would draw there)."""
    text = FAMILIES[family][0]

    def grads(seed):
        res = sn.Story(text).run(samples=SAMPLES, runs=64, estimator=spec, seed=seed, device=DEV)
        return {k: v.clone() for k, v in res.grads.items()}

    before = _rng()
    g1 = grads(5)
    assert _same_rng(_rng(), before)
    g2 = grads(5)
    g3 = grads(6)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name
    assert any(not torch.equal(g1[n], g3[n]) for n in g1)
    cpu_state, gpu_state = _rng()
    grads(None)
    cpu_after, gpu_after = _rng()
    assert torch.equal(cpu_after, cpu_state), "a seed=None GPU run drew from the CPU generator"
    assert not torch.equal(gpu_after, gpu_state), "a seed=None GPU run did not draw from the GPU generator"


# ------------------------------------------------------------------- float64


@cuda
def test_cuda_float64():
    """dtype=torch.float64 on the GPU: gradients, parameters and the result in float64
    on the GPU; pathwise on the seed story within 4 SE of the closed form; enumerate on
    the Bernoulli toy equals the closed form to 1e-12 in every run (float32 would be
    off by ~1e-9 here: |grad| = 0.024 times float32's 6e-8)."""
    story = sn.Story(SEED_STORY)
    res = story.run(samples=200_000, estimator="pathwise", seed=4, stderr=True, device=DEV, dtype=torch.float64)
    assert res.dtype == torch.float64
    for name, true in TRUE.items():
        g = res.grads[name]
        assert g.device.type == DEV and g.dtype == torch.float64
        assert story.params[name].dtype == torch.float64 and story.params[name].device.type == DEV
        assert_within(g, true, res.stderr[name], what=f"float64 cuda d/d{name}")
    toy = sn.Story(bernoulli_text(T0, P0))
    ex = toy.run(samples=4, runs=3, estimator="enumerate", seed=0, device=DEV, dtype=torch.float64)
    g = ex.grads["t"]
    assert g.dtype == torch.float64 and g.device.type == DEV
    torch.testing.assert_close(g.cpu(), torch.full((3,), bernoulli_truth(T0, P0)["grad"], dtype=torch.float64),
                               rtol=0, atol=1e-12)  # fmt: skip
    assert ex.cost == pytest.approx(bernoulli_truth(T0, P0)["cost"], abs=1e-12)


# ------------------------------------------- CPU state and tensors used on the GPU
#
# The tests below put CPU tensors and GPU runs together the way a user would: a
# tensor made inside the story, a namespace constant, estimator state left by a CPU
# run, a namespace parameter trained on the GPU. They come last because -x stops at
# the first failure and reading storch_nb suggests they may fail: tensors made in the
# story and namespace constants are not moved to the run's device, estimator state
# (moving averages, control variates) is not keyed by device, and train() gives a
# CPU leaf the gradient of its GPU copy.


@cuda
def test_cuda_tensor_made_inside_the_story():
    """The ``onehot`` story computes its cost as ``(k * torch.arange(5.0)).sum()``:
    the story makes a tensor (on torch's default device) and multiplies it with the
    site's value. exact() on the GPU must still equal the CPU's to 1e-12."""
    cpu = lib.exact("onehot")
    gpu = sn.Story(lib.TEXTS["onehot"]).exact(device=DEV, dtype="float64")
    torch.testing.assert_close(gpu.grads["theta"].cpu(), cpu.grads["theta"], rtol=0, atol=1e-12)
    assert gpu.cost == pytest.approx(cpu.cost, abs=1e-12)


@cuda
def test_cuda_cpu_namespace_constant():
    """docs/story_language.md's minibatch example on the GPU: ``y`` is a CPU tensor in
    the namespace, ``x ~ Normal(m, 1)``, ``cost (x - y)**2`` (averaged over the 3
    entries), so dE/dm = 2 (m - y) / 3 = [-2/3, 2/3, -1/3] at m = 0; pathwise with
    100,000 samples within 4 SE. ``y`` is left as it was, on the CPU."""
    y = torch.tensor([1.0, -1.0, 0.5])
    story = sn.Story("m = param(torch.zeros(3))\nx ~ Normal(m, 1)\ncost (x - y)**2\n")
    res = story.run(samples=100_000, estimator="pathwise", seed=0, stderr=True, device=DEV, namespace={"y": y})
    assert res.grads["m"].device.type == DEV
    assert_within(res.grads["m"], -2 * y / 3, res.stderr["m"], what="cpu namespace constant on cuda")
    assert y.device.type == "cpu" and torch.equal(y, torch.tensor([1.0, -1.0, 0.5]))


@cuda
@pytest.mark.parametrize("spec", ["score(baseline='moving_average')", "relax", "lax"])
def test_cuda_after_cpu_on_the_same_story(spec):
    """A story run on the CPU and then, with the same estimator, on the GPU (as a user
    comparing the two does; the first test of this module does it for stateless
    estimators): the estimator state it keeps (moving average, control variates)
    must not stay behind on the CPU; the GPU run's mean is within 4 SE of exact."""
    family = "normal" if spec == "lax" else "bernoulli"
    text = FAMILIES[family][0]
    want, _ = _expected(family, spec)
    story = sn.Story(text)
    story.run(samples=SAMPLES, runs=RUNS, estimator=spec, seed=7, device="cpu")
    res = story.run(samples=SAMPLES, runs=RUNS, estimator=spec, seed=8, device=DEV)
    for name, truth in want.items():
        g = res.grads[name]
        assert g.device.type == DEV
        g = g.double().cpu()
        assert_within(g.mean(0), truth, g.std(0) / math.sqrt(RUNS), atol=ATOL32, what=f"cpu then cuda {spec}")


@cuda
def test_cuda_train_keeps_a_cpu_namespace_tensor_on_the_cpu():
    """A namespace leaf on the CPU trained with device='cuda': the run uses a GPU copy,
    the update lands on the original tensor, which stays on the CPU (with a CPU
    .grad) and moves down (same argument as the train test above: rloo on an
    affine cost never points the wrong way)."""
    w = torch.tensor(0.0, requires_grad=True)
    story = sn.Story("b ~ Bernoulli(logits=w)\ncost (b - 0.499)**2\n")
    hist = story.train(steps=20, lr=0.1, estimator="rloo", samples=20, seed=0, device=DEV, namespace={"w": w})
    assert w.device.type == "cpu"
    assert w.grad is None or w.grad.device.type == "cpu"
    assert hist.steps == 20
    assert w.item() < -1.0, w.item()
    assert hist.params["w"].item() == w.item()


@cuda
def test_cuda_nonfinite_gradient_and_cost_are_reported():
    """On the GPU the cost and the gradients' finiteness come back in one read;
    a NaN gradient or cost is still reported with the parameter or line."""
    with pytest.raises(sn.StoryError) as info:
        sn.Story("a = param(0.0)\ne ~ Normal(a, 1)\ncost sqrt(a*a) + e").run(samples=16, seed=0, device="cuda")
    assert "gradient with respect to a" in info.value.message
    with pytest.raises(sn.StoryError) as info:
        sn.Story("a = param(-1.0)\ne ~ Normal(0, 1)\nf = log(a) * e\ncost f").run(samples=16, runs=4, seed=0,
                                                                                   device="cuda")
    assert info.value.lineno == 3
    res = sn.Story("a = param(1.0)\ne ~ Normal(a, 1)\ncost e**2").run(samples=4000, runs=3, seed=0, device="cuda")
    assert res.grads["a"].isfinite().all() and math.isfinite(res.cost_stderr)
