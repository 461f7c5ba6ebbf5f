"""Devices and dtypes on the CPU: the code paths that tests/test_cuda.py's last tests
take on a GPU, exercised here without one.

* Tensors a story makes (``torch.arange(5.0)``) are made on the run's device: with
  torch's default device set to ``meta`` (a device without data, which fails any
  read) a CPU run still gives the CPU numbers, bit for bit.
* Namespace constants are put on the run's device by ``execute`` (a copy made again
  after an in-place change; on the CPU the user's tensor itself, no copy).
* Estimator state (moving averages, REBAR/RELAX/LAX control variates) starts afresh
  when the device or the dtype changes: here float32 -> float64 -> float32 on one
  Story gives exactly what a fresh Story gives.
* Namespace parameters are used in the run's dtype (and on its device) through a
  differentiable copy; ``train`` puts the gradient on the tensor's own device and
  dtype; ``backward()`` reaches the user's tensor.
* The story's own parameters are kept across runs on a device named without its
  index (``cpu:0`` against the CPU tensors' ``cpu``, as ``cuda`` against ``cuda:0``).
* ``nn.Module``s elsewhere than the run's device are refused with a clear error.
* ``mean([...])`` in a story keeps gradients, dtype and device; the finiteness check
  reads all gradients at once off the CPU.

Numbers are checked against closed forms (exact to 1e-12 in float64, or within 4
standard errors) or for exact equality with a reference run.
"""

import contextlib
import math

import pytest
import test_estimator_library as lib
import torch
from conftest import SEED_STORY, assert_within, bernoulli_text, bernoulli_truth
from torch import nn

import storch_nb as sn
from storch_nb.engine import devices
from storch_nb.engine.diagnose import all_finite
from storch_nb.engine.execute import place_constants

F64 = torch.float64


@contextlib.contextmanager
def default_device_meta():
    """torch's default device set to ``meta`` for the block, then put back."""
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None if before.type == "cpu" else before)
    assert torch.get_default_device() == before


# ------------------------------------------------- tensors made inside the story


def test_tensor_made_inside_the_story_is_made_on_the_run_device():
    """The ``onehot`` story's cost ``((k * torch.arange(5.0)).sum() - 2)**2`` makes a
    tensor on torch's default device. With that set to ``meta`` a CPU run must still
    make it on the CPU: exact() equals the CPU's exact() to the bit (and that equals
    the hand-written sum over the support to 1e-12), and a seeded sampled run equals
    the same run on a default torch, bit for bit. The default device is left as it was."""
    want = lib.closed_grad("onehot")["theta"]
    cpu = sn.Story(lib.TEXTS["onehot"]).exact(dtype="float64")
    torch.testing.assert_close(cpu.grads["theta"], want, rtol=0, atol=1e-12)
    ref = sn.Story(lib.TEXTS["onehot"]).run(samples=50, runs=4, estimator="score", seed=0, dtype="float64")
    with default_device_meta():
        ex = sn.Story(lib.TEXTS["onehot"]).exact(dtype="float64")
        res = sn.Story(lib.TEXTS["onehot"]).run(samples=50, runs=4, estimator="score", seed=0, dtype="float64")
        assert torch.get_default_device().type == "meta"  # the run changed nothing global
    assert ex.grads["theta"].device.type == "cpu"
    assert torch.equal(ex.grads["theta"], cpu.grads["theta"]) and ex.cost == cpu.cost
    assert res.grads["theta"].device.type == "cpu"
    assert torch.equal(res.grads["theta"], ref.grads["theta"])


def test_param_initial_value_made_on_the_run_device():
    """``param(torch.zeros(3))`` with torch's default device ``meta``: the initial value
    is made on the run's device (the CPU), and the run is right: x ~ N(m, 1) with
    cost sum((x - 1)^2) has dE/dm = 2 (m - 1) = -2 per entry, which pathwise gives
    exactly here (x - 1 = m - 1 + eps and the pathwise gradient is 2 (x - 1), whose
    mean over samples is -2 + 2 mean(eps)): within 4 SE of -2."""
    text = "m = param(torch.zeros(3))\nx ~ Normal(m, 1)\ncost ((x - 1)**2).sum()\n"
    with default_device_meta():
        story = sn.Story(text)
        res = story.run(samples=20_000, estimator="pathwise", seed=0, stderr=True)
    assert story.params["m"].device.type == "cpu"
    assert_within(res.grads["m"], torch.full((3,), -2.0), res.stderr["m"], what="param made under meta")


# ------------------------------------------------------------ namespace constants


