"""The batch dimensions of a pass, one small type per kind of reduction.

Every batch dimension of a pass (runs, samples, a site's own particles or
variants, a data plate) has a :class:`Plate` that says how the surrogate
reduces a cost term over it:

* :class:`Average`: the mean (runs, samples, ``n=K`` particles): independent
  draws of the same quantity;
* :class:`Enumerated`: the sum (``enumerate``: the outcomes, already weighted
  by their probabilities);
* :class:`Data`: a ``plate(...)`` over datapoints: the mean of the costs
  inside it (``reduce="sum"``: their sum over the full data, ``N`` times the
  mean of the ``B`` drawn with ``batch=B``);
* :class:`Variants`: a plated estimator's own variants (ARM's antithetic
  pair, REBAR's relaxations, ...), reduced by the estimator.

Credit assignment across data plates. A site inside a data plate has one
independent entry per datapoint. A cost inside the same plate keeps the
plate's dimension, so datapoint ``i``'s cost reaches only datapoint ``i``'s
site; a cost outside the plate that reads the site (through a name stacked
after the block) is one number per draw, and every datapoint's entry of the
site is credited with all of it. For scored sites the engine sums the
site's log-probability over such plates (the joint log-probability of all
datapoints). For a plated estimator, whose credit is built inside
:meth:`Estimator.reduce_plate`, the term is reduced twice: ``r`` as it is,
and ``r_0`` with the cost held constant (only the estimator's own credit to
its site has a derivative); with ``F`` the number of datapoints the site has
across those plates::

    r + (F - 1) * (r_0 - stop_grad(r_0))

has the value of ``r``; averaged over the plates it credits each datapoint's
entry with the whole cost (``F`` times its share) and every other path
(parameters downstream, relaxations) once. That holds for estimators whose
variants are joint draws of all the site's entries (``joint_variants``);
the others (enumeration, IndeCateR, measure-valued, GO, sampling without
replacement change one coordinate or outcome per variant, which across
datapoints would change every datapoint at once) are refused there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import EstimatorError
from ..estimators.base import Guard, first_order, first_order_only

__all__ = ["Plate", "Average", "Enumerated", "Data", "Variants", "CostView", "AVERAGE", "ENUMERATED", "outside_error"]


@dataclass(frozen=True)
class CostView:
    """What a reduction needs to know of the cost whose term it reduces."""

    node: str  # the cost's graph node
    lineno: int
    line: str  # the cost's story line (errors point at it)
    sites: frozenset[str]  # the sites upstream of the cost
    plates: frozenset[int]  # the data plates the cost is inside
    sizes: tuple[int, ...]  # the pass's batch sizes
    first_order: bool  # only first derivatives are taken (Story.run)
    guard: Guard | None = None  # lets the engine's control-variate fit differentiate twice


class Plate:
    """How the surrogate reduces a cost term over one batch dimension."""

    #: the reduction is the plain mean for every cost (lets the surrogate take
    #: one ``mean()`` over every dimension at once)
    averages: ClassVar[bool] = True

    def reduce(self, term: torch.Tensor, dim: int, cost: CostView) -> torch.Tensor:
        return term.mean(dim)

    def value(self, term: torch.Tensor, dim: int, sites: frozenset[str]) -> torch.Tensor:
        """The value of the reduction alone (detached), for a cost upstream of ``sites``."""
        return term.detach().mean(dim)


class Average(Plate):
    """Runs, samples and ``n=K`` particles: the mean."""


class Enumerated(Plate):
    """The outcomes of an enumerated site: the sum (the term holds their probabilities)."""

    averages = False

    def reduce(self, term: torch.Tensor, dim: int, cost: CostView) -> torch.Tensor:
        return term.sum(dim)

    def value(self, term: torch.Tensor, dim: int, sites: frozenset[str]) -> torch.Tensor:
        return term.detach().sum(dim)


AVERAGE = Average()
ENUMERATED = Enumerated()


class Data(Plate):
    """A ``plate(...)`` over ``total`` datapoints, ``size`` of them in this pass."""

    def __init__(self, lineno: int, size: int, total: int, kind: str) -> None:
        self.lineno, self.size, self.total, self.kind = lineno, size, total, kind
        self.averages = kind == "mean"

    def reduce(self, term: torch.Tensor, dim: int, cost: CostView) -> torch.Tensor:
        mean = term.mean(dim)
        if self.kind == "sum" and dim in cost.plates:
            return mean * self.total  # the sum over all N datapoints (N/B times that of the B drawn)
        return mean


class Variants(Plate):
    """A plated estimator's variants of its site: the estimator reduces them."""

    averages = False

    def __init__(self, node: str, est: Any, aux: Any, site_plates: frozenset[int]) -> None:
        self.node, self.est, self.aux, self.site_plates = node, est, aux, site_plates

    def value(self, term: torch.Tensor, dim: int, sites: frozenset[str]) -> torch.Tensor:
        if self.node not in sites:
            return term.detach().mean(dim)
        return self.est.plate_value(term, dim, self.aux)

    def reduce(self, term: torch.Tensor, dim: int, cost: CostView) -> torch.Tensor:
        if self.node not in cost.sites:
            return term.mean(dim)  # the site does not reach this cost: its variants are draws alike
        est = self.est
        out = est.reduce_plate(term, dim, self.aux)
        outside = self.site_plates - cost.plates
        if outside:
            if not est.joint_variants:
                raise outside_error(self.node, est.name, cost.lineno).located(cost.lineno, cost.line)
            factor = 1
            for d in outside:
                factor *= cost.sizes[d]
            if factor > 1:
                own = est.reduce_plate(term.detach(), dim, self.aux)
                out = out + (factor - 1) * first_order(own)
                if est.higher_order and not cost.first_order:
                    out = first_order_only(out, est.name, cost.guard)
        if not cost.first_order and not est.higher_order:
            out = first_order_only(out, est.name, cost.guard)
        return out


def outside_error(node: str, estimator: str, lineno: int) -> EstimatorError:
    """A site inside a plate, read by a cost outside it, whose estimator cannot credit that cost."""
    return EstimatorError(
        f"site `{node}` is inside a plate and the cost on line {lineno}, outside the plate, reads it: "
        f"estimator `{estimator}` varies one entry or outcome at a time, which across the datapoints "
        "would vary every datapoint at once",
        hint="compute that cost inside the plate (one datapoint's part of it), or use rloo, disarm or relax "
        "for this site",
    )
