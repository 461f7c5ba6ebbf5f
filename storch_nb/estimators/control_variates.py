"""Control-variate estimators with relaxations: REBAR and RELAX (Bernoulli,
Categorical and OneHotCategorical sites), and LAX (continuous sites).

For a Categorical or OneHotCategorical site the relaxation is the Gumbel-max
one: ``z = theta + G`` (Gumbel noise), ``b = onehot(argmax z)``, ``z~`` the
perturbed logits given ``b`` (the largest ``logsumexp(theta)`` plus a Gumbel,
every other a Gumbel truncated below it: ``straight_through.perturbed_given_argmax``,
differentiable in ``theta``), ``softmax(z / lambda)`` in place of
``sigmoid(z / lambda)`` and, for RELAX, ``r_rho`` over the softmax's entries
(Tucker et al., 2017, section 3.2). What follows is written for Bernoulli sites.

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
the engine fits after every ``Story.run`` to minimise the variance proxy
``sum g^2`` (its gradient equals that of the variance, since ``E[g]`` does not
depend on them): the coefficients, in which ``g`` is linear, by least squares
on exponentially averaged statistics of the draws seen so far (options
``ema``, ``ridge``; see ``_Relaxed.cv_step``), and the temperature ``lambda``
by Adam (option ``lr``; ``lr=0`` freezes everything). With ``runs > 1`` the
runs (independent replicas of one problem) share one fit on all their draws;
with one batch of samples the proxy sums the squares of the per-sample
estimates, which pins the coefficients down far faster than the square of
their mean. The state lives on the Story, per site, and ``story.reset()``
clears it.

With several samples (option ``loo``, on by default) the score term's signal
also loses ``beta`` times the mean cost of the *other* samples of the batch
(independent of the sample, so ``g`` stays unbiased; with ``beta = 1`` this is
the leave-one-out baseline of Kool et al., 2019, "Buy 4 REINFORCE samples, get
a baseline for free!"). ``beta`` is fitted with the other coefficients and
starts at 1. REBAR starts at ``eta = 1``; RELAX starts with ``eta = rho = 0``,
where it *is* RLOO, so its first estimate, made before anything is fitted,
is already a good one (a poor first control variate would send a large first
gradient to the optimiser). Measured on ``cost (b - 0.499)**2`` (200 Adam
steps, lr 0.1, 20 samples): RELAX drives ``sigmoid(t)`` to 0.004-0.005 over
ten seeds, like RLOO; with the coefficients trained by Adam instead it stayed
near 0.5.

Each estimate evaluates
the downstream story three times per particle (at ``b``, ``sigmoid(z/lambda)``
and ``sigmoid(z~/lambda)``), so the cost must accept relaxed values in [0, 1].
Note: the conditional sample uses ``log(1 - p)`` terms (through ``1 - p``),
not ``log1p(p)``, which is the bias Storchastic's implementation has.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributions import Bernoulli, Categorical, Distribution, OneHotCategorical

from ..errors import EstimatorError
from .base import Estimator, first_order, plate_select, register_estimator, site_sum
from .straight_through import gumbel_noise, perturbed_given_argmax


def _hessian_rows(grad: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
    """``d grad[i] / d lin[j]`` for every ``i, j`` (a k x k matrix), with the ``k``
    backward passes batched into one where autograd can (vmap)."""
    eye = torch.eye(len(lin), dtype=grad.dtype, device=grad.device)
    try:
        (rows,) = torch.autograd.grad(grad, lin, grad_outputs=eye, retain_graph=True, is_grads_batched=True)
        return rows.detach()
    except RuntimeError:  # an op without a batching rule: one pass per coefficient
        rows = [torch.autograd.grad(grad[i], lin, retain_graph=True, allow_unused=True)[0] for i in range(len(lin))]
        return torch.stack([torch.zeros_like(lin) if r is None else r for r in rows]).detach()


def _per_run(p: torch.Tensor, state: dict, dim: int, own: int) -> torch.Tensor:
    """View a per-run parameter (shape (R,) or ()) against a site tensor."""
    if state.get("runs") is None:
        return p
    return p.reshape((p.shape[0],) + (1,) * (dim + own))


class _Adam:
    """Adam (Kingma & Ba, 2015) with torch's defaults (betas 0.9, 0.999, eps 1e-8),
    the same arithmetic as ``torch.optim.Adam``'s single-tensor path, for the
    handful of control-variate parameters. Not ``torch.optim.Adam`` itself: its
    first step imports ``torch._dynamo`` (1.3-1.6 s here), which the lab would
    pay on its first switch to a learned estimator (target: 300 ms a switch)."""

    def __init__(self, params: list[torch.Tensor], lr: float) -> None:
        self.params, self.lr, self.t = params, lr, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor | None]) -> None:
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        self.t += 1
        c1, c2 = 1 - beta1**self.t, (1 - beta2**self.t) ** 0.5
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            if g is None:
                continue
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            p.addcdiv_(m, (v.sqrt() / c2).add_(eps), value=-self.lr / c1)


class _Learned(Estimator):
    """Control-variate parameters in ``state["cv"]``, optimised by ``state["optimizer"]``."""

    trainable = True

    def cv_parameters(self, state: dict) -> list[torch.Tensor]:
        return list(state["cv"].values()) if "cv" in state else []

    def cv_step(self, state: dict, prepared: list[torch.Tensor | None]) -> None:
        opt = state.get("optimizer")
        if opt is not None:
            opt.step(prepared)


class _Relaxed(_Learned):
    plated = True
    joint_variants = True
    state_per_run = False  # one coefficient vector and temperature, pooled over runs
    higher_order = False  # first-order surrogate: second derivatives are refused
    trainable = True
    cv_second_order = True
    options = {"temperature": 0.5, "eta": 1.0, "lr": 0.01, "ema": 0.9, "ridge": 1e-5, "loo": True}
    learned_r = False

    def __init__(self, n: int | None = None, **options) -> None:
        super().__init__(n=n, **options)
        o = self.opts
        name = self.name
        example = f"e.g. {name}(temperature=0.5, eta={self.options['eta']}, lr=0.01, ema=0.9, ridge=1e-5, loo=True)"
        for key, low, strict in (("temperature", 0, True), ("lr", 0, False), ("ridge", 0, False), ("ema", 0, False)):
            v = o[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (v <= low if strict else v < low):
                raise EstimatorError(f"{name}: {key} must be a number {'>' if strict else '>='} {low}, not {v!r}",
                                     hint=example)
        if not o["ema"] < 1:
            raise EstimatorError(f"{name}: ema must be below 1, not {o['ema']!r}",
                                 hint="ema is the decay of the averaged fit statistics: 0 uses the last call only, 0.9 about ten")
        if isinstance(o["eta"], bool) or not isinstance(o["eta"], (int, float)):
            raise EstimatorError(f"{name}: eta must be a number, not {o['eta']!r}", hint=example)
        if not isinstance(o["loo"], bool):
            raise EstimatorError(f"{name}: loo must be True or False, not {o['loo']!r}", hint=example)

    def fits_class(self, cls: type) -> str | None:
        if not issubclass(cls, (Bernoulli, Categorical, OneHotCategorical)):
            return "it works for Bernoulli, Categorical and OneHotCategorical sites only"
        if self.n is not None:
            return "option n does not apply (the relaxations are its own plate)"
        return None

    def fits(self, dist: Distribution) -> str | None:
        return self.fits_class(type(dist))

    def plate_size(self, dist: Distribution) -> int:
        return 3

    def params(self, state: dict, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """``cv["lin"]``: the linear coefficients ``(eta[, rho_0, rho_1, rho_2][, beta])``;
        ``cv["log_temperature"]``: ``log lambda``. One of each, shared by all runs
        (independent replicas of one problem, fitted together)."""
        cv = state.get("cv")
        if cv is None:
            kw = {"dtype": like.dtype, "device": like.device}
            lin = torch.zeros(1 + 3 * self.learned_r + self.opts["loo"], **kw)
            lin[0] = float(self.opts["eta"])
            if self.opts["loo"]:
                lin[-1] = 1.0  # the leave-one-out weight starts at 1 (RLOO)
            cv = {
                "lin": lin.requires_grad_(True),
                "log_temperature": torch.tensor(math.log(self.opts["temperature"]), **kw).requires_grad_(True),
            }
            state["cv"] = cv
            lr = self.opts["lr"]
            state["optimizer"] = _Adam([cv["log_temperature"]], lr) if lr > 0 else None
        return cv

    def cv_prepare(self, state: dict, grads: list[torch.Tensor | None]) -> Any:
        """The proxy's gradient and Hessian in the linear coefficients (the
        Hessian's rows in one batched backward pass), and its gradient in the
        temperature, each per run (divided by the number of runs: the proxy sums
        over them)."""
        cv = state.get("cv")
        if cv is None or state.get("optimizer") is None:
            return None
        g = dict(zip(cv, grads))
        lin, grad = cv["lin"], g.get("lin")
        runs = state.get("runs") or 1
        gt = g.get("log_temperature")
        gt = None if gt is None else gt.detach() / runs
        if grad is None:  # the estimate does not depend on the control variate
            return None, None, gt
        k = lin.shape[-1]
        if grad.requires_grad:
            hess = _hessian_rows(grad, lin)
        else:
            hess = torch.zeros(k, k, dtype=lin.dtype, device=lin.device)
        return grad.detach() / runs, hess / runs, gt

    def cv_step(self, state: dict, prepared: Any) -> None:
        """Least squares for the linear coefficients, Adam for the temperature.

        With the temperature fixed, the estimate ``g = A - sum_k phi_k B_k`` is
        linear in ``phi = (eta, rho, beta)``, so the variance proxy ``P = sum g^2``
        (summed over the parameters and, where the engine has them, the
        samples) is quadratic in ``phi``: its Hessian ``H = 2 B^T B`` and
        ``b = H phi - dP/dphi = 2 B^T A`` do not depend on ``phi``.
        Exponential averages of ``H`` and ``b`` over steps (decay ``ema``)
        give ``phi = (H + ridge * diag(H))^-1 b``, the variance-minimising
        coefficients for the draws seen so far (pooled over runs). The next
        estimate uses them, so it stays unbiased. (Gradient steps on this
        quadratic are slow: features such as ``f(sigmoid(z / lambda))`` and
        ``sigmoid(z)`` are nearly collinear, and Adam's steps jitter the
        coefficients by about its learning rate, which on a weak signal is
        noise far above the gradient being estimated.)
        """
        if prepared is None:  # lr=0: the control variate stays as it is
            return
        grad, hess, gt = prepared
        cv = state["cv"]
        if grad is not None:
            lin = cv["lin"]
            with torch.no_grad():
                b = hess @ lin - grad
                # the k x k system is solved on the CPU in float64: one small copy instead of
                # a GPU solver's launches and synchronisations, and no float32 round-off
                hess, b = hess.to("cpu", torch.float64), b.to("cpu", torch.float64)
                if "H" in state:
                    ema = float(self.opts["ema"])
                    state["H"].mul_(ema).add_(hess, alpha=1 - ema)
                    state["b"].mul_(ema).add_(b, alpha=1 - ema)
                else:
                    state["H"], state["b"] = hess, b
                H = state["H"]
                # ridge on each coefficient in its own units (a fraction of its diagonal entry:
                # scale-free), towards zero, where nearly collinear features (the constant rho_0
                # and the others' mean cost) leave a direction the draws barely determine
                ridge = float(self.opts["ridge"]) * H.diagonal() + torch.finfo(H.dtype).tiny
                sol = torch.linalg.solve(H + torch.diag(ridge), state["b"])
                if bool(torch.isfinite(sol).all()):  # else (degenerate) the coefficients stay as they are
                    lin.copy_(sol)
        state["optimizer"].step([gt])

    def sample_variants(self, dist: Distribution, dim: int, size: int, state: dict) -> tuple[torch.Tensor, Any]:
        if not isinstance(dist, Bernoulli):
            return self._categorical_variants(dist, dim, state)
        theta = dist.logits
        cv = self.params(state, theta)
        temp = cv["log_temperature"].exp()
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
        # the estimate reads a copy of the coefficients: a fit after it (even before the surrogate's
        # backward, as Story.surrogate does) changes them in place without touching what autograd saved
        return value, {"theta": theta, "log_p": log_p, "z": z, "z_cond": z_cond, "lin": cv["lin"].clone(),
                       "state": state}

    def _categorical_variants(self, dist: Distribution, dim: int, state: dict) -> tuple[torch.Tensor, Any]:
        """The Gumbel-max form: ``z = theta + G``, ``b = onehot(argmax z)``, ``z~`` the
        perturbed logits given ``b`` (differentiable in ``theta``), relaxations
        ``softmax(z / lambda)``; a Categorical's relaxed value is the relaxed index."""
        theta = dist.logits  # normalised log-probabilities (*batch, K)
        cv = self.params(state, theta)
        temp = cv["log_temperature"].exp()
        with torch.no_grad():
            g = gumbel_noise(tuple(theta.shape), theta)
            g_top, g_rest = gumbel_noise((*theta.shape[:-1], 1), theta), gumbel_noise(tuple(theta.shape), theta)
        z = theta + g
        index = z.argmax(-1).detach()
        hard = torch.nn.functional.one_hot(index, theta.shape[-1]).to(theta.dtype)
        z_cond = perturbed_given_argmax(theta, hard, g_top, g_rest)
        soft, soft_cond = (z / temp).softmax(-1), (z_cond / temp).softmax(-1)
        if isinstance(dist, OneHotCategorical):
            value = torch.cat([hard, soft, soft_cond], dim=dim)
            log_p = dist.log_prob(hard)
        else:
            classes = torch.arange(theta.shape[-1], dtype=theta.dtype, device=theta.device)
            value = torch.cat([index.to(theta.dtype), soft @ classes, soft_cond @ classes], dim=dim)
            log_p = dist.log_prob(index)
        return value, {"theta": theta, "log_p": log_p, "z": z, "z_cond": z_cond, "lin": cv["lin"].clone(),
                       "state": state, "classes": True}

    def plate_value(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        return plate_select(term, dim, 0).detach()  # the cost at the hard sample b

    def r(self, aux: dict, z: torch.Tensor, dim: int) -> torch.Tensor | None:
        return None

    def reduce_plate(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        state, lin = aux["state"], aux["lin"]
        f = plate_select(term, dim, 0)
        c_z, c_cond = plate_select(term, dim, 1), plate_select(term, dim, 2)
        eta = lin[0]
        c_z, c_cond = eta * c_z, eta * c_cond
        r_z, r_cond = self.r(aux, aux["z"], dim), self.r(aux, aux["z_cond"], dim)
        if r_z is not None:
            c_z, c_cond = c_z + r_z, c_cond + r_cond
        log_p = site_sum(aux["log_p"], dim)
        signal = f.detach() - c_cond
        sd = state.get("sample_dim")
        if self.opts["loo"] and sd is not None and signal.dim() > sd and signal.shape[sd] > 1:
            # a fitted multiple of the mean cost of the other samples (independent of this one)
            n = signal.shape[sd]
            fd = f.detach()
            signal = signal - lin[-1] * (fd.sum(sd, keepdim=True) - fd) / (n - 1)
        return f + signal * first_order(log_p) + first_order(c_z - c_cond)


@register_estimator("rebar")
class REBAR(_Relaxed):
    """REBAR: relaxation ``f(sigmoid(z / lambda))`` scaled by ``eta``, both learned."""


@register_estimator("relax")
class RELAX(_Relaxed):
    """RELAX: REBAR's control variate plus a learned per-entry quadratic ``r_rho(z)``;
    the coefficients start at zero (``eta=0``) with ``beta = 1``, where RELAX is
    the score function with the leave-one-out baseline (RLOO)."""

    learned_r = True
    options = {**_Relaxed.options, "eta": 0.0}

    def r(self, aux: dict, z: torch.Tensor, dim: int) -> torch.Tensor:
        rho = aux["lin"][1:4]
        s = z.softmax(-1) if aux.get("classes") else torch.sigmoid(z)
        val = rho[0] + rho[1] * s + rho[2] * s * s
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
    joint_variants = True
    trainable = True
    options = {"lr": 0.05}

    def __init__(self, n: int | None = None, **options) -> None:
        super().__init__(n=n, **options)
        lr = self.opts["lr"]
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
            raise EstimatorError(f"lr must be a number >= 0, not {lr!r}")

    def fits_class(self, cls: type) -> str | None:
        return self.fits(cls)  # has_rsample is a class attribute (a property only where the class cannot tell)

    def fits(self, dist: Distribution | type) -> str | None:
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
            state["optimizer"] = _Adam([phi], self.opts["lr"]) if self.opts["lr"] > 0 else None
        return cv

    def sample_variants(self, dist: Distribution, dim: int, size: int, state: dict) -> tuple[torch.Tensor, Any]:
        b = dist.rsample()
        cv = self.params(state, b)
        log_p = dist.log_prob(b.detach())
        # a copy of phi (see _Relaxed.sample_variants): a fit may change phi before the backward pass
        return b.detach(), {"b": b, "log_p": log_p, "phi": cv["phi"].clone(), "state": state, "own": b.dim() - dim - 1}

    @staticmethod
    def control_variate(aux: dict, b: torch.Tensor, dim: int) -> torch.Tensor:
        """``c_phi(b)``, summed over the site's entries (one value per particle)."""
        phi, state, own = aux["phi"], aux["state"], aux["own"]
        phi0, phi1, phi2 = (_per_run(phi[..., j], state, dim, own) for j in range(3))
        return site_sum(phi0 + phi1 * b + phi2 * b * b, dim)

    def plate_value(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        return term.detach().squeeze(dim)  # the cost at the draw

    def reduce_plate(self, term: torch.Tensor, dim: int, aux: Any) -> torch.Tensor:
        f = term.squeeze(dim)
        b = aux["b"]
        c_fixed = self.control_variate(aux, b.detach(), dim)  # depends on phi only
        c_path = self.control_variate(aux, b, dim)  # through the reparameterized draw
        log_p = site_sum(aux["log_p"], dim)
        box = torch.exp(log_p - log_p.detach())
        return box * f + (1 - box) * c_fixed + first_order(c_path)