def test_namespace_constant_on_the_cpu_is_the_users_tensor():
    """docs/story_language.md's minibatch example: ``y`` (float32) in the namespace,
    x ~ N(m, 1), cost (x - y)^2 averaged over 3 entries, so dE/dm = 2 (m - y) / 3 at
    m = 0 is -2 y / 3; in a float64 run, pathwise within 4 SE. On the CPU the plan
    reads the user's tensor itself (no copy), and ``y`` is left as it was."""
    y = torch.tensor([1.0, -1.0, 0.5])
    story = sn.Story("m = param(torch.zeros(3))\nx ~ Normal(m, 1)\ncost (x - y)**2\n")
    res = story.run(samples=100_000, estimator="pathwise", seed=0, stderr=True, namespace={"y": y}, dtype="float64")
    assert res.grads["m"].dtype == F64
    assert_within(res.grads["m"], -2 * y.double() / 3, res.stderr["m"], what="namespace constant")
    plan = story._runner.last_plan
    assert plan.constants == {"y": y} and plan.globals["y"] is y and not plan.placed
    assert y.dtype == torch.float32 and torch.equal(y, torch.tensor([1.0, -1.0, 0.5]))


def test_namespace_constants_are_copied_to_another_device_and_refreshed():
    """place_constants on a plan for another device (``meta`` here, as ``cuda`` on a
    GPU): the story reads a copy there, of the same shape and dtype; the same copy
    while the tensor is unchanged; a new one after an in-place change; the user's
    tensor itself again on its own device. The user's tensor is never moved."""
    y = torch.tensor([1.0, -1.0, 0.5])
    story = sn.Story("m = param(torch.zeros(3))\nx ~ Normal(m, 1)\ncost (x - y)**2\n")
    story.run(samples=4, estimator="pathwise", seed=0, namespace={"y": y})
    plan = story._runner.last_plan
    meta = torch.device("meta")
    place_constants(plan, meta)
    first = plan.globals["y"]
    assert first is not y and first.device.type == "meta" and first.shape == y.shape and first.dtype == y.dtype
    place_constants(plan, meta)
    assert plan.globals["y"] is first  # unchanged: no new copy
    y.mul_(2.0)
    place_constants(plan, meta)
    assert plan.globals["y"] is not first and plan.globals["y"].device.type == "meta"
    place_constants(plan, torch.device("cpu"))
    assert plan.globals["y"] is y and y.device.type == "cpu"
    assert torch.equal(y, torch.tensor([2.0, -2.0, 1.0]))


# ------------------------------------------------------------- estimator state

# initial values exact in float32, so that a parameter carried from a float32 run
# into a float64 one has the value a fresh float64 Story gives it
STATEFUL = [
    ("score(baseline='moving_average')", bernoulli_text(0.25, 0.45)),
    ("relax", bernoulli_text(0.25, 0.45)),
    ("rebar", bernoulli_text(0.25, 0.45)),
    ("lax", "mu = param(0.5)\ns = param(1.25)\nx ~ Normal(mu, s)\ncost x**2\n"),
]


def _state_tensors(state: dict):
    """The state's tensors in the run's dtype; REBAR/RELAX's least-squares statistics
    ``H`` and ``b`` are float64 on the CPU whatever the run (a k x k system)."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _state_tensors(value)
        elif isinstance(value, torch.Tensor):
            if key in ("H", "b"):
                assert value.dtype == torch.float64 and value.device.type == "cpu"
                continue
            yield value


@pytest.mark.parametrize(("spec", "text"), STATEFUL, ids=[s for s, _ in STATEFUL])
def test_estimator_state_starts_afresh_when_the_dtype_changes(spec, text):
    """A Story run twice in float32 (its state moves: the second run differs from a
    fresh Story's with the same seed), then in float64, then in float32 again: each
    change of dtype starts the state afresh (as a change of device does), so those
    runs equal a fresh Story's with the same seed exactly, and the state then holds
    tensors of the new dtype only."""
    kw = {"samples": 8, "runs": 64, "estimator": spec}
    used = sn.Story(text)
    used.run(seed=1, **kw)
    moved = used.run(seed=2, **kw)
    fresh = sn.Story(text).run(seed=2, **kw)
    assert any(not torch.equal(moved.grads[n], fresh.grads[n]) for n in fresh.grads), "the state never moved"
    for seed, dtype in ((3, F64), (4, torch.float32)):
        got = used.run(seed=seed, dtype=dtype, **kw)
        want = sn.Story(text).run(seed=seed, dtype=dtype, **kw)
        for name, g in want.grads.items():
            assert got.grads[name].dtype == dtype
            assert torch.equal(got.grads[name], g), (spec, dtype, name)
        tensors = [t for st in used._runner.state.values() for t in _state_tensors(st) if t.is_floating_point()]
        assert tensors and all(t.dtype == dtype for t in tensors), (spec, {t.dtype for t in tensors})


# ---------------------------------------------------------- namespace parameters


def test_namespace_parameter_in_the_run_dtype():
    """w = 0.25 (float32, exact) in a float64 exact(): the gradient is float64 and the
    closed form sigmoid'(w) (1 - 2 p0) to 1e-12 (float32 arithmetic would be off by
    ~1e-9); a float64 surrogate's backward() reaches the user's float32 tensor with
    that gradient rounded to float32. A float64 tensor in a float32 run gets float32
    gradients. The user's tensors keep their dtype."""
    truth = bernoulli_truth(0.25, 0.45)
    text = "b ~ Bernoulli(logits=w)\ncost (b - 0.45)**2\n"
    w = torch.tensor(0.25, requires_grad=True)
    res = sn.Story(text).exact(dtype="float64", namespace={"w": w})
    assert res.grads["w"].dtype == F64
    assert res.grads["w"].item() == pytest.approx(truth["grad"], abs=1e-12)
    assert res.cost == pytest.approx(truth["cost"], abs=1e-12)
    loss = sn.Story(text).surrogate(samples=1, estimator="enumerate", seed=0, namespace={"w": w}, dtype="float64")
    assert loss.dtype == F64
    loss.backward()
    assert w.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert w.grad.item() == torch.tensor(truth["grad"], dtype=F64).float().item()
    w64 = torch.tensor(0.25, dtype=F64, requires_grad=True)
    r32 = sn.Story(text).exact(namespace={"w": w64})
    assert r32.grads["w"].dtype == torch.float32 and w64.dtype == F64
    assert r32.grads["w"].item() == pytest.approx(truth["grad"], abs=1e-7)


