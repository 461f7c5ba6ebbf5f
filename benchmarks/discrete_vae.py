"""A Bernoulli-latent VAE on scikit-learn's digits: storch_nb's plate story against
the same estimators hand-written in torch, side by side in one process.

Run from the repository root::

    python benchmarks/discrete_vae.py                 # full run (about 45 minutes on 2 cores)
    python benchmarks/discrete_vae.py --quick         # smoke run (about a minute)
    python benchmarks/discrete_vae.py --steps 2000 --seeds 0,1,2 --estimators rloo,disarm,arm

The model (the protocol of NOTES.md, after the DisARM paper's, smaller): the 1797
digits binarized at pixel > 7; encoder 64-128-32 with tanh, decoder 32-128-64 with
tanh, 32 Bernoulli latents with a uniform prior; minibatches of 64 drawn without
replacement each step; Adam, learning rate 1e-3. Per datapoint the cost is the
negative ELBO ``-log p(x|z) + log q(z|x) - log p(z)``. In storch_nb it is one plate::

    for x_i in plate(X, batch=64):
        logits = enc(x_i)
        z ~ Bernoulli(logits=logits)
        recon = dec(z)
        cost (softplus(recon) - x_i * recon).sum() + (z * logits - softplus(logits)).sum() + LATENT * LOG2

written for one datapoint; the estimator is the only thing that changes.

What it prints, per estimator:

1. **step time**: a training step (``story.train`` with an optimizer instance)
   against a hand-written step (the same estimator, minibatch and optimizer) in
   alternating rounds of 20 steps, the median of the rounds' per-step times and
   their ratio;
2. **-ELBO**: the full-data negative ELBO (20 draws of z per datapoint, one fixed
   generator for every model) after ``--steps`` steps, mean and standard error over
   ``--seeds``, for storch_nb and, where written, by hand;
3. **Var x N**: the total variance of the encoder's gradient estimate (summed over
   the encoder's parameters) times the minibatch size N, at N = 1, 16 and 64, on the
   first 64 datapoints at the initial weights: the 64 datapoints are split into
   64/N minibatches, each minibatch's gradient is estimated repeatedly (more
   repetitions for larger N: 25, 100, 400) and the variances are averaged
   (rebar's and relax's control variates are fitted first, on 100 calls on the
   64 datapoints, and then frozen). With
   per-datapoint credit assignment the three numbers agree (the minibatch's
   gradient is the mean of N independent per-datapoint estimates); an estimator
   that credits every latent with the minibatch's mean cost grows like N.

The hand-written estimators (RLOO with K samples, ARM, DisARM) are checked
unbiased first, on a tiny model (3 latents, 2 datapoints) whose exact gradient
is a sum over the 8 latent configurations.

Every estimator that fits the model is run at (nearly) equal decoder evaluations
per datapoint and step, 4 (``SETTINGS``): RLOO and the score function with 4
samples, ARM and DisARM with 2 antithetic pairs (the hand-written ones too), ARMS
and double control variates with ``n=4``, the relaxations (gumbel, st_gumbel,
reinmax, gumbel_rao) with 4 samples; REBAR and RELAX evaluate 3 times per sample
(the nearest below 4); IndeCateR needs both values of each of the 32 latents
(64, it cannot be made equal); ``unordered_set`` and ``score_wor`` do not fit a
site of 32 Bernoullis. ``vimco`` trains the IWAE bound with K = 5 particles
(``cost -logmeanexp(log_w, over=z)``, 5 evaluations); its Var x N is that of
the IWAE bound's gradient. Every trained model is also scored by the full-data
negative IWAE bound with K = 5 (column -IWAE).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import race  # noqa: E402

import storch_nb as sn  # noqa: E402

LATENT, HIDDEN, BATCH, LR = 32, 128, 64, 1e-3
LOG2 = math.log(2.0)
K_RLOO = 4
HAND = ("rloo", "arm", "disarm")
K_IWAE = 5
#: every estimator that fits the model, at (nearly) equal decoder evaluations per
#: datapoint and step: name -> (estimator text, story samples, evaluations)
SETTINGS = {
    "rloo": ("rloo", K_RLOO, 4),
    "score": ("score", 4, 4),
    "arm": ("arm", 2, 4),  # an antithetic pair per sample
    "disarm": ("disarm", 2, 4),
    "arms": ("arms(n=4)", 1, 4),
    "double_cv": ("double_cv(n=4)", 1, 4),
    "rebar": ("rebar", 1, 3),  # the sample, its relaxation and the conditional one: 3, the nearest below 4
    "relax": ("relax", 1, 3),
    "gumbel": ("gumbel", 4, 4),
    "st_gumbel": ("st_gumbel", 4, 4),
    "reinmax": ("reinmax", 4, 4),
    "gumbel_rao": ("gumbel_rao", 4, 4),
    "indecater": ("indecater", 1, 2 * LATENT),  # both values of each of the 32 latents: cannot be made equal
    "vimco": (f"vimco(n={K_IWAE})", 1, K_IWAE),  # trains the IWAE bound (K=5), not the ELBO
}
IWAE_STORY = """\
for x_i in plate(X, batch=BATCH):
    logits = enc(x_i)
    z ~ Bernoulli(logits=logits) using {est}
    recon = dec(z)
    log_w = -((softplus(recon) - x_i * recon).sum() + (z * logits - softplus(logits)).sum() + LATENT * LOG2)
    cost -logmeanexp(log_w, over=z)
