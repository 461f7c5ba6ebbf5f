"""What a run gives back: :class:`Result` and :class:`Comparison`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Result:
    """The outcome of ``Story.run`` (or ``Story.exact``).

    ``grads[name]`` has the parameter's shape, or ``(runs, *shape)`` with
    ``runs > 1``. ``stderr[name]`` is the standard error of the gradient
    estimate (per-sample contributions with ``runs == 1``, the spread over
    runs divided by ``sqrt(runs)`` otherwise), or None when not computed.
    """

    grads: dict[str, torch.Tensor]
    cost: float
    params: dict[str, torch.Tensor]
    estimators: dict[str, str]
    samples: int
    runs: int
    device: str
    seconds: float
    dtype: torch.dtype = torch.float32
    stderr: dict[str, torch.Tensor] | None = None
    cost_stderr: float | None = None
    exact: bool = False
    costs: torch.Tensor | None = field(default=None, repr=False)  # per-run cost estimates
    #: ``compile=True``: seconds this call spent capturing and compiling the pass (0.0 where a
    #: compiled pass was reused); None where the call ran eagerly
    compile_seconds: float | None = None

    def mean_grads(self) -> dict[str, torch.Tensor]:
        """The gradient estimate, averaged over runs when ``runs > 1``."""
        if self.runs == 1:
            return dict(self.grads)
        return {k: v.mean(0) for k, v in self.grads.items()}

    def __repr__(self) -> str:
        what = "exact" if self.exact else f"samples={self.samples}, runs={self.runs}"
        lines = [f"Result({what}, device={self.device}, {self.seconds * 1e3:.2f} ms)"]
        lines.append(f"  cost = {self.cost:.6g}")
        for k, g in self.mean_grads().items():
            se = self.stderr.get(k) if self.stderr else None
            gs = _fmt(g)
            lines.append(f"  d cost / d {k} = {gs}" + (f"  (± {_fmt(se)})" if se is not None else ""))
        if self.estimators:
            lines.append("  estimators: " + ", ".join(f"{k}: {v}" for k, v in self.estimators.items()))
        return "\n".join(lines)


def make_result(ex, grads: dict, cost: float, params: dict, samples: int, runs: int, device, dtype, t0: float,
                stderr: dict | None = None, cost_stderr: float | None = None, costs: torch.Tensor | None = None,
                exact: bool = False) -> Result:
    """A :class:`Result` of a pass ``ex`` (for the estimators it used), timed from ``t0``."""
    return Result(
        grads=grads,
        cost=cost,
        params=params,
        estimators={k: ("enumerate" if exact else v[1].text()) for k, v in ex.sites.items()},
        samples=samples,
        runs=runs,
        device=str(device),
        seconds=time.perf_counter() - t0,
        dtype=dtype,
        stderr=stderr,
        cost_stderr=cost_stderr,
        costs=costs,
        exact=exact,
    )


def _fmt(t: torch.Tensor) -> str:
    t = t.detach().cpu()
    if t.numel() == 1:
        return f"{t.item():.6g}"
    return "[" + ", ".join(f"{x:.4g}" for x in t.flatten().tolist()[:8]) + (", ...]" if t.numel() > 8 else "]")


@dataclass
class Comparison:
    """The outcome of ``Story.compare``: one row per (estimator, parameter entry)."""

    table: list[dict]
    results: dict[str, Result]
    reference: Result | None
    samples: int
    runs: int

    def row(self, estimator: str, param: str) -> dict:
        for r in self.table:
            if r["estimator"] == estimator and r["param"] == param:
                return r
        raise KeyError((estimator, param))

    def __repr__(self) -> str:
        head = f"{'estimator':<28} {'param':<10} {'mean':>11} {'std':>11} {'variance':>11} {'bias':>11} {'seconds':>9}"
        lines = [f"Comparison(samples={self.samples}, runs={self.runs})", head]
        for r in self.table:
            bias = "-" if r["bias"] is None else f"{r['bias']:.4g}"
            lines.append(
                f"{r['estimator']:<28} {r['param']:<10} {r['mean']:>11.4g} {r['std']:>11.4g} "
                f"{r['variance']:>11.4g} {bias:>11} {r['seconds']:>9.4f}"
            )
        return "\n".join(lines)