def test_train_puts_the_gradient_on_the_tensors_own_dtype():
    """A float64 namespace leaf trained by a float32 run: the run uses a float32 copy,
    the update lands on the user's tensor, which stays float64 with a float64 .grad.
    rloo on the affine Bernoulli toy (p0 = 0.499) never points the wrong way (its
    estimate is (1 - 2 p0) S/(S - 1) times the sample variance of the b_i), so
    Adam moves w down at every step (as in test_cuda.py's CPU-leaf training test)."""
    w = torch.tensor(0.0, dtype=F64, requires_grad=True)
    story = sn.Story("b ~ Bernoulli(logits=w)\ncost (b - 0.499)**2\n")
    hist = story.train(steps=20, lr=0.1, estimator="rloo", samples=20, seed=0, namespace={"w": w})
    assert w.dtype == F64 and w.grad is not None and w.grad.dtype == F64
    trace = hist.trace["w"]
    assert trace[0] == 0.0 and all(b < a for a, b in zip(trace, trace[1:])), trace
    assert hist.steps == 20 and w.item() < -1.0, w.item()
    assert hist.params["w"].item() == w.item()


def test_story_parameters_kept_on_a_device_named_without_its_index():
    """device='cpu:0' (as 'cuda' against tensors on 'cuda:0'): the story's parameter is
    one tensor across runs, so training moves it: Adam with rloo on the p0 = 0.499
    toy moves t down at every step, and story.params holds the trained value."""
    story = sn.Story(bernoulli_text(0.0, 0.499))
    story.run(samples=4, seed=0, device="cpu:0")
    first = story.params["t"]
    story.run(samples=4, seed=1, device="cpu:0")
    assert story.params["t"] is first
    hist = story.train(steps=20, lr=0.1, estimator="rloo", samples=20, seed=0, device="cpu:0")
    trace = hist.trace["t"]
    assert all(b < a for a, b in zip(trace, trace[1:])), trace
    assert story.params["t"] is first and first.item() == hist.params["t"].item() < -1.0


# -------------------------------------------------------------------- modules


@pytest.mark.parametrize("call", ["run", "runs", "stderr", "surrogate", "exact"])
def test_module_on_another_device_is_refused(call):
    """A module whose weights are elsewhere than the run's device (``meta`` here, the
    CPU under a cuda run on a GPU) is refused with an error that says how to move
    it, on every path; the module is not moved."""
    net = nn.Linear(1, 1, device="meta")
    story = sn.Story("b ~ Bernoulli(logits=0.3)\ncost net(b.reshape(1)).sum()**2\n")
    ns = {"net": net}
    with pytest.raises(sn.StoryError) as info:
        if call == "run":
            story.run(samples=4, seed=0, namespace=ns)
        elif call == "runs":
            story.run(samples=4, runs=3, seed=0, namespace=ns)
        elif call == "stderr":
            story.run(samples=40, stderr=True, seed=0, namespace=ns)
        elif call == "surrogate":
            story.surrogate(samples=4, seed=0, namespace=ns)
        else:
            story.exact(namespace=ns)
    assert "module `net`" in info.value.message and "meta" in info.value.message
    assert "net.to('cpu')" in info.value.hint
    assert net.weight.device.type == "meta"


