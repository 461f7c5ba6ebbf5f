"""Gradient estimators, one module per family, behind one registry."""

from . import antithetic, control_variates, enumeration, pathwise, score  # noqa: F401  (registers the built-ins)
from .base import Estimator, auto_estimator, estimators, make_estimator, parse_spec, register_estimator

__all__ = ["Estimator", "auto_estimator", "estimators", "make_estimator", "parse_spec", "register_estimator"]
