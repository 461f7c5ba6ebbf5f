"""The score function estimator (REINFORCE) and its baselines.

    d/dtheta E_{x~p(x;theta)}[f(x)] = E[ (f(x) - b) * d/dtheta log p(x;theta) ]

for any ``b`` that does not depend on ``x`` (Williams, 1992, "Simple
Statistical Gradient-Following Algorithms for Connectionist Reinforcement
Learning"; Glynn, 1990). In the surrogate the site's log-probability enters
the DiCE magic box and the baseline enters as ``(1 - box(l)) * b`` (Mao et
al., 2019), so derivatives of every order stay unbiased.

Baselines:

* ``None``: plain score function.
* ``"moving_average"``: ``b_t = decay * b_{t-1} + (1 - decay) * mean(f)``,
  starting at 0 and updated only *after* the estimate has used ``b_{t-1}``;
  state lives on the Story, per site, cost and run.
* ``"batch_average"``: ``b = mean_j f_j`` over the samples, the sample's own
  cost included. This is the usual "batch average" and is biased by exactly
  the factor ``(1 - 1/S)`` on the gradient; use ``rloo`` for the unbiased form.
* ``"rloo"``: leave-one-out, ``b_i = (sum_j f_j - f_i) / (S - 1)`` (Kool, van
  Hoof & Welling, 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!").
  Unbiased; needs at least two samples.
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution

from ..errors import EstimatorError
from .base import Estimator, register_estimator

BASELINES = (None, "moving_average", "batch_average", "rloo")


@register_estimator("score", "reinforce")
class ScoreFunction(Estimator):
    """Score function (REINFORCE), options ``baseline`` and ``decay``."""

    scored = True
    options = {"baseline": None, "decay": 0.9}

    def __init__(self, n: int | None = None, **options) -> None:
        super().__init__(n=n, **options)
        if self.opts["baseline"] not in BASELINES:
            raise EstimatorError(
                f"unknown baseline {self.opts['baseline']!r}",
                hint="baseline is one of None, 'moving_average', 'batch_average', 'rloo'",
            )
        decay = self.opts["decay"]
        if not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise EstimatorError(f"decay must be a number in [0, 1), not {decay!r}")

    def fits(self, dist: Distribution) -> str | None:
        return None  # the score function applies to every distribution

    def baseline(self, signal: torch.Tensor, dim: int, state: dict) -> torch.Tensor | None:
        kind = self.opts["baseline"]
        if kind is None:
            return None
        if kind == "moving_average":
            return state.get("average", 0.0)
        size = signal.shape[dim]
        if kind == "batch_average":
            return signal.mean(dim, keepdim=True)
        if size < 2:
            raise EstimatorError(
                "the rloo baseline needs at least 2 samples to leave one out",
                hint="use samples >= 2, option n=K with K >= 2, or baseline=None",
            )
        return (signal.sum(dim, keepdim=True) - signal) / (size - 1)

    def update(self, signal: torch.Tensor, dim: int, state: dict) -> None:
        if self.opts["baseline"] != "moving_average":
            return
        decay = self.opts["decay"]
        run_dims = state.get("run_dims", 0)
        mean = signal.mean(tuple(range(run_dims, signal.dim())), keepdim=True) if signal.dim() > run_dims else signal
        state["average"] = decay * state.get("average", 0.0) + (1 - decay) * mean


@register_estimator("rloo")
class LeaveOneOut(ScoreFunction):
    """Score function with the leave-one-out baseline (= ``score(baseline='rloo')``)."""

    options = {"baseline": "rloo", "decay": 0.9}

    def _make_text(self) -> str:
        return "rloo" if self.n is None else f"rloo(n={self.n})"