def test_module_on_the_run_device_runs():
    """The same story with the module on the CPU: exact() is the closed form. With
    weight 1 and bias 0.5 the cost is (b + 0.5)^2, E = p (1.5^2 - 0.5^2) + 0.25, so
    dE/dweight = E[2 (b + 0.5) b] = 3 p and dE/dbias = E[2 (b + 0.5)] = 2 p + 1."""
    net = nn.Linear(1, 1)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(0.5)
    p = 1 / (1 + math.exp(-0.3))
    res = sn.Story("b ~ Bernoulli(logits=0.3)\ncost net(b.reshape(1)).sum()**2\n").exact(namespace={"net": net})
    assert res.grads["net.weight"].item() == pytest.approx(3 * p, abs=1e-6)
    assert res.grads["net.bias"].item() == pytest.approx(2 * p + 1, abs=1e-6)


# ---------------------------------------------------------------- mean([...])


def test_mean_of_a_list_keeps_gradients():
    """``mean([x, b])`` of story values: the mean of the items, differentiable. x ~ N(a, 1):
    E[((x + b)/2)^2] = ((a + b)/2)^2 + 1/4, so dE/da = dE/db = (a + b)/2 = 1.5 (pathwise
    within 4 SE; the old helper gave 0). Under vmap too (enumerate on a Bernoulli):
    E[mean([c, t])] = (sigmoid(t) + t)/2, so dE/dt = (s (1 - s) + 1)/2 exactly, in float64."""
    story = sn.Story("a = param(1.0)\nb = param(2.0)\nx ~ Normal(a, 1)\ncost mean([x, b])**2\n")
    res = story.run(samples=100_000, estimator="pathwise", seed=0, stderr=True)
    for name in "ab":
        assert_within(res.grads[name], 1.5, res.stderr[name], what=f"mean([x, b]) d/d{name}")
    ex = sn.Story("t = param(0.3)\nc ~ Bernoulli(logits=t)\ncost mean([c, t])\n").exact(dtype="float64")
    s = 1 / (1 + math.exp(-0.3))
    assert ex.grads["t"].dtype == F64
    assert ex.grads["t"].item() == pytest.approx((s * (1 - s) + 1) / 2, abs=1e-12)
    assert ex.cost == pytest.approx((s + 0.3) / 2, abs=1e-12)
    assert sn.Story(SEED_STORY).run(samples=4, seed=0).cost == sn.Story(SEED_STORY).run(samples=4, seed=0).cost


# ---------------------------------------------------------------- finiteness


def test_all_finite_one_read_for_every_tensor():
    """all_finite (the finiteness check off the CPU) on CPU tensors: mixed dtypes and
    shapes, a NaN or an infinity anywhere is found, integer tensors are ignored."""
    ok = [torch.tensor(1.0), torch.ones(3, dtype=F64), torch.zeros(2, 2), torch.arange(3)]
    assert all_finite(ok)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(4)
        t[2] = bad
        assert not all_finite([*ok, t])
        assert not all_finite([t.double(), torch.tensor(0.0)])


def test_nonfinite_gradient_still_reported():
    """The check still finds a NaN gradient and names the line: sqrt at 0."""
    story = sn.Story("t = param(0.0)\nx ~ Normal(t, 1)\ncost sqrt(t * t) + x\n")
    with pytest.raises(sn.StoryError, match="NaN or infinite"):
        story.run(samples=4, seed=0, estimator="pathwise")


# ------------------------------------------------------------------- devices


def test_same_device_fills_in_the_current_index(monkeypatch):
    """``cuda`` is the current CUDA device: the same as ``cuda:0`` where that is
    current (torch.device equality says they differ), not ``cuda:1``."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    d = torch.device
    assert d("cuda") != d("cuda:0")
    assert devices.same_device(d("cuda"), d("cuda:0")) and devices.same_device(d("cuda:0"), d("cuda"))
    assert not devices.same_device(d("cuda"), d("cuda:1"))
    assert devices.same_device(d("cpu"), d("cpu:0")) and not devices.same_device(d("cpu"), d("cuda:0"))
    assert not devices.same_device(None, d("cpu")) and devices.same_device(None, None)


def test_on_device_is_free_on_a_default_cpu_torch():
    """No device context (no overhead) for a CPU run on a default torch; under another
    default device a context that makes tensors on the run's device."""
    assert isinstance(devices.on_device(torch.device("cpu")), contextlib.nullcontext)
    with default_device_meta():
        with devices.on_device(torch.device("cpu")):
            assert torch.arange(3).device.type == "cpu"
        assert torch.arange(3).device.type == "meta"
