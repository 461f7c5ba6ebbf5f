"""The estimator library side by side: time, variance, bias and cost evaluations.

Run from the repository root::

    python benchmarks/bench_estimators.py            # full run (one to two minutes)
    python benchmarks/bench_estimators.py --quick    # smoke run (well under 30 s)

Stories (the ones the estimator tests use):

* the Bernoulli toy ``t = param(0.3); b ~ Bernoulli(logits=t); cost (b - p0)**2``
  at ``p0 = 0.499`` and ``p0 = 0.45`` (the gradient ``sigmoid'(t) (1 - 2 p0)`` is
  tiny next to the cost: the classic hard case for the score function);
* the Categorical story with five outcomes
  ``theta = param(torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2])); k ~ Categorical(logits=theta);
  cost (k - 2.0)**2``.

Every registered estimator (aliases and ``auto`` folded in; ``auto``'s pick is
printed) is tried on every story; those that refuse the site are listed with
their reason. For each that fits:

* **time / estimate**: one ``story.run(samples=S, estimator=est)`` call (one
  gradient estimate, ``runs=1``, ``seed=None``; for ``rebar``/``relax`` the
  call includes fitting the control variate: least squares on the per-sample
  estimates for its coefficients, an Adam step for the temperature). All
  estimators of a story (and the hand-written references) run in alternating
  rounds; a round is many back-to-back calls and keeps its fastest call; a
  side's time is the median of its rounds' fastest calls (the house style of
  ``bench_engine.py``: a shared machine can only slow a call down).
* **variance**: ``runs=R`` independent estimates at the same ``S`` in one
  vectorized call (``seed=0``), the unbiased variance over the ``R`` runs;
  for the five logits, the trace (the sum of the five entries' variances;
  the per-entry variances are in a separate table).
* **bias**: the mean over the ``R`` runs minus ``story.exact()``, with its
  standard error ``sd / sqrt(R)`` and ``|bias| / SE`` (for the logits, the
  norm of the bias vector and the largest ``|bias_i| / SE_i``). Unbiased
  estimators should show ``|bias| / SE`` below about 3; a ``(!)`` marks rows
  above 4 (expected for ``gumbel`` and ``st_gumbel``, which are biased by
  design). Estimators with no spread beyond float32 rounding (``enumerate``;
  ``indecater`` on a single categorical, where it sums every outcome) show
  ``- (no spread)``.
* **cost evaluations per sample**: how many times each particle evaluates the
  story downstream of the site, read off the estimator: ``plate_size(dist)``
  for plated estimators (antithetic pairs, relaxations, IndeCateR's variants,
  the ``k`` outcomes drawn without replacement), ``n`` with option ``n``, the
  size of the support for ``enumerate`` (per estimate: it draws nothing, so
  ``S`` does not matter), else 1.

``rebar`` and ``relax`` fit their control variate after every call (least
squares for the coefficients, pooled over the runs of a call; Adam for the
temperature). The ``fresh`` row is their first estimate, before any fit
(REBAR at ``eta = 1``, temperature 0.5, and the weight ``beta`` of the other
samples' mean cost at 1; RELAX at ``eta = rho = 0``, ``beta = 1``, where it is
``rloo``); the ``trained`` row runs ``T`` calls at ``runs=R_t``
(the ``R_t`` runs share one fit) and then pools the estimates of the next few
calls (each conditionally unbiased given the control variate so far).

Hand-written torch beside ``score``, ``rloo`` and ``disarm`` on the Bernoulli
toy: leaf tensors, ``Bernoulli(logits=t, validate_args=False)``, the DiCE-style
surrogate and ``torch.autograd.grad``, ``.item()`` of the cost estimate
(``Story.run`` returns a float); for its variance the same maths batched over
``(R, S)``, which at the same seed consumes the random stream exactly as
``Story.run`` does, so equal variances (to every printed digit) show that the
engine computes the same estimator. The ratio is storch time / hand time, with
the quartiles of the per-round ratios.

torch runs with one intra-op thread (``--threads``; 0 keeps torch's default):
every tensor here is tiny, and with two threads on a busy machine some small
ops wait for the thread pool (``Bernoulli.log_prob`` with gradients, through
``aten::log_sigmoid_forward`` on 2-10 entries, measured at 12-24 ms instead of
3 µs), which swamps what is being compared.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from bench_engine import Timing, race  # same folder: the house timing method
from torch.distributions import Bernoulli, Categorical, Distribution

import storch_nb
from storch_nb.errors import StoryError
from storch_nb.estimators import make_estimator

THETA0 = [0.1, -0.3, 0.5, 0.0, 0.2]


def bernoulli_text(p0: float) -> str:
    return f"t = param(0.3)\nb ~ Bernoulli(logits=t)\ncost (b - {p0})**2\n"


CATEGORICAL_TEXT = f"theta = param(torch.tensor({THETA0}))\nk ~ Categorical(logits=theta)\ncost (k - 2.0)**2\n"


@dataclass
class Case:
    title: str
    text: str
    param: str  # the parameter whose gradient is reported
    site: Callable[[dict[str, torch.Tensor]], Distribution]  # the site's distribution, from the story's params
    p0: float | None = None  # Bernoulli toys: hand-written references
    time_it: bool = True  # the p0 = 0.45 toy does the same work as p0 = 0.499: its times are copied


CASES = [
    Case("Bernoulli toy, p0 = 0.499", bernoulli_text(0.499), "t", lambda p: Bernoulli(logits=p["t"]), p0=0.499),
    Case(
        "Bernoulli toy, p0 = 0.45",
        bernoulli_text(0.45),
        "t",
        lambda p: Bernoulli(logits=p["t"]),
        p0=0.45,
        time_it=False,
    ),
    Case("Categorical, five outcomes", CATEGORICAL_TEXT, "theta", lambda p: Categorical(logits=p["theta"])),
]

# ------------------------------------------------------------- estimators
# table order: by family; estimators registered later (user ones) go before enumerate
ORDER = [
    "score",
    "rloo",
    "arm",
    "disarm",
    "rebar",
    "relax",
    "lax",
    "unordered_set",
    "score_wor",
    "indecater",
    "gumbel",
    "st_gumbel",
    "pathwise",
    "measure_valued",
    "go",
]


def canonical_names() -> list[str]:
    """Every registered estimator once (aliases folded into their target), ``auto`` left out."""
    out = []
    for name in storch_nb.estimators():
        if name == "auto":
            continue
        canon = make_estimator(name).name
        if canon not in out:
            out.append(canon)
    rank = {n: i for i, n in enumerate(ORDER)}
    return sorted(out, key=lambda n: (n == "enumerate", rank.get(n, len(ORDER)), n))


def fit_or_reason(text: str, est: str) -> str | None:
    """None if ``est`` runs on the story; else the first line of the refusal."""
    try:
        storch_nb.Story(text).run(samples=2, estimator=est, seed=0)
    except StoryError as exc:  # EstimatorError included: the estimator refuses the site
        msg = exc.message.splitlines()[0]
        return msg.split("): ", 1)[-1] if "does not fit" in msg else msg
    except Exception as exc:  # an engine problem, not a refusal: report it, carry on
        return f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return None


def evals_per_sample(est_name: str, dist: Distribution) -> str:
    """Cost evaluations per particle, read off the estimator (see the module docstring)."""
    est = make_estimator(est_name)
    if est.enumerates:
        return f"{int(dist.enumerate_support(expand=False).shape[0])} per estimate"
    if est.plated:
        return str(est.plate_size(dist))
    return str(est.n or 1)


# ------------------------------------------------------------ hand-written
def hand(kind: str, p0: float, samples: int) -> Callable[[], tuple[float, tuple[torch.Tensor, ...]]]:
    """The Bernoulli toy by hand: one call = one gradient estimate (as ``Story.run``)."""
    t = torch.tensor(0.3, requires_grad=True)
    params = (t,)
    grad = torch.autograd.grad
    s1 = samples - 1

    if kind == "score":

        def call():
            dist = Bernoulli(logits=t, validate_args=False)
            b = dist.sample((samples,))
            lp = dist.log_prob(b)
            f = (b - p0) ** 2
            surrogate = (f + (lp - lp.detach()) * f).mean()
            return surrogate.item(), grad(surrogate, params)

    elif kind == "rloo":

        def call():
            dist = Bernoulli(logits=t, validate_args=False)
            b = dist.sample((samples,))
            lp = dist.log_prob(b)
            f = (b - p0) ** 2
            base = (f.sum() - f) / s1  # leave-one-out
            surrogate = (f + (lp - lp.detach()) * (f - base)).mean()
            return surrogate.item(), grad(surrogate, params)

    elif kind == "disarm":

        def call():
            with torch.no_grad():
                u = torch.rand(samples)
                p = torch.sigmoid(t)
                b = (u < p).float()
                b_anti = (u > 1 - p).float()
                f, f_anti = (b - p0) ** 2, (b_anti - p0) ** 2
                g = 0.5 * (f - f_anti) * (1 - 2 * b_anti) * (b != b_anti) * torch.sigmoid(t.abs())
            surrogate = 0.5 * (f + f_anti).mean() + (g * (t - t.detach())).mean()
            return surrogate.item(), grad(surrogate, params)

    else:
        raise ValueError(kind)
    return call


def hand_batched(kind: str, p0: float, runs: int, samples: int) -> torch.Tensor:
    """``runs`` hand-written estimates in one pass (draws (R, S)); returns the (R,) gradients."""
    t = torch.full((runs, 1), 0.3, requires_grad=True)
    if kind == "disarm":
        with torch.no_grad():
            u = torch.rand(runs, samples)
            p = torch.sigmoid(t)
            b = (u < p).float()
            b_anti = (u > 1 - p).float()
            f, f_anti = (b - p0) ** 2, (b_anti - p0) ** 2
            g = 0.5 * (f - f_anti) * (1 - 2 * b_anti) * (b != b_anti) * torch.sigmoid(t.abs())
        per_run = (g * (t - t.detach())).mean(1)
    else:
        dist = Bernoulli(logits=t.expand(runs, samples), validate_args=False)
        b = dist.sample()
        lp = dist.log_prob(b)
        f = (b - p0) ** 2
        base = (f.sum(1, keepdim=True) - f) / (samples - 1) if kind == "rloo" else 0.0
        per_run = ((lp - lp.detach()) * (f - base)).mean(1)
    (gt,) = torch.autograd.grad(per_run.sum(), (t,))
    return gt.reshape(runs)


def score_variance_closed_form(p0: float, samples: int, t: float = 0.3) -> float:
    """Var of the plain score function with S samples: (E[f^2 (b - p)^2] - g^2) / S."""
    p = 1 / (1 + math.exp(-t))
    f0, f1 = p0**2, (1 - p0) ** 2
    second = (1 - p) * f0**2 * p**2 + p * f1**2 * (1 - p) ** 2
    g = p * (1 - p) * (1 - 2 * p0)
    return (second - g * g) / samples


# ------------------------------------------------------------------ timing
# the house timing method (alternating rounds, fastest call per round): bench_engine.race


def fmt_time(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.0f} µs" if us < 1000 else f"{us / 1000:.2f} ms"


# -------------------------------------------------------------- statistics
@dataclass
class Stats:
    var: float  # variance (trace for a vector)
    bias_norm: float  # |bias| (norm for a vector)
    bias: float | None  # signed bias (scalars)
    se: float | None  # its standard error (scalars)
    z: float  # |bias| / SE (largest entry for a vector)
    per_entry: list[float]  # variance of each entry
    n: int  # estimates pooled


def stats(grads: torch.Tensor, exact: torch.Tensor) -> Stats:
    g = grads.detach().double().reshape(grads.shape[0], -1)
    ref = exact.detach().double().reshape(-1)
    n = g.shape[0]
    var = g.var(0, unbiased=True)
    bias = g.mean(0) - ref
    se = (var / n).sqrt()
    # an estimator with no spread beyond float32 rounding (enumerate; IndeCateR on a single
    # categorical) is exact: its "bias" is rounding, and |bias|/SE means nothing
    exact_like = var.sqrt().max() <= 1e-5 * max(ref.abs().max().item(), 1e-12)
    z = torch.full_like(se, math.nan) if exact_like else bias.abs() / se
    scalar = g.shape[1] == 1
    return Stats(
        var=var.sum().item(),
        bias_norm=bias.norm().item(),
        bias=bias.item() if scalar else None,
        se=se.item() if scalar else None,
        z=z.max().item(),
        per_entry=var.tolist(),
        n=n,
    )


def measure(text: str, est: str, param: str, exact: torch.Tensor, samples: int, runs: int) -> Stats:
    res = storch_nb.Story(text).run(samples=samples, estimator=est, runs=runs, seed=0)
    return stats(res.grads[param], exact)


def measure_trained(
    text: str, est: str, param: str, exact: torch.Tensor, samples: int, runs: int, steps: int, pool: int
) -> Stats:
    story = storch_nb.Story(text)
    with torch.random.fork_rng():
        torch.default_generator.manual_seed(1)
        for _ in range(steps):
            story.run(samples=samples, estimator=est, runs=runs)
        grads = torch.cat([story.run(samples=samples, estimator=est, runs=runs).grads[param] for _ in range(pool)])
    return stats(grads, exact)


# ------------------------------------------------------------------ tables
def fmt_sci(x: float) -> str:
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2e}"


@dataclass
class Row:
    label: str
    evals: str
    timing: Timing | None
    st: Stats
    ratio: str = "-"


def print_table(
    case: Case, exact: torch.Tensor, rows: list[Row], score_var: float | None, samples: int, runs: int
) -> None:
    vector = exact.numel() > 1
    ex = ", ".join(f"{x:.4g}" for x in exact.reshape(-1).tolist())
    print(
        f"\n### {case.title}: S = {samples}, R = {runs}; exact dE/d{case.param} = {'[' + ex + ']' if vector else ex}\n"
    )
    var_head = "tr Var" if vector else "Var"
    bias_head = "‖bias‖" if vector else "bias ± SE"
    z_head = "max \\|bias\\|/SE" if vector else "\\|bias\\|/SE"
    with_hand = any(r.ratio != "-" for r in rows)
    hand_head, hand_rule = (" vs hand-written |", "---:|") if with_hand else ("", "")
    print(
        f"| estimator | cost evals / sample | time / estimate |{hand_head} {var_head} | "
        f"{var_head} / score's | {bias_head} | {z_head} |"
    )
    print(f"|---|---:|---:|{hand_rule}---:|---:|---:|---:|")
    for r in rows:
        t = fmt_time(r.timing.median) if r.timing is not None else "-"
        rel = fmt_sci(r.st.var / score_var) if score_var else "-"
        if vector:
            bias = fmt_sci(r.st.bias_norm)
        else:
            bias = f"{r.st.bias:+.2e} ± {r.st.se:.1e}"
        flag = " (!)" if r.st.z > 4 else ""
        z = "- (no spread)" if math.isnan(r.st.z) else f"{r.st.z:.1f}{flag}"
        ratio = f" {r.ratio} |" if with_hand else ""
        print(f"| {r.label} | {r.evals} | {t} |{ratio} {fmt_sci(r.st.var)} | {rel} | {bias} | {z} |")


def print_per_entry(case: Case, rows: list[Row]) -> None:
    n = len(rows[0].st.per_entry)
    print(f"\n### {case.title}: variance of each entry of dE/d{case.param}\n")
    print("| estimator | " + " | ".join(f"{case.param}[{i}]" for i in range(n)) + " |")
    print("|---|" + "---:|" * n)
    for r in rows:
        print(f"| {r.label} | " + " | ".join(fmt_sci(v) for v in r.st.per_entry) + " |")


# -------------------------------------------------------------------- main
@dataclass
class Config:
    samples: int
    runs: int
    rounds: int
    calls: int
    warmup: int
    train_runs: int
    train_steps: int
    pool: int
    quick: bool


def _config(argv: list[str] | None) -> Config:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds and runs: a smoke run, not a measurement")
    ap.add_argument("--samples", type=int, default=10, help="S, samples per estimate (default 10)")
    ap.add_argument("--runs", type=int, default=None, help="R, estimates for variance and bias (default 2000)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1; 0 leaves torch's default): the tensors here are tiny, and on a "
        "busy machine torch's thread pool makes some small ops (Bernoulli.log_prob) wait milliseconds",
    )
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.quick:
        return Config(args.samples, args.runs or 200, 3, 5, 3, 50, 10, 2, True)
    return Config(args.samples, args.runs or 2000, 21, 50, 20, 200, 300, 10, False)


def _fitting(text: str, names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The estimators that run on a story, and why each other one does not."""
    fits, refused = [], {}
    for name in names:
        reason = fit_or_reason(text, name)
        if reason is None:
            fits.append(name)
        else:
            refused[name] = reason
    return fits, refused


