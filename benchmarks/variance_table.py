"""The table "Variance on the Bernoulli toy and the Categorical" of docs/estimators.md.

Run from the repository root::

    python benchmarks/variance_table.py             # the table (seconds on a 2-core CPU)
    python benchmarks/variance_table.py --per-call  # and rebar/relax call by call (about 10 s)

It prints the table in the docs' Markdown format. The stories:

* the Bernoulli toy ``t = param(0.3); b ~ Bernoulli(logits=t); cost (b - 0.45)**2``;
* the Categorical ``theta = param(torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2]));
  k ~ Categorical(logits=theta); cost (k - 2.0)**2``.

Each estimator makes ``runs`` independent estimates of ``samples`` particles
in one vectorized ``story.run(..., dtype="float64")`` call. Stateful
estimators (the moving-average baseline, ``rebar``, ``relax``) run three calls
on one ``Story`` with ``seed`` 0, 1, 2 and are measured on the third (their
state is fitted on the first two); the others run once at ``seed=0``.

* **Var**: the unbiased variance over the runs, summed over the entries of
  ``theta``;
* **|bias| (SE)**: the L1 norm of the mean over the runs minus
  ``story.exact()``, next to its standard error (``sd / sqrt(runs)``; for
  ``theta`` the sum of the entries' standard errors, the same L1 norm); bold
  where ``|bias|`` exceeds 4 SE;
* ``0`` where the estimator has no spread (``enumerate``; ``indecater``,
  which sums every outcome of a single site); ``—`` where it refuses the site;
* **evaluations per estimate**: ``samples`` times the cost evaluations per
  particle read off the estimator (``plate_size`` for plated estimators),
  or the support size for ``enumerate``; toy / Categorical where they differ.

``--per-call`` adds the table below it in the docs: the variance of ``rebar``
and ``relax`` (with and without ``loo``) on the toy at calls 1, 2, 3, 10, 30
and 60 on one ``Story`` (2000 runs of 8 samples, float64, ``seed`` = call
number), with plain ``score`` and ``rloo`` at seed 0 for reference.
"""

from __future__ import annotations

import argparse

import torch
from torch.distributions import Bernoulli, Categorical, Distribution

import storch_nb
from storch_nb.estimators import make_estimator

TOY = "t = param(0.3)\nb ~ Bernoulli(logits=t)\ncost (b - 0.45)**2\n"
CAT = "theta = param(torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2]))\nk ~ Categorical(logits=theta)\ncost (k - 2.0)**2\n"
SITES = {TOY: Bernoulli(logits=torch.tensor(0.3)), CAT: Categorical(logits=torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2]))}

# (label, estimator, calls): the table's rows in order
ROWS = [
    ("score", "score", 1),
    ("score(moving_average), call 3", "score(baseline='moving_average')", 3),
    ("score(batch_average)", "score(baseline='batch_average')", 1),
    ("rloo", "rloo", 1),
    ("arm", "arm", 1),
    ("disarm", "disarm", 1),
    ("rebar, call 3", "rebar", 3),
    ("relax, call 3", "relax", 3),
    ("unordered_set (k=4)", "unordered_set(k=4)", 1),
    ("score_wor (k=4)", "score_wor(k=4)", 1),
    ("indecater", "indecater", 1),
    ("enumerate", "enumerate", 1),
    ("gumbel (T=0.5)", "gumbel(temperature=0.5)", 1),
    ("st_gumbel (T=0.5)", "st_gumbel(temperature=0.5)", 1),
]


def evaluations(est: str, dist: Distribution, samples: int) -> int:
    """Cost evaluations per estimate, read off the estimator."""
    e = make_estimator(est)
    if e.enumerates:
        return int(dist.enumerate_support(expand=False).shape[0])
    return samples * (e.plate_size(dist) if e.plated else (e.n or 1))


def measure(text: str, est: str, calls: int, samples: int, runs: int) -> tuple[float, float, float] | None:
    """(Var, |bias|, SE) on the last of ``calls`` calls, or None if ``est`` refuses the site."""
    story = storch_nb.Story(text)
    exact = story.exact(dtype="float64").grads
    name = next(iter(exact))
    try:
        for seed in range(calls):
            res = story.run(samples=samples, runs=runs, estimator=est, seed=seed, dtype="float64")
    except storch_nb.EstimatorError:
        return None
    g = res.grads[name].reshape(runs, -1)
    var = g.var(0)
    bias = (g.mean(0) - exact[name].reshape(-1)).abs().sum().item()
    se = (var / runs).sqrt().sum().item()
    if var.sqrt().max() <= 1e-5 * exact[name].abs().max():  # no spread: exact up to rounding
        return 0.0, 0.0, 0.0
    return var.sum().item(), bias, se


def cells(m: tuple[float, float, float] | None, fmt: str) -> list[str]:
    if m is None:
        return ["—", "—"]
    var, bias, se = m
    if var == 0:
        return ["0", "0"]
    b = f"{bias:{fmt}}"
    return [
        f"{var:.2e}" if fmt.endswith("e") else f"{var:.3f}",
        (f"**{b}**" if bias > 4 * se else b) + f" ({se:{fmt}})",
    ]


PER_CALL = ["rebar", "relax", "rebar(loo=False)", "relax(loo=False)"]
CALLS = [1, 2, 3, 10, 30, 60]


def per_call(samples: int = 8, runs: int = 2000) -> None:
    """Variance of the toy's gradient call by call on one Story, for the learned control variates."""
    ref = {
        est: storch_nb.Story(TOY).run(samples=samples, runs=runs, estimator=est, seed=0, dtype="float64")
        for est in ("score", "rloo")
    }
    print(
        f"{runs} runs of {samples} samples, float64, seed = call number; at seed 0 plain score gives "
        f"{ref['score'].grads['t'].var().item():.2e} and rloo {ref['rloo'].grads['t'].var().item():.2e}"
    )
    print()
    print("| call | " + " | ".join(map(str, CALLS)) + " |")
    print("|---|" + "---:|" * len(CALLS))
    for est in PER_CALL:
        story, var = storch_nb.Story(TOY), []
        for seed in range(max(CALLS)):
            res = story.run(samples=samples, runs=runs, estimator=est, seed=seed, dtype="float64")
            var.append(res.grads["t"].var().item())
        print(f"| `{est}` | " + " | ".join(f"{var[c - 1]:.2e}" for c in CALLS) + " |", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8, help="particles per estimate (default 8)")
    ap.add_argument("--runs", type=int, default=20_000, help="independent estimates (default 20000)")
    ap.add_argument("--per-call", action="store_true", help="also rebar/relax call by call (2000 runs, 60 calls)")
    args = ap.parse_args(argv)
    print(
        f"storch_nb {storch_nb.__version__}, torch {torch.__version__}; S = {args.samples}, {args.runs} runs, float64"
    )
    print()
    print(
        "| estimator | toy: Var | toy: \\|bias\\| (SE) | Categorical: Var | Categorical: \\|bias\\| (SE) "
        "| evaluations per estimate |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, est, calls in ROWS:
        row, evals = [label], []
        for text, fmt in ((TOY, ".1e"), (CAT, ".3f")):
            m = measure(text, est, calls, args.samples, args.runs)
            row += cells(m, fmt)
            if m is not None and (n := evaluations(est, SITES[text], args.samples)) not in evals:
                evals.append(n)
        print("| " + " | ".join(row + [" / ".join(map(str, evals))]) + " |", flush=True)
    if args.per_call:
        print()
        per_call(args.samples)


if __name__ == "__main__":
    main()
