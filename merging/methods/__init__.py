"""Merge methods, one module each, registered by name in `METHODS` (see `registry`)."""
from .. import atm as _atm  # noqa: F401  (registers atm)
from ..permutation import methods as _permutation  # noqa: F401  (registers c2m3, weight_matching)
from . import dare, linear, task_arithmetic, ties, tsv  # noqa: F401  (registration)
from .registry import METHODS, Method, MethodParams, UnknownMethod, get_method, method_params, methods

__all__ = ["METHODS", "Method", "MethodParams", "UnknownMethod", "get_method", "method_params", "methods"]
