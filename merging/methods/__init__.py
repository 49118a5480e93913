"""Merge methods, one module each, registered by name in `METHODS`."""
from . import dare, linear, task_arithmetic, ties, tsv  # noqa: F401  (registration)
from .registry import METHODS, Method, MethodParams, UnknownMethod, get_method

__all__ = ["METHODS", "Method", "MethodParams", "UnknownMethod", "get_method"]
