"""Merge methods, one module each, registered by name in `METHODS`."""
from . import dare, linear, task_arithmetic, ties, tsv  # noqa: F401  (registration)
from .registry import METHODS, Method, MethodParams, UnknownMethod, get_method
from ..permutation import methods as _permutation  # noqa: F401,E402  (registers c2m3, weight_matching)

__all__ = ["METHODS", "Method", "MethodParams", "UnknownMethod", "get_method"]
