"""Straight-through estimators refined: ReinMax and Gumbel-Rao (Bernoulli,
Categorical and OneHotCategorical sites).

Both keep the straight-through shape of ``st_gumbel``: the cost sees the hard
sample ``D`` (a one-hot of the site's ``K`` classes; a Bernoulli is the two
classes ``(0, theta)``), so the cost estimate is unbiased, and the backward
pass differentiates a soft ``direction`` in its place::

    value = D + direction - stop_grad(direction)

(a Categorical site's value is the index ``D @ (0..K-1)``, a Bernoulli's the
second class). One evaluation of the downstream story per particle. The
gradient is biased, less so than ``st_gumbel``'s:

* ``reinmax`` (Liu, Zhang, Gao & Gao, NeurIPS 2023, "Bridging Discrete and
  Backpropagation: Straight-Through and Beyond"; option ``temperature``,
  default 1): straight-through read as the forward Euler step of an integral,
  refined by Heun's method. With ``pi_0 = softmax(theta)``,
  ``pi_1 = (softmax(theta / temperature) + D) / 2``::

      direction = 2 * pi_1' - pi_0 / 2,    pi_1' = softmax(theta + stop_grad(log pi_1 - theta))

  whose Jacobian is ``2 J(pi_1) - J(pi_0) / 2`` with ``J(p) = diag(p) - p p^T``:
  second-order accurate, so on a cost quadratic in the one-hot the bias
  vanishes at temperature 1 (measured: tests/test_straight_through.py).
* ``gumbel_rao`` (Paulus, Maddison & Krause, ICLR 2021, "Rao-Blackwellizing
  the Straight-Through Gumbel-Softmax Gradient Estimator"; options ``k``,
  default 10, and ``temperature``, default 0.5): the straight-through
  Gumbel-softmax gradient ``d/dtheta softmax((theta + G) / temperature)``
  averaged over ``k`` Gumbel vectors ``G`` drawn given ``argmax(theta + G) = D``
  (the largest perturbed logit is ``logsumexp(theta)`` plus a Gumbel, every other
  one a Gumbel truncated below it). Conditioning on ``D`` keeps the mean of
  ``st_gumbel`` at the same temperature and removes part of its variance.
"""

from __future__ import annotations

import torch
from torch.distributions import Bernoulli, Categorical, Distribution, OneHotCategorical

from ..errors import EstimatorError
from .base import Estimator, register_estimator

__all__ = ["ReinMax", "GumbelRao"]

_KINDS = (Bernoulli, Categorical, OneHotCategorical)


def _positive(value, what: str, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise EstimatorError(f"{what} of `{name}` must be a positive number, not {value!r}",
                             hint=f"e.g. `using {name}(temperature=1.0)`")


class _StraightThrough(Estimator):
    reparameterized = True  # the value carries its own (straight-through) derivative

    def fits_class(self, cls: type) -> str | None:
        if not issubclass(cls, _KINDS):
            return "it is a straight-through estimator for Bernoulli, Categorical and OneHotCategorical sites only"
        return None

    def fits(self, dist: Distribution) -> str | None:
        return self.fits_class(type(dist))

    def draw(self, dist: Distribution, sample_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        logits = dist.logits
        if isinstance(dist, Bernoulli):  # two classes: (0, theta)
            logits = torch.stack([torch.zeros_like(logits), logits], -1)
        logits = logits.expand(tuple(sample_shape) + logits.shape)
        with torch.no_grad():
            index = Categorical(logits=logits, validate_args=False).sample()
            hard = torch.nn.functional.one_hot(index, logits.shape[-1]).to(logits.dtype)
        soft = self.direction(logits, hard)
        out = hard + (soft - soft.detach())
        if isinstance(dist, Bernoulli):
            return out[..., 1]
        if isinstance(dist, OneHotCategorical):
            return out
        return out @ torch.arange(logits.shape[-1], dtype=out.dtype, device=out.device)  # the (relaxed) index

    def direction(self, logits: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        """What the backward pass differentiates in place of the one-hot ``hard``."""
        raise NotImplementedError


@register_estimator("reinmax")
class ReinMax(_StraightThrough):
    """ReinMax: straight-through with Heun's correction (Liu et al., 2023)."""

    options = {"temperature": 1.0}

    def __init__(self, n: int | None = None, **options) -> None:
        super().__init__(n=n, **options)
        _positive(self.opts["temperature"], "temperature", self.name)

    def direction(self, logits: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        pi_0 = logits.softmax(-1)
        pi_1 = 0.5 * ((logits / float(self.opts["temperature"])).softmax(-1) + hard)
        # the value of pi_1, the Jacobian of a softmax at pi_1
        pi_1 = (logits + (pi_1.log() - logits).detach()).softmax(-1)
        return 2 * pi_1 - 0.5 * pi_0


@register_estimator("gumbel_rao")
class GumbelRao(_StraightThrough):
    """Gumbel-Rao: the straight-through Gumbel-softmax gradient averaged over ``k``
    Gumbel draws given the sample (Paulus et al., 2021)."""

    options = {"k": 10, "temperature": 0.5}

    def __init__(self, n: int | None = None, **options) -> None:
        super().__init__(n=n, **options)
        _positive(self.opts["temperature"], "temperature", self.name)
        k = self.opts["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise EstimatorError(f"option k of `{self.name}` must be a positive int, not {k!r}",
                                 hint="e.g. `using gumbel_rao(k=10)`: conditional Gumbel draws per sample")

    def direction(self, logits: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        noise = conditional_gumbel(logits.detach(), hard, self.opts["k"])  # (k, *logits.shape)
        return ((logits + noise) / float(self.opts["temperature"])).softmax(-1).mean(0)


def gumbel_noise(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise of ``shape`` in ``like``'s dtype and device."""
    tiny = torch.finfo(like.dtype).tiny
    u = torch.rand(shape, dtype=like.dtype, device=like.device).clamp(tiny, 1 - torch.finfo(like.dtype).eps)
    return -torch.log(-torch.log(u))


def perturbed_given_argmax(logits: torch.Tensor, hard: torch.Tensor, g_top: torch.Tensor,
                           g_rest: torch.Tensor) -> torch.Tensor:
    """``logits + G`` with Gumbel noise ``G`` conditioned on ``argmax(logits + G)`` being
    the class ``hard`` marks, as a function of ``logits`` (the noise ``g_top``, last dim
    1, and ``g_rest`` held fixed): the largest perturbed logit is
    ``logsumexp(logits) + g_top``, every other one ``logits_j + g_rest_j`` truncated
    below it (``-logaddexp(-(logits_j + g_rest_j), -top)``)."""
    top = torch.logsumexp(logits, -1, keepdim=True) + g_top
    others = -torch.logaddexp(-(logits + g_rest), -top)
    return torch.where(hard.bool(), top, others)


@torch.no_grad()
def conditional_gumbel(logits: torch.Tensor, hard: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` draws of Gumbel noise ``G`` given ``argmax(logits + G) = hard``, as
    ``(k, *logits.shape)``."""
    g_top = gumbel_noise((k, *logits.shape[:-1], 1), logits)
    g_rest = gumbel_noise((k, *logits.shape), logits)
    return perturbed_given_argmax(logits, hard, g_top, g_rest) - logits
