"""Issue 6, item 6: importing storch_nb and loading/unloading the extension
changes no global of torch (or of Python and IPython that a notebook shares).

Each check runs in a fresh interpreter (a subprocess) so that nothing imported
by other tests hides a change: it snapshots torch's globals (default dtype,
RNG state, ``Distribution._validate_args``, grad/anomaly/determinism modes,
threads, print options, default device, matmul precision), the identity of
every attribute of ``torch``, ``torch.Tensor``, ``torch.distributions`` (and
each distribution class), ``torch.nn.functional``, ``torch.autograd`` and
``nn.Module`` (so a monkey-patch such as Storchastic's ``torch.is_tensor`` /
``Tensor.to`` shows), ``warnings.filters`` and ``sys`` hooks -- then imports,
loads, runs cells, unloads, and compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = r"""
import json, sys, types, warnings
import torch
import torch.distributions as D
import torch.nn.functional as F
from torch import nn
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

problems = []

def attr_ids(obj):
    return {k: id(v) for k, v in vars(obj).items()}

def dist_classes():
    return [v for v in vars(D).values() if isinstance(v, type) and issubclass(v, D.Distribution)]

def snapshot():
    snap = {
        "dtype": str(torch.get_default_dtype()),
        "rng": torch.get_rng_state(),
        "validate_args": D.Distribution._validate_args,
        "grad": torch.is_grad_enabled(),
        "inference": torch.is_inference_mode_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
        "print": repr(vars(torch._tensor_str.PRINT_OPTS)),
        "device": str(torch.get_default_device()) if hasattr(torch, "get_default_device") else None,
        "matmul": torch.get_float32_matmul_precision(),
        "is_tensor": id(torch.is_tensor),
        "Tensor.to": id(torch.Tensor.to),
        "warnings": list(warnings.filters),
        "excepthook": id(sys.excepthook),
        "displayhook": id(sys.displayhook),
        "modules": {},
    }
    targets = {"torch": torch, "torch.Tensor": torch.Tensor, "torch.distributions": D,
               "torch.nn.functional": F, "torch.autograd": torch.autograd, "nn.Module": nn.Module,
               "torch.distributions.Distribution": D.Distribution}
    for cls in dist_classes():
        targets["D." + cls.__name__] = cls
    for name, obj in targets.items():
        snap["modules"][name] = attr_ids(obj)
    return snap

def compare(before, after, when):
    for key in ("dtype", "validate_args", "grad", "inference", "anomaly", "deterministic", "threads", "print",
                "device", "matmul", "is_tensor", "Tensor.to", "excepthook", "displayhook"):
        if before[key] != after[key]:
            problems.append(f"{when}: {key} changed: {before[key]!r} -> {after[key]!r}")
    if not torch.equal(before["rng"], after["rng"]):
        problems.append(f"{when}: the global RNG state changed")
    if before["warnings"] != after["warnings"]:
        new = [f for f in after["warnings"] if f not in before["warnings"]]
        problems.append(f"{when}: warnings.filters changed (new: {new[:3]})")
    for name, ids in before["modules"].items():
        now = after["modules"].get(name, {})
        for k, i in ids.items():
            if k in now and now[k] != i and not k.startswith("__"):
                problems.append(f"{when}: {name}.{k} was replaced (monkey-patched)")
            elif k not in now:
                problems.append(f"{when}: {name}.{k} was deleted")
        obj = {"torch": torch, "torch.distributions": D, "torch.nn.functional": F,
               "torch.autograd": torch.autograd}.get(name)
        for k in now.keys() - ids.keys():
            value = getattr(obj, k, None) if obj is not None else None
            if not isinstance(value, types.ModuleType) and not k.startswith("__"):
                problems.append(f"{when}: {name}.{k} was added")

cfg = Config()
cfg.HistoryAccessor.enabled = False
ip = InteractiveShell.instance(config=cfg)
"""

IMPORT_LOAD_UNLOAD = (
    PRELUDE
    + r"""
base = snapshot()
ns_before = set(ip.user_ns)
import storch_nb
compare(base, snapshot(), "import storch_nb")
if "matplotlib" in sys.modules:
    problems.append("import storch_nb imported matplotlib")
ip.run_line_magic("load_ext", "storch_nb")
compare(base, snapshot(), "%load_ext storch_nb")
mm = ip.magics_manager
if "storch" not in mm.magics["cell"] or "storch" not in mm.magics["line"]:
    problems.append("%load_ext did not register %%storch and %storch")
if set(ip.user_ns) != ns_before:
    problems.append(f"%load_ext added names to the namespace: {set(ip.user_ns) - ns_before}")
ip.run_line_magic("unload_ext", "storch_nb")
compare(base, snapshot(), "%unload_ext storch_nb")
if "storch" in mm.magics["cell"]:
    problems.append("%%storch is still registered after %unload_ext")
if "storch" in mm.magics["line"]:
    problems.append("%storch is still registered after %unload_ext")
