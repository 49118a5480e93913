"""Errors shared across layers."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A model folder that cannot be read or written as asked (or a device that is not there);
    `field`, when known, is the spec field that named it (`models[1].path`)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class FieldError(ValueError):
    """Bad input that one spec field is to blame for: `field` is its path (`evaluation.dtype`),
    which the CLI prints and the REST API returns beside the message."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message
