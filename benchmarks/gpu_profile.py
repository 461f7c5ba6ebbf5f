"""Where ``Story.run`` spends its time on a GPU, next to the hand-written seed story.

Run from the repository root on a machine with CUDA::

    python benchmarks/gpu_profile.py            # S = 1,000 and 10,000,000
    python benchmarks/gpu_profile.py --cpu      # the same on the CPU (counts only)

For each side and sample count it prints, per call: wall time (median of 200
calls, each bracketed by ``torch.cuda.synchronize()``), the number of CUDA
kernel launches, device synchronisations (``cudaStreamSynchronize``,
``cudaDeviceSynchronize``, blocking copies) and host-to-device / device-to-host
copies, from ``torch.profiler``; then cProfile's top functions of ``Story.run``
by own time. Counts, unlike times, do not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import bench_engine as be  # noqa: E402

import storch_nb  # noqa: E402


def wall(fn, sync, calls: int = 200) -> float:
    for _ in range(20):
        fn()
    sync()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def counts(fn, device: str, calls: int = 10) -> dict[str, float]:
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for _ in range(5):
        fn()
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
    c: collections.Counter = collections.Counter()
    for e in prof.events():
        name = e.name
        if name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"):
            c["kernel launches"] += 1
        elif "Synchronize" in name:
            c["synchronisations"] += 1
        elif name.startswith("cudaMemcpy") or name.startswith("Memcpy"):
            c[name] += 1
        elif name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")):
            c["top-level aten ops"] += 1
    return {k: v / calls for k, v in sorted(c.items())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="profile on the CPU")
    ap.add_argument("--samples", type=int, nargs="*", default=[1000, 10_000_000])
    args = ap.parse_args()
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here (use --cpu)")
        return 2
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    story = storch_nb.Story(be.SEED_STORY)
    for samples in args.samples:
        for est in be.ESTIMATORS:
            fns = {"hand": be.hand(samples, est, device=device), "storch": be.storch(story, samples, est, device=device)}
            print(f"\n## S={samples:,} {est} on {device}")
            for side, fn in fns.items():
                print(f"{side:7s} {wall(fn, sync) * 1e6:9.1f} µs/call  {counts(fn, device)}")
            prof = cProfile.Profile()
            fn = fns["storch"]
            prof.enable()
            for _ in range(200):
                fn()
            sync()
            prof.disable()
            st = pstats.Stats(prof)
            rows = sorted(((tt, nc, f"{Path(f).name}:{ln}({nm})") for (f, ln, nm), (_, nc, tt, _, _) in st.stats.items()),
                          reverse=True)[:18]
            print("storch cProfile, own µs per call:", "; ".join(f"{tt / 200 * 1e6:.1f} {w} x{nc / 200:g}" for tt, nc, w in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