def _time(case, fits: list[str], hands: tuple[str, ...], cfg: Config) -> tuple[dict, dict]:
    """Time per estimate (one call, runs=1) of every estimator and hand-written twin, in alternating rounds."""
    fns: dict[str, Callable[[], object]] = {}
    for name in fits:
        story = storch_nb.Story(case.text)
        fns[name] = lambda story=story, name=name: story.run(samples=cfg.samples, estimator=name)
    for kind in hands:
        fns["hand " + kind] = hand(kind, case.p0, cfg.samples)
    raced = race(fns, cfg.rounds, cfg.calls, cfg.warmup)
    timings = {k: v for k, v in raced.items() if not k.startswith("hand ")}
    return timings, {k[5:]: v for k, v in raced.items() if k.startswith("hand ")}


def _rows(case, fits, hands, exact, dist, timings, hand_timings, cfg: Config) -> list[Row]:
    """Variance and bias of every estimator that fits (and of the hand-written twins)."""
    rows: list[Row] = []
    for name in fits:
        evals = evals_per_sample(name, dist)
        trainable = make_estimator(name).trainable
        st = measure(case.text, name, case.param, exact, cfg.samples, cfg.runs)
        ratio = "-"
        if name in hand_timings:
            h, t = hand_timings[name], timings[name]
            q1, _, q3 = statistics.quantiles([a / b for a, b in zip(t.best, h.best)], n=4)
            ratio = f"{t.median / h.median:.2f}x ({q1:.2f}-{q3:.2f})"
        rows.append(Row(f"{name} (fresh)" if trainable else name, evals, timings.get(name), st, ratio))
        if trainable:
            st_t = measure_trained(case.text, name, case.param, exact, cfg.samples, cfg.train_runs, cfg.train_steps,
                                   cfg.pool)
            rows.append(Row(f"{name} (trained, {cfg.train_steps} steps)", evals, None, st_t))
        if name in hands:
            torch.default_generator.manual_seed(0)
            g = hand_batched(name, case.p0, cfg.runs, cfg.samples)
            rows.append(Row(f"↳ {name}, hand-written torch", "2" if name == "disarm" else "1", hand_timings[name],
                            stats(g.unsqueeze(-1), exact.reshape(1))))
    return rows


