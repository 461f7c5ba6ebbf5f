"""Engine overhead: ``storch_nb.Story.run`` against the same maths hand-written in torch.

Run from the repository root::

    python benchmarks/bench_engine.py            # full run (under a minute)
    python benchmarks/bench_engine.py --quick    # smoke run (a few seconds)
    python benchmarks/bench_engine.py --profile  # where storch_nb's time goes at S=1000
    python benchmarks/bench_engine.py --device cuda  # both sides on the GPU, S up to 10,000,000

The story is the seed story (``d = a + b; e ~ Normal(c + b, 1); f = d * e**2;
cost f``). Each case times the two sides in the same process, in alternating
rounds (storch, hand, storch, hand, ...); a round is many back-to-back calls and
keeps its fastest call, and a side's time is the median of its rounds' fastest
calls. A shared machine can only ever slow a call down, so the fastest call is
the best estimate of the true cost, and the median over rounds guards against
a round that was slowed all the way through. The ratio is the ratio of the two
medians; the "per-round ratios" column gives the quartiles of the ratios of
neighbouring rounds, a rough gauge of how noisy the machine was.

The hand-written side is what a careful person would write: leaf tensors,
``Normal(loc, 1.0, validate_args=False)``, ``torch.autograd.grad``, and the
cost read back with ``.item()`` (``Story.run`` returns the cost as a float, so
it pays for ``.item()`` too).

Cases and targets (ratio = storch time / reference time):

1. S = 1,000, pathwise and score(baseline='rloo'): <= 1.5x hand-written;
2. S = 1,000,000, both: <= 1.1x hand-written;
3. ``runs=1000, samples=100`` against ``runs=1, samples=100000`` (storch
   against storch, the same number of draws): <= 1.5x; a hand-written batched
   version (parameters expanded to (R, 1) leaves, draws of shape (R, S)) is
   shown for reference.

With ``--device cuda`` both sides run on the GPU (the hand-written leaves are
created there), every timed call is bracketed by ``torch.cuda.synchronize()``
(so a call's time includes the kernels it queued), and the table gains a row
S = 10,000,000 per estimator (target <= 1.1x, as for S = 1,000,000).

With ``--compile`` the table is another row set: ``Story.run(..., compile=True)``
(the planned pass captured and compiled with Inductor once, then reused) at
S = 1,000 and S = 1,000,000, against the hand-written eager call (target at
S = 1,000,000: <= 0.85x) and against the hand-written call whose forward is
``torch.compile``-d (its gradient by ``torch.autograd.grad`` outside, as a
careful person would write it; Inductor's own random numbers, so its draws
differ); the seconds each side spent compiling are printed first, and the
compiled story is checked against the eager one (same seed, 1e-5 relative).

The exit status is 0 unless ``--strict`` is given and a target is missed
(timings on a shared machine are noisy; do not gate CI on them lightly), or
``--device cuda`` is asked for where CUDA is not available (status 2).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributions import Normal

import storch_nb

SEED_STORY = """\
a = param(1.0)
b = param(2.0)
c = param(0.5)
d = a + b
e ~ Normal(c + b, 1)
f = d * e**2
cost f
"""

PATHWISE = "pathwise"
RLOO = "score(baseline='rloo')"
ESTIMATORS = {PATHWISE: "pathwise", RLOO: "score+rloo"}

# closed forms at a, b, c = 1, 2, 0.5 (see tests): E[f], dE/da, dE/db, dE/dc
ORACLE = {"cost": 21.75, "a": 7.25, "b": 22.25, "c": 15.0}


# --------------------------------------------------------------- hand-written
def _leaves(shape: tuple[int, ...] = (), device: str = "cpu") -> list[torch.Tensor]:
    return [torch.full(shape, v, dtype=torch.float32, device=device, requires_grad=True) for v in (1.0, 2.0, 0.5)]


def hand(samples: int, estimator: str, device: str = "cpu") -> Callable[[], tuple[float, tuple[torch.Tensor, ...]]]:
    """The seed story written by hand: one call = one gradient estimate."""
    a, b, c = params = _leaves(device=device)
    grad = torch.autograd.grad

    if estimator == PATHWISE:

        def call():
            dist = Normal(c + b, 1.0, validate_args=False)
            e = dist.rsample((samples,))
            f = (a + b) * e**2
            loss = f.mean()
            grads = grad(loss, params)
            return loss.item(), grads

    else:
        s1 = samples - 1

        def call():
            dist = Normal(c + b, 1.0, validate_args=False)
            e = dist.sample((samples,))
            lp = dist.log_prob(e)
            f = (a + b) * e**2
            fd = f.detach()
            base = (fd.sum() - fd) / s1  # leave-one-out
            surrogate = (f + (lp - lp.detach()) * (fd - base)).mean()
            grads = grad(surrogate, params)
            return surrogate.item(), grads

    return call


def hand_batched(
    runs: int, samples: int, estimator: str, device: str = "cpu"
) -> Callable[[], tuple[float, tuple[torch.Tensor, ...]]]:
    """``runs`` independent estimates in one pass: parameters are (R, 1) leaves, draws (R, S)."""
    a, b, c = params = _leaves((runs, 1), device)
    grad = torch.autograd.grad

    if estimator == PATHWISE:

        def call():
            dist = Normal((c + b).expand(runs, samples), 1.0, validate_args=False)
            e = dist.rsample()
            f = (a + b) * e**2
            per_run = f.mean(1)
            grads = grad(per_run.sum(), params)
            return per_run.detach().mean().item(), grads

    else:
        s1 = samples - 1

        def call():
            dist = Normal((c + b).expand(runs, samples), 1.0, validate_args=False)
            e = dist.sample()
            lp = dist.log_prob(e)
            f = (a + b) * e**2
            fd = f.detach()
            base = (fd.sum(1, keepdim=True) - fd) / s1
            per_run = (f + (lp - lp.detach()) * (fd - base)).mean(1)
            grads = grad(per_run.sum(), params)
            return per_run.detach().mean().item(), grads

    return call


def storch(
    story: storch_nb.Story, samples: int, estimator: str, runs: int = 1, device: str = "cpu", compile: bool = False
) -> Callable[[], object]:
    def call():
        return story.run(samples=samples, estimator=estimator, seed=None, runs=runs, device=device, compile=compile)

    return call


def hand_compiled(samples: int, estimator: str, device: str = "cpu") -> Callable[[], tuple[float, tuple]]:
    """The hand-written call with its forward (draws, cost, surrogate) ``torch.compile``-d;
    the gradient by ``torch.autograd.grad`` of the compiled forward's output."""
    a, b, c = params = _leaves(device=device)
    grad = torch.autograd.grad
    s1 = samples - 1

    def forward():
        dist = Normal(c + b, 1.0, validate_args=False)
        if estimator == PATHWISE:
            return ((a + b) * dist.rsample((samples,)) ** 2).mean()
        e = dist.sample((samples,))
        lp = dist.log_prob(e)
        f = (a + b) * e**2
        fd = f.detach()
        return (f + (lp - lp.detach()) * (fd - (fd.sum() - fd) / s1)).mean()

    compiled = torch.compile(forward)

    def call():
        loss = compiled()
        return loss.item(), grad(loss, params)

    return call


