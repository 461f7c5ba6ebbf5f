"""Continuous relaxations of discrete sites: Gumbel-softmax / Concrete and its
straight-through variant (Bernoulli, Categorical and OneHotCategorical sites).

With logits ``theta`` (``K`` classes), a temperature ``lambda > 0`` and
independent Gumbel noise ``g_j = -log(-log u_j)``, ``u_j ~ U(0, 1)``::

    y = softmax((theta + g) / lambda)                      (the Concrete sample)
    argmax_j y_j = argmax_j (theta_j + g_j) ~ Categorical(softmax(theta))

and for a Bernoulli with logits ``theta`` and logistic noise
``l = log u - log(1 - u)``: ``y = sigmoid((theta + l) / lambda)``, with
``1[y > 1/2] ~ Bernoulli(sigmoid(theta))``. Jang, Gu & Poole (2017),
"Categorical Reparameterization with Gumbel-Softmax"; Maddison, Mnih & Teh
(2017), "The Concrete Distribution: A Continuous Relaxation of Discrete Random
Variables". The relaxed samples come from ``torch.distributions``'
``RelaxedBernoulli`` and ``RelaxedOneHotCategorical`` (``rsample``).

* ``gumbel`` (option ``temperature``, default 0.5): the site's value *is* the
  relaxed sample ``y`` and the gradient is the pathwise derivative
  ``d/dtheta f(y(theta, g))``. For a ``Categorical`` site, whose values are
  integer indices, the value is the relaxed index ``sum_j j * y_j`` (a float
  in ``[0, K-1]``; it is the index of the argmax in the limit ``lambda -> 0``),
  so a cost written for indices (``(k - 2.0)**2``) accepts it; a cost that
  indexes with the value (``theta[k]``) needs ``OneHotCategorical`` instead.
  Biased: both the cost estimate and the gradient are those of
  ``E[f(y)]``, the expected cost at *relaxed* values, not ``E[f(x)]``; the cost
  must be defined between the discrete values. The bias vanishes as
  ``lambda -> 0`` (for costs continuous at the discrete points), while the
  variance of the gradient grows like ``1/lambda``.
* ``st_gumbel`` (straight-through Gumbel-softmax, option ``temperature``):
  the forward value is the hard sample ``h`` (``1[y > 1/2]``, the one-hot of
  ``argmax y``, or the index ``argmax y``), exactly distributed as the site,
  and the backward pass uses the relaxed one::

      value = h + y - stop_grad(y)        (index: h + sum_j j y_j - stop_grad(...))

  Jang et al. (2017); Bengio, Leonard & Courville (2013), "Estimating or
  Propagating Gradients Through Stochastic Neurons for Conditional
  Computation". The cost estimate is unbiased (the cost sees hard values); the
  gradient ``f'(h) dy/dtheta`` is biased for every temperature (it uses the
  derivative of ``f`` at the hard point along the relaxed direction).

Both draw one value per particle (one cost evaluation) and add no term of
their own to the surrogate; values are floating point (a Categorical index
included).

Measured bias of the gradient (``tests/test_relaxation.py`` has the full
table): on the Bernoulli toy (``t = 0.3``, cost ``(b - 0.45)**2``, exact
gradient 0.0244) ``gumbel`` is off by +0.0018, +0.0033, +0.0074, +0.0020,
-0.0083 at temperatures 0.05, 0.1, 0.5, 1, 2, and ``st_gumbel`` by +0.0025,
+0.0047, +0.0134, +0.0105, +0.0006 (exact quadrature): small temperatures
shrink the bias roughly in proportion, but it is not monotone at large ones
(it changes sign near 1.1 for ``gumbel``). On a five-outcome Categorical
with cost ``(k - 2)**2`` the bias (norm over the logits, gradient norm 0.84)
is 0.04, 0.09, 0.42, 0.65 (``gumbel``) and 0.03, 0.05, 0.30, 0.52
(``st_gumbel``) at 0.05, 0.1, 0.5, 1.
"""

from __future__ import annotations

import torch
from torch.distributions import (
    Bernoulli,
    Categorical,
    Distribution,
    OneHotCategorical,
    RelaxedBernoulli,
    RelaxedOneHotCategorical,
)

from ..errors import EstimatorError
from .base import Estimator, register_estimator

__all__ = ["GumbelSoftmax", "StraightThroughGumbel"]

_KINDS = (Bernoulli, Categorical, OneHotCategorical)


class _Relaxation(Estimator):
    reparameterized = True
    options = {"temperature": 0.5}
    straight_through = False

    def __init__(self, n: int | None = None, **options) -> None:
        super().__init__(n=n, **options)
        t = self.opts["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t == float("inf"):
            raise EstimatorError(
                f"temperature of `{self.name}` must be a positive number, not {t!r}",
                hint=f"e.g. `using {self.name}(temperature=0.5)`; smaller is less biased and more variable",
            )

    def fits_class(self, cls: type) -> str | None:
        if not issubclass(cls, _KINDS):
            return "it relaxes Bernoulli, Categorical and OneHotCategorical sites only"
        return None

    def fits(self, dist: Distribution) -> str | None:
        return self.fits_class(type(dist))

    def draw(self, dist: Distribution, sample_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        logits = dist.logits
        temperature = torch.tensor(float(self.opts["temperature"]), dtype=logits.dtype, device=logits.device)
        if isinstance(dist, Bernoulli):
            soft = RelaxedBernoulli(temperature, logits=logits, validate_args=False).rsample(sample_shape)
            if not self.straight_through:
                return soft
            hard = (soft > 0.5).to(soft.dtype)
            return hard + (soft - soft.detach())
        soft = RelaxedOneHotCategorical(temperature, logits=logits, validate_args=False).rsample(sample_shape)
        if self.straight_through:
            index = soft.argmax(-1)
        if isinstance(dist, OneHotCategorical):
            if not self.straight_through:
                return soft
            hard = torch.nn.functional.one_hot(index, soft.shape[-1]).to(soft.dtype)
            return hard + (soft - soft.detach())
        # Categorical: integer indices; the relaxed index is sum_j j * y_j
        k = torch.arange(soft.shape[-1], dtype=soft.dtype, device=soft.device)
        soft_index = soft @ k
        if not self.straight_through:
            return soft_index
        return index.to(soft.dtype) + (soft_index - soft_index.detach())


@register_estimator("gumbel")
class GumbelSoftmax(_Relaxation):
    """Gumbel-softmax / Concrete: the value is the relaxed sample
    ``softmax((theta + g) / temperature)`` (a relaxed index for Categorical);
    pathwise gradient. Biased (see the module docstring)."""


@register_estimator("st_gumbel")
class StraightThroughGumbel(_Relaxation):
    """Straight-through Gumbel-softmax: value ``hard + soft - stop_grad(soft)``.
    Unbiased cost estimate, biased gradient (see the module docstring)."""

    straight_through = True
