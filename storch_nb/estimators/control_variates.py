"""Control-variate estimators with relaxations: REBAR and RELAX (Bernoulli sites).

With logits ``theta``, ``p = sigmoid(theta)``, ``u, v ~ U(0, 1)``::

    z  = theta + logit(u)                      b = H(z) = 1[z > 0]      (b ~ Bernoulli(p))
    u~ = v * (1 - p)          if b = 0         (u conditioned on b: z~ ~ p(z | b))
    u~ = (1 - p) + v * p      if b = 1
    z~ = theta + logit(u~)

* REBAR (Tucker et al., 2017, "REBAR: Low-variance, unbiased gradient
  estimates for discrete latent variable models"), with the relaxation
  ``c(z) = f(sigmoid(z / lambda))``::

      g = [f(b) - eta c(z~)] d/dtheta log p(b) + eta d/dtheta c(z) - eta d/dtheta c(z~)

* RELAX (Grathwohl et al., 2018, "Backpropagation through the Void"), with
  a learned control variate ``c_phi(z) = eta f(sigmoid(z / lambda)) + r_rho(z)``,
  ``r_rho(z) = sum_i rho_0 + rho_1 sigmoid(z_i) + rho_2 sigmoid(z_i)^2``::

      g = [f(b) - c_phi(z~)] d/dtheta log p(b) + d/dtheta c_phi(z) - d/dtheta c_phi(z~)

Both are unbiased for any value of their control-variate parameters, which
the engine trains after every ``Story.run`` (Adam, option ``lr``) to minimise
the variance proxy ``sum g^2`` (its gradient equals that of the variance,
since ``E[g]`` does not depend on them). The state lives on the Story, per
site and per run, and ``story.reset()`` clears it. Each estimate evaluates
the downstream story three times per particle (at ``b``, ``sigmoid(z/lambda)``
and ``sigmoid(z~/lambda)``), so the cost must accept relaxed values in [0, 1].
Note: the conditional sample uses ``log(1 - p)`` terms (through ``1 - p``),
not ``log1p(p)``, which is the bias Storchastic's implementation has.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributions import Bernoulli, Distribution

from ..errors import EstimatorError
from .base import Estimator, first_order, plate_select, register_estimator, site_sum


def _per_run(p: torch.Tensor, state: dict, dim: int, own: int) -> torch.Tensor:
    """View a per-run parameter (shape (R,) or ()) against a site tensor."""
    if state.get("runs") is None:
        return p
    return p.reshape((p.shape[0],) + (1,) * (dim + own))


class _Learned(Estimator):
    """Control-variate parameters in ``state["cv"]``, optimised by ``state["optimizer"]``."""

    trainable = True

    def cv_parameters(self, state: dict) -> list[torch.Tensor]:
        return list(state["cv"].values()) if "cv" in state else []

    def cv_step(self, state: dict, grads: list[torch.Tensor | None]) -> None:
        opt = state.get("optimizer")
        if opt is None:
            return
        for p, g in zip(self.cv_parameters(state), grads):
            p.grad = None if g is None else g.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)


class _Relaxed(_Learned):
    plated = True
    higher_order = False  # first-order surrogate: second derivatives are refused
    trainable = True
    options = {"temperature": 0.5, "eta": 1.0, "lr": 0.01}
    learned_r = False

    def __init__(self, n: int | None = None, **options) -> None:
        super().__init__(n=n, **options)
        t, lr = self.opts["temperature"], self.opts["lr"]
        if not isinstance(t, (int, float)) or t <= 0:
            raise EstimatorError(f"temperature must be a positive number, not {t!r}")
        if not isinstance(lr, (int, float)) or lr < 0:
            raise EstimatorError(f"lr must be a number >= 0, not {lr!r}")

    def fits(self, dist: Distribution) -> str | None:
        if not isinstance(dist, Bernoulli):
            return "it works for Bernoulli sites only"
        if self.n is not None:
            return "option n does not apply (the relaxations are its own plate)"
        return None

    def plate_size(self, dist: Distribution) -> int:
        return 3

    def params(self, state: dict, like: torch.Tensor) -> dict[str, torch.Tensor]:
        cv = state.get("cv")
        if cv is None:
            shape = (state["runs"],) if state.get("runs") is not None else ()
            kw = {"dtype": like.dtype, "device": like.device}
            cv = {
                "eta": torch.full(shape, float(self.opts["eta"]), **kw).requires_grad_(True),
                "log_temperature": torch.full(shape, math.log(self.opts["temperature"]), **kw).requires_grad_(True),
            }
            if self.learned_r:
                cv["rho"] = torch.zeros(shape + (3,), **kw).requires_grad_(True)
            state["cv"] = cv
            state["optimizer"] = torch.optim.Adam(list(cv.values()), lr=self.opts["lr"]) if self.opts["lr"] > 0 else None
        return cv

    def sample_variants(self, dist: Distribution, dim: int, size: int, state: dict) -> tuple[torch.Tensor, Any]:
        theta = dist.logits
        own = theta.dim() - dim - 1
        cv = self.params(state, theta)
        temp = _per_run(cv["log_temperature"], state, dim, own).exp()
        eps = torch.finfo(theta.dtype).eps
        with torch.no_grad():
            u = torch.rand(theta.shape, dtype=theta.dtype, device=theta.device).clamp(eps, 1 - eps)
            v = torch.rand(theta.shape, dtype=theta.dtype, device=theta.device).clamp(eps, 1 - eps)
        p = torch.sigmoid(theta)
        z = theta + torch.log(u) - torch.log1p(-u)
        b = (z > 0).to(theta.dtype).detach()
        u_cond = (b * ((1 - p) + v * p) + (1 - b) * (v * (1 - p))).clamp(eps, 1 - eps)
        z_cond = theta + torch.log(u_cond) - torch.log1p(-u_cond)
        soft, soft_cond = torch.sigmoid(z / temp), torch.sigmoid(z_cond / temp)
        value = torch.cat([b, soft, soft_cond], dim=dim)
        log_p = dist.log_prob(b)
        return value, {"theta": theta, "log_p": log_p, "z": z, "z_cond": z_cond, "cv": cv, "state": state, "own": own}

    def r(self, aux: dict, z: torch.Tensor, dim: int) -> torch.Tensor | None:
        return None

    def reduce_plate(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        state, cv = aux["state"], aux["cv"]
        f = plate_select(term, dim, 0)
        c_z, c_cond = plate_select(term, dim, 1), plate_select(term, dim, 2)
        eta = cv["eta"] if state.get("runs") is None else cv["eta"].reshape((-1,) + (1,) * (f.dim() - 1))
        c_z, c_cond = eta * c_z, eta * c_cond
        r_z, r_cond = self.r(aux, aux["z"], dim), self.r(aux, aux["z_cond"], dim)
        if r_z is not None:
            c_z, c_cond = c_z + r_z, c_cond + r_cond
        log_p = site_sum(aux["log_p"], dim)
        signal = f.detach() - c_cond
        return f + signal * first_order(log_p) + first_order(c_z - c_cond)


@register_estimator("rebar")
class REBAR(_Relaxed):
    """REBAR: relaxation ``f(sigmoid(z / lambda))`` scaled by ``eta``, both learned."""


@register_estimator("relax")
class RELAX(_Relaxed):
    """RELAX: REBAR's control variate plus a learned per-entry quadratic ``r_rho(z)``."""

    learned_r = True

    def r(self, aux: dict, z: torch.Tensor, dim: int) -> torch.Tensor:
        state, own = aux["state"], aux["own"]
        rho = aux["cv"]["rho"]
        if state.get("runs") is not None:
            rho = rho.reshape((rho.shape[0],) + (1,) * (dim + own) + (3,))
        s = torch.sigmoid(z)
        val = rho[..., 0] + rho[..., 1] * s + rho[..., 2] * s * s
        return site_sum(val, dim)