# ------------------------------------------------------------------- timing
@dataclass
class Timing:
    label: str
    best: list[float]  # fastest call of each round, seconds

    @property
    def median(self) -> float:
        return statistics.median(self.best)


def _round(fn: Callable[[], object], calls: int, sync: Callable[[], None] | None = None) -> float:
    """The fastest of ``calls`` calls; with ``sync`` (``torch.cuda.synchronize``) each
    call starts on an idle device and its time includes the kernels it queued."""
    clock = time.perf_counter
    best = math.inf
    for _ in range(calls):
        if sync is not None:
            sync()
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        dt = clock() - t0
        if dt < best:
            best = dt
    return best


def race(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    calls: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Alternate rounds of every function; each round keeps its fastest call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if sync is not None:
        sync()
    out = {k: Timing(k, []) for k in fns}
    gc.collect()
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].best.append(_round(fn, calls, sync))
    return out


def fmt_time(seconds: float) -> str:
    us = seconds * 1e6
    if us < 1000:
        return f"{us:.1f} µs"
    return f"{us / 1000:.2f} ms"


# ------------------------------------------------------------------ checks
def sanity(story: storch_nb.Story, device: str = "cpu") -> None:
    """Both sides compute the same estimate (closed forms, S = 1e6)."""
    for est in ESTIMATORS:
        res = story.run(samples=10**6, estimator=est, seed=0, device=device)
        cost, grads = hand(10**6, est, device)()
        got = {"storch": (res.cost, *(res.grads[k].item() for k in "abc")), "hand": (cost, *(g.item() for g in grads))}
        for side, vals in got.items():
            for key, v in zip(ORACLE, vals):
                want = ORACLE[key]
                if not abs(v - want) <= 0.05 * abs(want):
                    raise SystemExit(f"sanity: {side} {ESTIMATORS[est]} {key} = {v:.4g}, expected about {want}")


