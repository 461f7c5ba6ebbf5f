"""Shared fixtures: the seed story, its closed forms, and small statistics helpers.

Every statistical test in this suite compares an estimate with a closed form
(or ``story.exact()``) within ``k`` standard errors, where the standard error
is computed from theory or from the runs themselves. With k = 4 a correct
estimator fails a single check with probability ~6e-5 (Gaussian tail), and
every test uses a fixed seed, so the suite is deterministic.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
try:  # run from a checkout without installing
    import storch_nb  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(ROOT))

SEED_STORY = """\
a = param(1.0)
b = param(2.0)
c = param(0.5)
d = a + b
e ~ Normal(c + b, 1)
f = d * e**2
cost f
"""


def seed_story_text(a: float = 1.0, b: float = 2.0, c: float = 0.5) -> str:
    """The seed story with other parameter values (same line numbers)."""
    return (
        SEED_STORY.replace("param(1.0)", f"param({a!r})", 1)
        .replace("param(2.0)", f"param({b!r})", 1)
        .replace("param(0.5)", f"param({c!r})", 1)
    )


def seed_truth(a: float = 1.0, b: float = 2.0, c: float = 0.5) -> dict:
    """Closed forms for the seed story: E[f] = (a+b)((c+b)^2+1) and its derivatives."""
    s, u = a + b, c + b
    return {
        "cost": s * (u * u + 1),
        "a": u * u + 1,
        "b": u * u + 1 + 2 * s * u,
        "c": 2 * s * u,
        # Hessian in the order (a, b, c)
        "hessian": [[0.0, 2 * u, 2 * u], [2 * u, 4 * u + 2 * s, 2 * u + 2 * s], [2 * u, 2 * u + 2 * s, 2 * s]],
    }


def bernoulli_text(t: float, p0: float, using: str = "") -> str:
    """The Bernoulli toy: b ~ Bernoulli(logits=t), cost (b - p0)**2."""
    suffix = f" using {using}" if using else ""
    return f"t = param({t!r})\nb ~ Bernoulli(logits=t){suffix}\ncost (b - {p0!r})**2\n"


def bernoulli_truth(t: float, p0: float) -> dict:
    """Exact gradient and single-sample score-function variance of the Bernoulli toy.

    g = sigmoid'(t) (1 - 2 p0); the single-sample score estimate is
    f(b) (b - p) with p = sigmoid(t), so Var_1 = E[f^2 (b - p)^2] - g^2 and the
    S-sample variance is Var_1 / S (NOTES.md).
    """
    p = 1.0 / (1.0 + math.exp(-t))
    g = p * (1 - p) * (1 - 2 * p0)
    second = p * (1 - p0) ** 4 * (1 - p) ** 2 + (1 - p) * p0**4 * p**2
    return {
        "p": p,
        "grad": g,
        "cost": p * (1 - p0) ** 2 + (1 - p) * p0**2,
        "var1": second - g * g,
        # d2E/dt2 = sigmoid''(t) (1 - 2 p0), sigmoid'' = p (1-p) (1-2p)
        "hess": p * (1 - p) * (1 - 2 * p) * (1 - 2 * p0),
    }


def assert_within(estimate, truth, se, k: float = 4.0, atol: float = 0.0, what: str = "") -> None:
    """|estimate - truth| <= k * se + atol, entrywise, with a readable message."""
    est = torch.as_tensor(estimate, dtype=torch.float64).detach().cpu()
    tru = torch.as_tensor(truth, dtype=torch.float64).detach().cpu()
    err = torch.as_tensor(se, dtype=torch.float64).detach().cpu()
    bound = k * err + atol
    gap = (est - tru).abs()
    assert bool((gap <= bound).all()), (
        f"{what}: estimate {est.tolist()} vs truth {tru.tolist()}: gap {gap.tolist()} > {k} SE + {atol} = {bound.tolist()}"
    )


def variance_se(x: torch.Tensor) -> float:
    """Standard error of the unbiased sample variance of iid ``x``, from its
    empirical fourth central moment: Var(s^2) ~= (mu4 - sigma^4) / R."""
    x = x.detach().double().flatten()
    r = x.numel()
    d = x - x.mean()
    m2 = (d * d).mean()
    m4 = (d**4).mean()
    return math.sqrt(max((m4 - m2 * m2).item(), 0.0) / r)


@pytest.fixture
def seed_text() -> str:
    return SEED_STORY


@pytest.fixture
def seed_story():
    import storch_nb as sn

    return sn.Story(SEED_STORY)


def surrogate_hessian(story, estimator: str, samples: int, seed: int, names: list[str]) -> torch.Tensor:
    """The Hessian of ``story.surrogate(...)`` (create_graph=True, twice), flattened."""
    loss = story.surrogate(samples=samples, estimator=estimator, seed=seed, dtype="float64")
    params = [story.params[n] for n in names]
    flat = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    rows = []
    for i in range(flat.numel()):
        hs = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1) for h, p in zip(hs, params)]))
    return torch.stack(rows)


def check_hessian(story, estimator: str, samples: int, names: list[str], truth, seeds: int = 20) -> None:
    """Mean Hessian over ``seeds`` surrogates within 4 SE (spread over seeds / sqrt(seeds);
    with 19 degrees of freedom a correct estimator fails one entry with probability ~1e-3)."""
    hs = torch.stack([surrogate_hessian(story, estimator, samples, 500 + s, names) for s in range(seeds)])
    truth = torch.as_tensor(truth, dtype=torch.float64)
    assert_within(hs.mean(0), truth, hs.std(0) / math.sqrt(seeds), atol=1e-9, what=f"{estimator} Hessian")
    torch.testing.assert_close(hs, hs.transpose(1, 2), rtol=1e-6, atol=1e-8)
