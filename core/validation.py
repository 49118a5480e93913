"""Pieces every spec (merge, evolve, evaluation) validates with."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, WithJsonSchema
from pydantic_core import PydanticCustomError


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


def off_schema(message: str) -> PydanticCustomError:
    """The error of a check the published JSON schema states too (a pattern, an enum, a minimum
    length): such a value breaks the schema (HTTP 422), where a validator's plain ValueError is a
    rule across fields the schema cannot state (400)."""
    return PydanticCustomError("off_schema", message)


def _not_empty(value: Any) -> Any:
    if value == "":
        raise off_schema("must not be empty")  # Path("") would silently be "." (the working folder)
    if isinstance(value, str) and not value.strip():  # fits the schema's minLength, names no path
        raise ValueError("must not be blank (whitespace only)")
    return value


# A path given as text: "" is refused instead of becoming ".".
GivenPath = Annotated[Path, BeforeValidator(_not_empty), WithJsonSchema({"type": "string", "format": "path", "minLength": 1})]


def json_text(data: Any) -> str:
    """Parsed JSON or YAML (paths allowed, as Python callers give them) back as JSON text, to be
    validated in pydantic's strict JSON mode: numbers must be numbers (`"1e999"`, `"NaN"` and
    `"0.5"` are strings, refused), while strings still make paths and arrays tuples."""
    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if hasattr(value, "item") and callable(value.item):  # numpy scalars
            return value.item()
        raise TypeError(f"{type(value).__name__} is not a JSON value")
    try:
        return json.dumps(_whole_numbers(data), default=plain)
    except TypeError as e:  # a YAML date, a Python object
        raise ValueError(f"spec: not JSON data ({e})") from None


def _whole_numbers(data: Any) -> Any:
    """2.0 -> 2 throughout: JSON has one number type, and JSON Schema's integer includes 2.0."""
    if isinstance(data, float) and data.is_integer():
        return int(data)
    if isinstance(data, dict):
        return {k: _whole_numbers(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_whole_numbers(v) for v in data]
    return data


def strict_spec(model: type[BaseModel], data: Any) -> Any:
    """`data` (a mapping, or already a `model`) validated as `model` in strict JSON mode (`json_text`)."""
    if isinstance(data, model):
        return data
    return model.model_validate_json(json_text(data), strict=True)


def error_message(err: Any) -> str:
    """A pydantic error's message for a person; a number sent as a string says so."""
    if err["type"] in ("float_type", "int_type") and isinstance(err.get("input"), str):
        return f"must be a JSON number, not the string {err['input'][:40]!r}"
    return str(err["msg"]).removeprefix("Value error, ")