def _notes(case, auto, refused: dict[str, str], cfg: Config) -> list[str]:
    """Print the lines under a case's table; return the engine errors among the refusals."""
    print(f"- `auto` picks `{auto.estimators[next(iter(auto.estimators))]}` here (S = {cfg.samples}).")
    if case.p0 is not None:
        cf = score_variance_closed_form(case.p0, cfg.samples)
        print(f"- closed-form variance of plain `score` at S = {cfg.samples}: {cf:.3e}.")
    if not case.time_it:
        print("- times are those of the p0 = 0.499 table (the same work; only the constant differs).")
    errors = []
    for name, reason in refused.items():
        print(f"- `{name}` does not fit: {reason}")
        if reason.startswith("ERROR"):
            errors.append(f"{case.title}: `{name}` {reason}")
    return errors


def main(argv: list[str] | None = None) -> int:
    cfg = _config(argv)
    t_start = time.perf_counter()
    print(
        f"torch {torch.__version__}, storch_nb {storch_nb.__version__}, python {sys.version.split()[0]}, "
        f"torch.get_num_threads() = {torch.get_num_threads()}" + (" (--quick: smoke run)" if cfg.quick else "")
    )
    print(
        f"timing: {cfg.rounds} alternating rounds of {cfg.calls} calls, fastest call per round, median over rounds; "
        f"variance and bias over R = {cfg.runs} runs at S = {cfg.samples}; rebar/relax 'trained': {cfg.train_steps} "
        f"calls at runs={cfg.train_runs}, then {cfg.pool} calls pooled ({cfg.train_runs * cfg.pool} estimates)"
    )
    names = canonical_names()
    timings: dict[str, Timing] = {}  # shared by the two Bernoulli toys
    hand_timings: dict[str, Timing] = {}
    notes: list[str] = []
    for case in CASES:
        exact = storch_nb.Story(case.text).exact().grads[case.param]
        probe = storch_nb.Story(case.text)
        auto = probe.run(samples=cfg.samples, estimator="auto", seed=0)
        fits, refused = _fitting(case.text, names)
        hands = ("score", "rloo", "disarm") if case.p0 is not None else ()
        if case.time_it:
            timings, hand_timings = _time(case, fits, hands, cfg)
        rows = _rows(case, fits, hands, exact, case.site(probe.params), timings, hand_timings, cfg)
        score_var = next((r.st.var for r in rows if r.label == "score"), None)
        print_table(case, exact, rows, score_var, cfg.samples, cfg.runs)
        print()
        notes += _notes(case, auto, refused, cfg)
        if exact.numel() > 1:
            print_per_entry(case, rows)
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    if cfg.quick:
        print("(--quick: too few rounds and runs for the numbers to mean much)")
    for n in notes:
        print(f"engine error: {n}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