"""
STORY = """\
for x_i in plate(X, batch=BATCH):
    logits = enc(x_i)
    z ~ Bernoulli(logits=logits)
    recon = dec(z)
    cost (softplus(recon) - x_i * recon).sum() + (z * logits - softplus(logits)).sum() + LATENT * LOG2
"""


def digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data > 7, dtype=torch.float32)


def model(seed: int, d: int = 64, hidden: int = HIDDEN, latent: int = LATENT) -> tuple[nn.Module, nn.Module]:
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        enc = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, latent))
        dec = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, d))
    return enc, dec


def samples_for(est: str) -> int:
    return SETTINGS[est][1]


def story_for(est: str) -> tuple[sn.Story, str]:
    """The story an estimator trains (the ELBO; vimco: the IWAE bound) and the estimator text."""
    text = SETTINGS[est][0]
    if est == "vimco":
        return sn.Story(IWAE_STORY.format(est=text)), "auto"
    return sn.Story(STORY), text


# ------------------------------------------------------------------ hand-written
def neg_elbo(x: torch.Tensor, z: torch.Tensor, logits: torch.Tensor, dec: nn.Module) -> torch.Tensor:
    """-log p(x|z) + log q(z|x) - log p(z), per datapoint (last dim summed)."""
    recon = dec(z)
    return (F.softplus(recon) - x * recon).sum(-1) + (z * logits - F.softplus(logits)).sum(-1) + z.shape[-1] * LOG2


def hand_surrogate(est: str, enc: nn.Module, dec: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient is the estimator's estimate of d/dtheta mean_i E_q[f_i]."""
    logits = enc(x)
    if est == "rloo":
        with torch.no_grad():
            z = torch.bernoulli(torch.sigmoid(logits).expand(K_RLOO, *logits.shape))
        f = neg_elbo(x, z, logits, dec)  # (K, B)
        lq = (z * logits - F.softplus(logits)).sum(-1)
        fd = f.detach()
        baseline = (fd.sum(0) - fd) / (K_RLOO - 1)
        return (f + (fd - baseline) * (lq - lq.detach())).mean()
    pairs = SETTINGS[est][1]
    with torch.no_grad():
        u = torch.rand((pairs, *logits.shape))  # `pairs` antithetic pairs per datapoint
        p = torch.sigmoid(logits)
        b, b_anti = (u < p).to(u.dtype), (u > 1 - p).to(u.dtype)
    f, f_anti = neg_elbo(x, b, logits, dec), neg_elbo(x, b_anti, logits, dec)  # (B,)
    with torch.no_grad():
        if est == "arm":
            g = (f_anti - f)[..., None] * (u - 0.5)
        else:  # disarm
            g = 0.5 * (f - f_anti)[..., None] * (1 - 2 * b_anti) * (b != b_anti) * torch.sigmoid(logits.abs())
    return (0.5 * (f + f_anti) + (g.mean(0) * logits).sum(-1)).mean()


def check_hand_unbiased(calls: int = 200, copies: int = 100) -> list[str]:
    """Each hand-written estimator's mean gradient against the exact one on a tiny
    model (3 latents, 4 pixels, 2 datapoints: 8 configurations each); returns lines."""
    enc, dec = model(7, d=4, hidden=5, latent=3)
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    params = list(enc.parameters())
    configs = torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * 3)  # (8, 3)
    logits = enc(x)  # (2, 3)
    lq = (configs[:, None] * logits - F.softplus(logits)).sum(-1)  # (8, 2)
    exact = (lq.exp() * neg_elbo(x, configs[:, None].expand(8, 2, 3), logits, dec)).sum(0).mean()
    truth = torch.cat([g.reshape(-1) for g in torch.autograd.grad(exact, params)])
    lines = []
    big = x.repeat(copies, 1)  # the mean over copies of the datapoints: one estimate of copies runs
    for est in HAND:
        gs = []
        for _ in range(calls):
            gs.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(hand_surrogate(est, enc, dec, big), params)]))
        g = torch.stack(gs).double()
        se = g.std(0) / math.sqrt(calls)
        z = ((g.mean(0) - truth) / se).abs().max().item()
        lines.append(f"hand {est}: max |mean - exact| / SE over {truth.numel()} encoder entries = {z:.2f} "
                     f"({'ok' if z < 4.5 else 'BIASED?'})")
    return lines