def import_check() -> list[tuple[str, bool]]:
    """``import storch_nb`` must not import the heavy notebook-only packages."""
    code = "import sys, storch_nb\nfor m in ('matplotlib', 'ipywidgets', 'IPython'):\n    print(m, m in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [(name, flag == "True") for name, flag in (line.split() for line in out.splitlines())]


def import_time() -> float:
    code = "import time; t = time.perf_counter(); import storch_nb; print(time.perf_counter() - t)"
    times = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        times.append(float(out))
    return min(times)


# ----------------------------------------------------------------- profile
def profile(samples: int = 1000, calls: int = 3000, top: int = 25, device: str = "cpu") -> None:
    """cProfile of ``Story.run`` at ``samples``: the costliest functions, µs per call."""
    import cProfile
    import pstats

    story = storch_nb.Story(SEED_STORY)
    for est in ESTIMATORS:
        fn = storch(story, samples, est, device=device)
        for _ in range(200):
            fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        stats = pstats.Stats(prof)
        rows = []
        for (file, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            short = file.split("site-packages/")[-1].split("storch_nb/")[-1] if file != "~" else ""
            rows.append((tt, ct, nc, f"{short}:{line}({name})" if short else name))
        print(
            f"\n### cProfile, {ESTIMATORS[est]}, S={samples}: top {top} by own time (µs per call; cProfile inflates Python-heavy code)\n"
        )
        print("| own µs | cumulative µs | calls per run | function |")
        print("|---:|---:|---:|---|")
        for tt, ct, nc, where in sorted(rows, reverse=True)[:top]:
            print(f"| {tt / calls * 1e6:.2f} | {ct / calls * 1e6:.2f} | {nc / calls:g} | `{where}` |")


# ------------------------------------------------------------------- rows
def eager_rows(story: storch_nb.Story, device: str, quick: bool, sync) -> list[tuple]:
    """The eager row set: (case, estimator, reference label, reference timing, storch timing, target)."""
    # (rounds, calls per round, warm-up calls) per size
    small = (3, 30, 20) if quick else (15, 200, 200)
    large = (3, 1, 1) if quick else (15, 5, 3)
    batched = (3, 5, 3) if quick else (9, 20, 10)

    sizes = [(1000, small), (10**6, large)]
    if device == "cuda":
        sizes.append((10**7, large))
    rows = []  # case, estimator, reference label, ref time, storch time, target
    for est, short in ESTIMATORS.items():
        for n, (rounds, calls, warm) in sizes:
            t = race({"storch": storch(story, n, est, device=device), "hand": hand(n, est, device)},
                     rounds, calls, warm, sync)  # fmt: skip
            target = 1.5 if n == 1000 else 1.1
            rows.append((f"S={n:,}", short, "hand-written", t["hand"], t["storch"], target))
    for est, short in ESTIMATORS.items():
        rounds, calls, warm = batched
        t = race(
            {
                "runs": storch(story, 100, est, runs=1000, device=device),
                "flat": storch(story, 100_000, est, device=device),
                "hand": hand_batched(1000, 100, est, device),
            },
            rounds,
            calls,
            warm,
            sync,
        )
        rows.append(("runs=1000 × S=100", short, "storch runs=1, S=100,000", t["flat"], t["runs"], 1.5))
        rows.append(("runs=1000 × S=100", short, "hand-written (R,S) batch", t["hand"], t["runs"], None))

    return rows


def compile_rows(story: storch_nb.Story, device: str, quick: bool, sync) -> list[tuple]:
    """The ``--compile`` row set: ``Story.run(compile=True)`` against hand-written eager and compiled torch."""
    small = (3, 30, 20) if quick else (15, 200, 200)
    large = (3, 1, 1) if quick else (15, 5, 3)
    sizes = [(1000, small), (10**6, large)]
    rows = []
    for est, short in ESTIMATORS.items():
        for n, (rounds, calls, warm) in sizes:
            compiled = storch_nb.Story(SEED_STORY)
            first = compiled.run(samples=n, estimator=est, seed=0, device=device, compile=True)
            eager = story.run(samples=n, estimator=est, seed=0, device=device)
            worst = max(abs(first.cost - eager.cost) / abs(eager.cost), *(
                float((first.grads[k] - eager.grads[k]).abs().max() / eager.grads[k].abs().max()) for k in "abc"))
            hand_c = hand_compiled(n, est, device)
            t0 = time.perf_counter()
            hand_c()
            hand_s = time.perf_counter() - t0
            print(f"- {short} S={n:,}: storch compiled in {first.compile_seconds:.2f} s, hand-written forward in "
                  f"{hand_s:.2f} s; compiled vs eager (seed 0): {worst:.1e} relative "
                  f"({'PASS' if worst <= 1e-5 else 'FAIL'} at 1e-5)")
            t = race({"storch": storch(compiled, n, est, device=device, compile=True), "hand": hand(n, est, device),
                      "hand_c": hand_c}, rounds, calls, warm, sync)
            rows.append((f"S={n:,} compiled", short, "hand-written eager", t["hand"], t["storch"],
                         0.85 if n == 10**6 else None))
            rows.append((f"S={n:,} compiled", short, "hand-written, torch.compile", t["hand_c"], t["storch"], None))
    return rows


# -------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds: a smoke run, not a measurement")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--profile", action="store_true", help="only profile Story.run at S=1000 (cProfile)")
    ap.add_argument("--compile", action="store_true", help="the compiled row set: Story.run(compile=True)")
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where both sides run (default cpu); cuda times with torch.cuda.synchronize()",
    )
    args = ap.parse_args(argv)
    device = args.device
    sync = None
    if device == "cuda":
        if not torch.cuda.is_available():
            print(
                f"bench_engine: --device cuda, but CUDA is not available to torch {torch.__version__} "
                f"(torch.version.cuda = {torch.version.cuda}); nothing was timed",
                file=sys.stderr,
            )
            return 2
        sync = torch.cuda.synchronize

    if args.profile:
        profile(device=device)
        return 0

    print(
        f"torch {torch.__version__}, storch_nb {storch_nb.__version__}, python {sys.version.split()[0]}, "
        f"torch.get_num_threads() = {torch.get_num_threads()}" + (" (--quick: smoke run)" if args.quick else "")
    )
    if device == "cuda":
        print(
            f"device cuda: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); "
            "every timed call is bracketed by torch.cuda.synchronize()"
        )

    story = storch_nb.Story(SEED_STORY)
    if not args.quick:
        sanity(story, device)

    rows = compile_rows(story, device, args.quick, sync) if args.compile else eager_rows(story, device, args.quick, sync)
    print()
    print(
        "| case | estimator | reference | reference time | storch_nb | ratio | per-round ratios q1-q3 | target | result |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    failed = 0
    for case, short, ref_label, ref, st, target in rows:
        ratio = st.median / ref.median
        q1, _, q3 = statistics.quantiles([x / y for x, y in zip(st.best, ref.best)], n=4)
        if target is None:
            verdict, tgt = "(info)", "-"
        else:
            ok = ratio <= target
            failed += not ok
            verdict, tgt = ("PASS" if ok else "FAIL"), f"≤ {target}x"
        print(
            f"| {case} | {short} | {ref_label} | {fmt_time(ref.median)} | {fmt_time(st.median)} | {ratio:.2f}x | {q1:.2f}-{q3:.2f} | {tgt} | {verdict} |"
        )

    print()
    for name, loaded in import_check():
        if name == "IPython":
            print(f"- `import storch_nb` imports IPython: {'yes' if loaded else 'no'} (info)")
        else:
            ok = not loaded
            failed += not ok
            print(f"- `import storch_nb` leaves {name} unimported: {'PASS' if ok else 'FAIL'}")
    print(f"- `import storch_nb` takes {import_time() * 1e3:.0f} ms in a fresh interpreter (info)")
    if args.quick:
        print("\n(--quick: too few rounds for the ratios to mean much)")
    return 1 if (failed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
