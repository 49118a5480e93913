"""The model card (README.md) written beside every merged checkpoint: its recipe, to reproduce it."""
from __future__ import annotations

from typing import Any, Mapping

import yaml

from . import __version__


def model_card(spec, hashes: Mapping[str, str], extra: Mapping[str, Any] | None = None,
               how: str = "This model was produced by a weight-space merge.") -> str:
    """The card of a merge of `spec` (a MergeSpec): the method, its parameters, each input with its
    content hash (`hashes`: path -> sha256; the base appears when it was hashed) and `extra`."""
    base = {"base": {"path": str(spec.base), "sha256": hashes[str(spec.base)]}} if str(spec.base) in hashes else {}
    recipe = {
        "method": spec.method,
        "params": spec.params,
        **base,
        "models": [{"name": m.name, "path": str(m.path), "sha256": hashes[str(m.path)]} if m.path is not None
                   else {"name": m.name, "train": str(m.train)} for m in spec.models],
        "output": spec.output.model_dump(),
        "evomerge_version": __version__,
        **(extra or {}),
    }
    return (
        "---\ntags: [merge, evomerge]\n---\n"
        f"# Merged with evomerge ({spec.method})\n\n"
        f"{how} Recipe:\n\n"
        f"```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```\n"
    )