def hand_step(est: str, enc, dec, opt, data: torch.Tensor) -> None:
    idx = torch.randperm(data.shape[0])[:BATCH]
    loss = hand_surrogate(est, enc, dec, data[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# --------------------------------------------------------------------- measures
@torch.no_grad()
def full_neg_elbo(enc, dec, data: torch.Tensor, draws: int = 20) -> float:
    gen = torch.Generator().manual_seed(1234)
    logits = enc(data)
    p = torch.sigmoid(logits).expand(draws, *logits.shape)
    z = torch.bernoulli(p, generator=gen)
    return neg_elbo(data, z, logits, dec).mean().item()


@torch.no_grad()
def full_neg_iwae(enc, dec, data: torch.Tensor, k: int = K_IWAE, draws: int = 4) -> float:
    """The full-data negative IWAE bound with ``k`` particles (mean of ``draws`` estimates)."""
    gen = torch.Generator().manual_seed(4321)
    logits = enc(data)
    p = torch.sigmoid(logits).expand(draws, k, *logits.shape)
    z = torch.bernoulli(p, generator=gen)
    log_w = -neg_elbo(data, z, logits, dec)  # (draws, k, N)
    return -(torch.logsumexp(log_w, 1) - math.log(k)).mean().item()


def namespace(data, enc, dec, batch=BATCH) -> dict:
    return {"X": data, "enc": enc, "dec": dec, "BATCH": batch, "LATENT": LATENT, "LOG2": LOG2}


def train_storch(est: str, seed: int, steps: int, data) -> tuple[float, float, float]:
    enc, dec = model(seed)
    story, text = story_for(est)
    ns = namespace(data, enc, dec)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=LR)
    t0 = time.perf_counter()
    story.train(steps=steps, optimizer=opt, estimator=text, samples=samples_for(est), seed=seed, namespace=ns)
    secs = time.perf_counter() - t0
    return full_neg_elbo(enc, dec, data), secs, full_neg_iwae(enc, dec, data)


def train_hand(est: str, seed: int, steps: int, data) -> tuple[float, float]:
    enc, dec = model(seed)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=LR)
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(steps):
            hand_step(est, enc, dec, opt, data)
    secs = time.perf_counter() - t0
    return full_neg_elbo(enc, dec, data), secs, full_neg_iwae(enc, dec, data)


def step_times(est: str, data, rounds: int) -> tuple[float, float]:
    """Median per-step seconds of storch's train and the hand-written loop (20-step rounds)."""
    enc_s, dec_s = model(0)
    enc_h, dec_h = model(0)
    story = sn.Story(STORY)
    ns = namespace(data, enc_s, dec_s)
    opt_s = torch.optim.Adam([*enc_s.parameters(), *dec_s.parameters()], lr=LR)
    opt_h = torch.optim.Adam([*enc_h.parameters(), *dec_h.parameters()], lr=LR)
    n = 20

    def storch_round():
        story.train(steps=n, optimizer=opt_s, estimator=SETTINGS[est][0], samples=samples_for(est), namespace=ns)

    def hand_round():
        for _ in range(n):
            hand_step(est, enc_h, dec_h, opt_h, data)

    t = race({"storch": storch_round, "hand": hand_round}, rounds=rounds, calls=1, warmup=1)
    return t["storch"].median / n, t["hand"].median / n


def fitted_story(est: str, data, enc, dec, warm: int) -> sn.Story:
    """A story whose learned control variates (rebar, relax) were fitted on ``warm``
    calls on the first 64 datapoints and then frozen, so that every minibatch size
    is measured with the same control variate: what differs is credit assignment
    alone, not how long the fit has run. (The fit's optimizer is dropped from the
    estimator state, which is what option ``lr=0`` does from the start.)"""
    story, text = story_for(est)
    ns = namespace(data[:64], enc, dec, batch=64)
    for _ in range(warm):
        story.run(samples=samples_for(est), estimator=text, namespace=ns)
    for state in story._runner.state.values():
        if isinstance(state, dict) and "cv" in state:
            state["optimizer"] = None
    return story


