"""Issue 6, item 7: 1,000 ``%%storch`` cells in a row in one shell, with no
memory growth beyond a stated bound (no graph, figure or tensor leak).

The cells run in a fresh interpreter (a subprocess, so other tests' leftovers
do not blur the numbers) in one ``InteractiveShell``, the way a kernel runs
them. They cycle through 50 small variants of the seed story and the Bernoulli
toy (samples=10) with the everyday options -- plain, ``-r 4``, ``--exact``,
``--out res``, ``--graph`` every 100th cell -- and a failing cell (a story
error) every 50th. 50 variants is more than the magic's story cache (32
stories), so the caches evict and refill all the time.

Measured between cell 100 (after the warm-up: imports, first plans, caches
filled) and cell 1000, after ``gc.collect()``:

* live ``torch.Tensor`` objects, live matplotlib ``Figure`` objects, pyplot's
  open figures, ``len(ip.user_ns)``: no growth at all. This is the sharpest
  detector: keeping one ``Result`` per cell alive adds ~6,000 tensors.
* Python heap (tracemalloc, current traced size): bound 1 MiB. Measured:
  +0.05 MiB. Keeping one ``Result`` per cell alive shows as +1.4 MiB.
* RSS (/proc/self/statm): bound 20 MiB, a coarse net for leaks outside the
  Python heap (torch's allocator); it also holds glibc arenas, which keep freed
  pages, so it moves by a few MiB between runs. Measured: +4 to +5 MiB (up to
  +9 MiB in exploratory runs); keeping one ``Result`` per cell alive: +11 MiB.

The loop takes about 8 s on a 2-core machine (with tracemalloc on).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CELLS = 1000
FIRST = 100
TRACED_BOUND = 1 * 2**20
RSS_BOUND = 20 * 2**20

SCRIPT = r"""
import gc, json, os, sys, time, tracemalloc, warnings
warnings.simplefilter("ignore")
import torch
import matplotlib
matplotlib.use("Agg")
from matplotlib.figure import Figure
import matplotlib.pyplot as plt
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config
import storch_nb as sn

CELLS, FIRST = int(sys.argv[1]), int(sys.argv[2])
cfg = Config()
cfg.HistoryAccessor.enabled = False
ip = InteractiveShell.instance(config=cfg)
ip.run_line_magic("load_ext", "storch_nb")

SEED = "a = param(1.0)\nb = param(2.0)\nc = param({c})\nd = a + b\ne ~ Normal(c + b, 1)\nf = d * e**2\ncost f\n"
BERN = "t = param({c})\nb ~ Bernoulli(logits=t)\ncost (b - 0.45)**2\n"
BAD = "a = param(1.0)\ncost a * nope\n"
VARIANTS = [(SEED if k % 2 else BERN).format(c=round(0.1 + 0.02 * k, 2)) for k in range(50)]

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def count(cls):
    return sum(1 for o in gc.get_objects() if isinstance(o, cls))

def measure():
    gc.collect()
    return {"traced": tracemalloc.get_traced_memory()[0], "rss": rss(), "tensors": count(torch.Tensor),
            "figures": count(Figure), "pyplot": len(plt.get_fignums()), "ns": len(ip.user_ns)}

tracemalloc.start()
marks = {}
errors = 0
t0 = time.perf_counter()
for i in range(1, CELLS + 1):
    cell = VARIANTS[i % len(VARIANTS)]
    bern = cell.startswith("t =")
    line = "-n 10"
    if i % 100 == 0:
        line += " --graph"
    elif i % 7 == 0:
        line += " -r 4"
    elif bern and i % 3 == 0:
        line += " --exact"
    if i % 10 == 1:
        line += " --out res"
    if i % 50 == 25:
        cell = BAD
    with capture_output() as cap:
        try:
            ip.run_cell_magic("storch", line, cell)
        except sn.StoryError:
            errors += 1
    if cell is not BAD:
        assert cap.outputs, (i, line)
    del cap
    if i == FIRST:
        marks["first"] = measure()
marks["last"] = measure()
marks["seconds"] = time.perf_counter() - t0
marks["errors"] = errors
print(json.dumps(marks))
"""


def test_thousand_cells_do_not_grow_memory():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MPLBACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(CELLS), str(FIRST)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    marks = json.loads(proc.stdout.strip().splitlines()[-1])
    first, last = marks["first"], marks["last"]
    traced = last["traced"] - first["traced"]
    rss = last["rss"] - first["rss"]
    report = (
        f"{CELLS} cells in {marks['seconds']:.1f} s ({marks['errors']} failing on purpose); "
        f"cell {FIRST} -> {CELLS}: traced {traced / 2**20:+.2f} MiB, RSS {rss / 2**20:+.2f} MiB, "
        f"tensors {first['tensors']} -> {last['tensors']}, figures {first['figures']} -> {last['figures']}, "
        f"pyplot {first['pyplot']} -> {last['pyplot']}, user_ns {first['ns']} -> {last['ns']}"
    )
    print(report)
    assert marks["errors"] == CELLS // 50
    assert traced < TRACED_BOUND, report
    assert rss < RSS_BOUND, report
    assert last["tensors"] <= first["tensors"], report
    assert last["figures"] <= first["figures"], report
    assert last["pyplot"] == first["pyplot"] == 0, report
    assert last["ns"] == first["ns"], report