__all__ = ["REBAR", "RELAX", "LAX"]


@register_estimator("lax")
class LAX(_Learned):
    """LAX (Grathwohl et al., ICLR 2018, "Backpropagation through the Void:
    Optimizing control variates for black-box gradient estimation"), for
    continuous sites with a reparameterized sampler ``b = T(theta, eps)``::

        g = [f(b) - c_phi(b)] d/dtheta log p(b; theta) + d/dtheta c_phi(T(theta, eps))

    where the score term treats ``b`` as a fixed sample and the last term
    differentiates the control variate through the reparameterized draw. The
    two ``c_phi`` terms have the same expectation, so ``g`` is unbiased for any
    ``phi``, and ``f`` need not be differentiable (one evaluation per particle,
    at ``b``). The control variate is a per-entry quadratic summed over the
    site's entries, ``c_phi(b) = sum_i phi_0 + phi_1 b_i + phi_2 b_i^2``, one
    ``phi`` per run, starting at zero (where LAX is the plain score function).
    The engine trains ``phi`` after every ``Story.run`` by Adam (option ``lr``)
    on ``sum g^2``, whose gradient is that of the variance of ``g``. The cost
    estimate is ``f(b)``. With several costs downstream of the site each gets
    the same control variate (still unbiased).

    The site's surrogate is the DiCE form ``box(l) f + (1 - box(l)) c_phi(b) +
    first_order(c_phi(T(theta, eps)))`` with ``l = log p(b)`` and
    ``box(l) = exp(l - stop_grad(l))``: its value is ``f(b)``, its first
    derivative ``g``, and its second derivative is unbiased too (the two
    control-variate terms estimate the same Hessian of ``E c_phi`` by the
    score function and pathwise, and cancel in expectation).
    """

    plated = True
    trainable = True
    options = {"lr": 0.05}

    def __init__(self, n: int | None = None, **options) -> None:
        super().__init__(n=n, **options)
        lr = self.opts["lr"]
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
            raise EstimatorError(f"lr must be a number >= 0, not {lr!r}")

    def fits(self, dist: Distribution) -> str | None:
        if not dist.has_rsample:
            return "it needs a continuous site with a reparameterized sampler (rsample); for Bernoulli sites use relax"
        if self.n is not None:
            return "option n does not apply (the site's variant is its own plate)"
        return None

    def plate_size(self, dist: Distribution) -> int:
        return 1

    def params(self, state: dict, like: torch.Tensor) -> dict[str, torch.Tensor]:
        cv = state.get("cv")
        if cv is None or state.get("owner") != self.text():  # fresh, or left by another estimator
            shape = (state["runs"],) if state.get("runs") is not None else ()
            phi = torch.zeros(shape + (3,), dtype=like.dtype, device=like.device).requires_grad_(True)
            cv = state["cv"] = {"phi": phi}
            state["owner"] = self.text()
            state["optimizer"] = torch.optim.Adam([phi], lr=self.opts["lr"]) if self.opts["lr"] > 0 else None
        return cv

    def sample_variants(self, dist: Distribution, dim: int, size: int, state: dict) -> tuple[torch.Tensor, Any]:
        b = dist.rsample()
        cv = self.params(state, b)
        log_p = dist.log_prob(b.detach())
        return b.detach(), {"b": b, "log_p": log_p, "phi": cv["phi"], "state": state, "own": b.dim() - dim - 1}

    @staticmethod
    def control_variate(aux: dict, b: torch.Tensor, dim: int) -> torch.Tensor:
        """``c_phi(b)``, summed over the site's entries (one value per particle)."""
        phi, state, own = aux["phi"], aux["state"], aux["own"]
        phi0, phi1, phi2 = (_per_run(phi[..., j], state, dim, own) for j in range(3))
        return site_sum(phi0 + phi1 * b + phi2 * b * b, dim)

    def reduce_plate(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        f = term.squeeze(dim)
        b = aux["b"]
        c_fixed = self.control_variate(aux, b.detach(), dim)  # depends on phi only
        c_path = self.control_variate(aux, b, dim)  # through the reparameterized draw
        log_p = site_sum(aux["log_p"], dim)
        box = torch.exp(log_p - log_p.detach())
        return box * f + (1 - box) * c_fixed + first_order(c_path)