def encoder_variance_x_n(est: str, data, n: int, reps: int, side: str, warm: int) -> float:
    """N times the encoder gradient's total variance on minibatches of N of the first 64
    datapoints, averaged over the 64/N minibatches (see the module docstring)."""
    enc, dec = model(0)
    params = list(enc.parameters())
    story = fitted_story(est, data, enc, dec, warm) if side == "storch" else None
    out = []
    for start in range(0, 64, n):
        x = data[start : start + n]
        if side == "hand":
            gs = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(hand_surrogate(est, enc, dec, x), params)])
                  for _ in range(reps)]
            g = torch.stack(gs)
        else:
            ns = namespace(x, enc, dec, batch=n)
            res = story.run(samples=samples_for(est), estimator=story_for(est)[1], runs=reps, namespace=ns)
            g = torch.cat([res.grads[f"enc.{k}"].reshape(reps, -1) for k, _ in enc.named_parameters()], 1)
        out.append(g.double().var(0).sum().item() * n)
    return statistics.fmean(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--estimators", default=",".join(SETTINGS))
    ap.add_argument("--quick", action="store_true", help="a smoke run: 100 steps, one seed, few repetitions")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = args.steps
    reps = {1: 25, 16: 100, 64: 400}
    rounds = 9
    if args.quick:
        steps, seeds, reps, rounds = 100, seeds[:1], {1: 4, 16: 10, 64: 40}, 3
    ests = [e.strip() for e in args.estimators.split(",") if e.strip()]
    data = digits()
    print(f"storch_nb {sn.__version__ if hasattr(sn, '__version__') else ''} torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); digits {tuple(data.shape)}; batch {BATCH}; "
          f"{steps} steps; seeds {seeds}")
    for line in check_hand_unbiased(calls=40 if args.quick else 200):
        print(line)
    rows = []
    for est in ests:
        row = {"est": est}
        s_t, h_t = step_times(est, data, rounds) if est in HAND else (None, None)
        row["step"] = (s_t, h_t)
        s_elbo = [train_storch(est, s, steps, data) for s in seeds]
        row["storch_elbo"] = [e for e, _, _ in s_elbo]
        row["storch_iwae"] = [w for _, _, w in s_elbo]
        row["storch_secs"] = statistics.fmean(t for _, t, _ in s_elbo) / steps
        if est in HAND:
            h_elbo = [train_hand(est, s, steps, data) for s in seeds]
            row["hand_elbo"] = [e for e, _, _ in h_elbo]
        warm = 100 if est in ("rebar", "relax") else 0
        row["var"] = {n: encoder_variance_x_n(est, data, n, r, "storch", warm) for n, r in reps.items()}
        if est in HAND:
            row["hand_var"] = {n: encoder_variance_x_n(est, data, n, r, "hand", 0) for n, r in reps.items()}
        rows.append(row)
        print_row(row, steps)
    print()
    print_table(rows, steps, len(seeds))
    return 0


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.2f} ms"


def _mean_se(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return f"{m:.2f} ± {se:.2f}" if se == se else f"{m:.2f}"


def print_row(row: dict, steps: int) -> None:
    s_t, h_t = row["step"]
    ratio = f"{s_t / h_t:.2f}x" if s_t and h_t else "-"
    v = row["var"]
    print(f"{row['est']} ({SETTINGS[row['est']][2]} evaluations): step storch {_ms(s_t or row['storch_secs'])}, "
          f"hand {_ms(h_t)} ({ratio}); "
          f"-ELBO after {steps} steps storch {_mean_se(row['storch_elbo'])}, hand {_mean_se(row.get('hand_elbo', []))}, "
          f"-IWAE(K={K_IWAE}) {_mean_se(row['storch_iwae'])}; "
          f"Var x N at N=1/16/64 storch {v[1]:.1f} / {v[16]:.1f} / {v[64]:.1f} (64 vs 1: {v[64] / v[1]:.2f}x)"
          + (f", hand {row['hand_var'][1]:.1f} / {row['hand_var'][16]:.1f} / {row['hand_var'][64]:.1f}"
             if "hand_var" in row else ""), flush=True)


def print_table(rows: list[dict], steps: int, n_seeds: int) -> None:
    print(f"| estimator | evaluations | step storch | step hand | ratio | -ELBO storch ({steps} steps, {n_seeds} seeds) "
          f"| -ELBO hand | -IWAE (K={K_IWAE}) storch | Var x N storch (N=1 / 16 / 64) | 64 vs 1 "
          "| Var x N hand (N=1 / 16 / 64) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        s_t, h_t = row["step"]
        v = row["var"]
        hv = row.get("hand_var")
        print(f"| {SETTINGS[row['est']][0]} | {SETTINGS[row['est']][2]} | {_ms(s_t or row['storch_secs'])} | "
              f"{_ms(h_t)} | {f'{s_t / h_t:.2f}x' if s_t and h_t else '-'} | {_mean_se(row['storch_elbo'])} | "
              f"{_mean_se(row.get('hand_elbo', []))} | {_mean_se(row['storch_iwae'])} | "
              f"{v[1]:.1f} / {v[16]:.1f} / {v[64]:.1f} | {v[64] / v[1]:.2f}x | "
              + (f"{hv[1]:.1f} / {hv[16]:.1f} / {hv[64]:.1f} |" if hv else "- |"))


if __name__ == "__main__":
    raise SystemExit(main())
