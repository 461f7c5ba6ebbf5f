"""Latency of the estimator lab: an estimator switch until the new figure exists.

Run from the repository root::

    python benchmarks/bench_lab.py            # 21 switches per estimator pair (about half a minute)
    python benchmarks/bench_lab.py --quick    # a smoke run (a few seconds)
    python benchmarks/bench_lab.py --strict   # exit 1 when the median is over the target

The lab is made in process, as a notebook makes it (``storch_nb.lab(story,
samples=100, runs=200)`` on the seed story ``d = a + b; e ~ Normal(c + b, 1);
f = d * e**2; cost f``), then the estimator dropdown is set
(``lab.controls["estimator"].value = ...``) round-robin over pathwise, score,
rloo and auto. Setting the value runs the whole update synchronously: the
200 runs of 100 samples, the variance-versus-samples points (1, 3, 10, 30
samples x 200 runs), the histogram and variance figure, its PNG (what the
browser receives) and the table. Each switch is timed from the assignment to
its return, after checking that ``lab.figure`` is a new Figure and
``lab.error`` is None. Nothing is cached between switches (the reference
gradient, computed once when the lab is made, aside).

Target: median < 300 ms on the project's 2-core CPU. The script also shows
the time split (runs / figure / PNG) of one switch, the lab's creation time,
and checks, in a fresh interpreter, that ``import storch_nb`` imports neither
matplotlib nor ipywidgets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_engine import SEED_STORY  # noqa: E402  (same folder)

TARGET_MS = 300.0
CYCLE = ("pathwise", "score", "rloo", "auto")


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def import_check() -> tuple[bool, str]:
    code = (
        "import sys, time; t = time.perf_counter(); import storch_nb; dt = time.perf_counter() - t; "
        "bad = sorted(m for m in ('matplotlib', 'ipywidgets', 'matplotlib.pyplot') if m in sys.modules); "
        "print(f'{dt * 1e3:.0f}', ','.join(bad) or '-')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    ms, bad = out.stdout.split()
    return bad == "-", f"import storch_nb: {ms} ms; imports matplotlib or ipywidgets: {'no' if bad == '-' else bad}"


def split_times(lab) -> str:
    """Where one update's time goes (same work as a switch, timed piece by piece)."""
    from storch_nb import experiments, figures

    story, spec = lab.story, lab.estimator_spec()
    t0 = time.perf_counter()
    res = experiments.run_chunked(story, spec, lab.samples, lab.runs, lab.seed)
    curve = experiments.variance_curve(story, spec, lab.samples, lab.runs, lab.seed, known=res)
    t1 = time.perf_counter()
    fig = figures.gradient_figure({spec: res}, [lab.controls["param"].value], lab.reference, {spec: curve})
    t2 = time.perf_counter()
    figures.figure_png(fig)
    t3 = time.perf_counter()
    return f"one update ({spec}): runs {1e3 * (t1 - t0):.0f} ms, figure {1e3 * (t2 - t1):.0f} ms, PNG {1e3 * (t3 - t2):.0f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few switches only")
    ap.add_argument("--strict", action="store_true", help="exit 1 if the median misses the target")
    ap.add_argument("--switches", type=int, default=None, help="switches to time (default 21, --quick 5)")
    args = ap.parse_args()
    n = args.switches or (5 if args.quick else 21)

    ok_import, import_line = import_check()

    import torch

    import storch_nb as sn

    story = sn.Story(SEED_STORY)
    t0 = time.perf_counter()
    lab = sn.lab(story, samples=100, runs=200)
    created = time.perf_counter() - t0
    assert lab.error is None, lab.error
    lab.controls["param"].value = "c"

    # warm-up: one switch to every estimator
    for est in CYCLE:
        lab.controls["estimator"].value = est
    times: dict[str, list[float]] = {e: [] for e in CYCLE}
    cpu: list[float] = []
    order = [CYCLE[i % len(CYCLE)] for i in range(1, n + 1)]
    load0 = _load()
    for est in order:
        old = lab.figure
        c = time.process_time()
        t = time.perf_counter()
        lab.controls["estimator"].value = est
        dt = time.perf_counter() - t
        cpu.append(time.process_time() - c)
        assert lab.error is None, lab.error
        assert lab.figure is not old, "the switch did not make a new figure"
        times[est].append(dt)
    every = [t for ts in times.values() for t in ts]
    med = statistics.median(every) * 1e3
    load1 = _load()

    print("storch_nb lab latency: seed story, 100 samples x 200 runs, estimator switch -> new figure (PNG)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; lab created in {created * 1e3:.0f} ms "
          f"(what fits each site, from its distribution class; reference; first draw)")
    print()
    head = f"{'switch to':<12} {'n':>3} {'median ms':>10} {'min ms':>8} {'max ms':>8}"
    print(head)
    print("-" * len(head))
    for est, ts in times.items():
        if ts:
            ms = [t * 1e3 for t in ts]
            print(f"{est:<12} {len(ms):>3} {statistics.median(ms):>10.1f} {min(ms):>8.1f} {max(ms):>8.1f}")
    print("-" * len(head))
    status = "PASS" if med < TARGET_MS else "FAIL"
    print(f"{'all':<12} {len(every):>3} {med:>10.1f} {min(every) * 1e3:>8.1f} {max(every) * 1e3:>8.1f}"
          f"   target < {TARGET_MS:.0f} ms: {status}")
    print(f"process CPU time per switch: median {statistics.median(cpu) * 1e3:.1f} ms "
          f"(both torch threads counted; less sensitive than wall time to other processes)")
    if load0 is not None:
        print(f"load average (1 min) before / after: {load0:.2f} / {load1:.2f} on {os.cpu_count()} CPUs"
              + ("   (a busy machine: rerun when it is quiet)" if max(load0, load1) > 1.5 else ""))
    print()
    print(split_times(lab))
    print(import_line + ("" if ok_import else "   FAIL"))
    lab.close()
    if args.strict and (med >= TARGET_MS or not ok_import):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
