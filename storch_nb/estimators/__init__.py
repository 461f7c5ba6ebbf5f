"""Gradient estimators, one module per family, behind one registry."""

from . import (  # noqa: F401  (registers the built-ins)
    antithetic,
    control_variates,
    double_cv,
    enumeration,
    go,
    indecater,
    measure_valued,
    multisample,
    pathwise,
    relaxation,
    score,
    straight_through,
    without_replacement,
)
from .base import Estimator, auto_estimator, estimators, make_estimator, parse_spec, register_estimator

__all__ = ["Estimator", "auto_estimator", "estimators", "make_estimator", "parse_spec", "register_estimator"]
