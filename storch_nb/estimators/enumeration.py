"""Exact enumeration of a finite support.

    d/dtheta E_{x~p(x;theta)}[f(x)] = sum_x ( d/dtheta p(x;theta) * f(x) + p(x;theta) * d/dtheta f(x) )

The site's value becomes every point of its support (the joint support of its
independent entries, by cartesian product) along a new plate, and each cost
downstream is weighted by the differentiable probability ``p(x;theta)`` and
summed over that plate: no sampling, no variance, exact derivatives of every
order. Cost: one evaluation of the downstream graph per support point.
"""

from __future__ import annotations

from torch.distributions import Distribution

from .base import Estimator, register_estimator


@register_estimator("enumerate")
class Enumerate(Estimator):
    """Exact sum over a finite support (option ``max_outcomes``, default 10**6)."""

    enumerates = True
    options = {"max_outcomes": 10**6}

    def fits_class(self, cls) -> str | None:
        return None if cls.has_enumerate_support else "it has no finite support to enumerate"

    def fits(self, dist: Distribution) -> str | None:
        if not dist.has_enumerate_support:
            return "it has no finite support to enumerate"
        if self.n is not None:
            return "option n does not apply: enumeration takes every outcome once"
        return None
