"""Pieces every spec (merge, evolve, evaluation) validates with."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator


def non_finite(data: Any, loc: tuple = ()) -> tuple | None:
    """Where the first NaN or infinite number sits in nested dicts and lists (None if nowhere)."""
    if isinstance(data, float) and not math.isfinite(data):
        return loc
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for k, v in items:
        found = non_finite(v, loc + (k,))
        if found is not None:
            return found
    return None


def field_path(loc) -> str:
    """('models', 1, 'path') -> 'models[1].path'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _not_empty(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")  # Path("") would silently be "." (the working folder)
    return value


# A path given as text: "" is refused instead of becoming ".".
GivenPath = Annotated[Path, BeforeValidator(_not_empty)]