if "StorchMagics" in mm.registry:
    problems.append("StorchMagics is still in the magics registry after %unload_ext")
if any(type(c).__name__ == "StorchMagics" for c in ip.configurables):
    problems.append("StorchMagics is still in ip.configurables after %unload_ext")
try:
    ip.run_cell_magic("storch", "-n 4", "a = param(1.0)\ncost a\n")
    problems.append("%%storch still runs after %unload_ext")
except Exception:
    pass
ip.run_line_magic("load_ext", "storch_nb")  # loading again works
if "storch" not in mm.magics["cell"]:
    problems.append("%load_ext after %unload_ext did not register %%storch")
ip.run_line_magic("unload_ext", "storch_nb")
if set(ip.user_ns) != ns_before:
    problems.append(f"load/unload changed the namespace: {set(ip.user_ns) ^ ns_before}")
compare(base, snapshot(), "load/unload twice")
print(json.dumps(problems))
"""
)

SEEDED_CELLS = (
    PRELUDE
    + r"""
# torch's own lazy import of torch._dynamo (by torch.optim, on first use) wraps
# torch.manual_seed and adds a sympy warnings filter: not storch_nb's doing, so
# it happens before the baseline
import torch._dynamo  # noqa: F401
import matplotlib
matplotlib.use("Agg")
rc = dict(matplotlib.rcParams)
backend = matplotlib.get_backend()
import storch_nb as sn
ip.run_line_magic("load_ext", "storch_nb")
ip.user_ns["w"] = nn.Parameter(torch.tensor([0.3, -0.2]))
base = snapshot()
STORY = "a = param(1.0)\nb = param(2.0)\nc = param(0.5)\nd = a + b\ne ~ Normal(c + b, 1)\nf = d * e**2\ncost f\n"
BERN = "t = param(0.0)\nb ~ Bernoulli(logits=t + w.sum())\ncost (b - 0.45)**2\n"
if True:
    sn.Story(STORY).run(samples=100, seed=0)
    compare(base, snapshot(), "Story.run(seed=0)")
    sn.Story(STORY).surrogate(samples=100, seed=0)
    compare(base, snapshot(), "Story.surrogate(seed=0)")
    sn.Story(BERN).train(steps=3, samples=8, seed=0, namespace={"w": ip.user_ns["w"]})
    ip.user_ns["w"].data = torch.tensor([0.3, -0.2])
    ip.user_ns["w"].grad = None
    compare(base, snapshot(), "Story.train(seed=0)")
    sn.Story(STORY).run(samples=100, seed=0, compile=True)  # Inductor's options scoped to the compile
    compare(base, snapshot(), "Story.run(seed=0, compile=True)")
    for line, cell in [("-n 100 --seed 0", STORY), ("-n 16 --seed 0 --exact", BERN), ("-n 8 -r 4 --seed 0", STORY),
                       ("-n 8 -r 3 --seed 0 --compare score,rloo", BERN), ("-n 8 --seed 0 --graph", STORY),
                       ("-n 8 -r 3 --seed 0 --plot", BERN)]:
        with capture_output():
            ip.run_cell_magic("storch", line, cell)
        compare(base, snapshot(), f"%%storch {line}")
if dict(matplotlib.rcParams) != rc:
    changed = [k for k in rc if matplotlib.rcParams[k] != rc[k]]
    problems.append(f"a cell changed matplotlib.rcParams: {changed[:5]}")
if matplotlib.get_backend() != backend:
    problems.append(f"a cell changed the matplotlib backend to {matplotlib.get_backend()}")
import matplotlib.pyplot as plt
if plt.get_fignums():
    problems.append(f"cells left pyplot figures open: {plt.get_fignums()}")
ip.run_line_magic("unload_ext", "storch_nb")
print(json.dumps(problems))
"""
)


def _run(script: str) -> list[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MPLBACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_load_unload_change_nothing_global():
    problems = _run(IMPORT_LOAD_UNLOAD)
    assert problems == [], "\n".join(problems)


def test_seeded_runs_and_cells_change_nothing_global():
    """Seeded runs (API and every kind of cell) leave the RNG and every other global as they were."""
    problems = _run(SEEDED_CELLS)
    assert problems == [], "\n".join(problems)


def test_control_changes_are_caught():
    """The snapshot does see a Storchastic-style patch and changed globals (so the tests above can fail)."""
    change = (
        "torch.is_tensor = lambda x: True\nD.Distribution._validate_args = False\n"
        "torch.set_default_dtype(torch.float64)\ntorch.rand(1)\nwarnings.simplefilter('ignore')\n"
    )
    problems = _run(IMPORT_LOAD_UNLOAD.replace("import storch_nb\n", "import storch_nb\n" + change, 1))
    for what in ("is_tensor", "validate_args", "dtype", "RNG", "warnings.filters"):
        assert any(what in p for p in problems), (what, problems)
