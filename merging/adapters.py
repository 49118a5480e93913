"""PEFT LoRA adapter folders as task vectors.

A LoRA adapter (Hu et al. 2022) stores, for each target module, factors A [r, in] and
B [out, r]; merged into the base it adds the update

    delta W = scale * B @ A,   scale = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

transposed when the module stores its weight as [in, out] (`fan_in_fan_out`) and for
embeddings (peft keeps their factors as A [r, vocab], B [dim, r]). Per-module ranks and
alphas come from `rank_pattern` / `alpha_pattern`. `modules_to_save` (and embedding
`base_layer` copies) replace the base tensor whole. This is what peft's
`merge_and_unload()` computes, read here one tensor at a time from the adapter file.
Any base tensor the adapter does not touch has a zero task vector.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from core.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: dict, module: str, default):
    """peft's rule: a pattern key applies when the module name ends with it (regex)."""
    for key, value in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", module)
        except re.error as e:
            raise ValueError(f"pattern {key!r} is not a regular expression ({e})") from None
        if hit:
            return value
    return default


def _positive_int(value) -> int | None:
    """A rank: a positive integer (an integral float such as 8.0 too); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if value == int(value) and value >= 1 else None


def _finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class _Lora:
    a: str
    b: str
    scale: float
    transpose: bool


class LoraAdapter:
    """Task vectors of a PEFT LoRA adapter, keyed by the base model's tensor names."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        cfg_path, weights = self.path / ADAPTER_CONFIG, self.path / ADAPTER_WEIGHTS
        if not cfg_path.is_file() or not weights.is_file():
            raise CheckpointError(f"{self.path}: a PEFT adapter needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{cfg_path}: not a JSON object")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{self.path}: peft_type {cfg.get('peft_type')} is not supported (LoRA only)")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{self.path}: DoRA adapters are not supported")
        self.config = cfg
        self._file = safe_open(str(weights), framework="pt")
        self.loras: dict[str, _Lora] = {}
        self.replaced: dict[str, str] = {}
        factors: dict[str, dict[str, str]] = {}
        for key in self._file.keys():
            name = key.removeprefix(_PREFIX)
            m = re.fullmatch(r"(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight", name) or re.fullmatch(
                r"(.+)\.lora_embedding_(A|B)(?:\.[^.]+)?", name
            )
            if m:
                factors.setdefault(m.group(1), {})[m.group(2)] = key
                factors[m.group(1)]["embedding"] = "lora_embedding" in name
                continue
            if ".lora_" in name or "lora_magnitude_vector" in name:
                raise CheckpointError(f"{self.path}: unsupported adapter tensor {key}")
            target = name.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
            target = target.replace(".base_layer.", ".")
            self.replaced[target] = key
        r, alpha = _positive_int(cfg.get("r")), cfg.get("lora_alpha", cfg.get("r"))
        if r is None:
            raise CheckpointError(f"{cfg_path}: r must be a positive integer, got {cfg.get('r')!r}")
        if not _finite(alpha):
            raise CheckpointError(f"{cfg_path}: lora_alpha must be a finite number, got {alpha!r}")
        for module, f in factors.items():
            if "A" not in f or "B" not in f:
                raise CheckpointError(f"{self.path}: {module} has only one LoRA factor")
            try:
                rank = _positive_int(given := _pattern_value(cfg.get("rank_pattern") or {}, module, r))
                if rank is None:
                    raise ValueError(f"gives {module} rank {given!r}, not a positive integer")
                a = _pattern_value(cfg.get("alpha_pattern") or {}, module, alpha)
                if not _finite(a):
                    raise ValueError(f"gives {module} alpha {a!r}, not a finite number")
            except ValueError as e:
                raise CheckpointError(f"{cfg_path}: rank_pattern / alpha_pattern: {e}") from None
            scale = a / math.sqrt(rank) if cfg.get("use_rslora") else a / rank
            transpose = bool(f["embedding"]) or bool(cfg.get("fan_in_fan_out"))
            self.loras[f"{module}.weight"] = _Lora(f["A"], f["B"], scale, transpose)

    def targets(self) -> list[str]:
        """The base tensor names this adapter changes."""
        return sorted(set(self.loras) | set(self.replaced))

    def target_shape(self, name: str) -> tuple[int, ...]:
        if name in self.replaced:
            return tuple(self._file.get_slice(self.replaced[name]).get_shape())
        lora = self.loras[name]
        out = self._file.get_slice(lora.b).get_shape()[0]
        inp = self._file.get_slice(lora.a).get_shape()[1]
        return (inp, out) if lora.transpose else (out, inp)

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """tau = (replacement or base) + scale * B @ A - base, in base's dtype and device."""
        device, dtype = base.device, base.dtype
        tau = None
        if name in self.replaced:
            tau = self._file.get_tensor(self.replaced[name]).to(device, dtype) - base
        if name in self.loras:
            lora = self.loras[name]
            a = self._file.get_tensor(lora.a).to(device, dtype)
            b = self._file.get_tensor(lora.b).to(device, dtype)
            d = (b @ a) * lora.scale
            d = d.T if lora.transpose else d
            tau = d if tau is None else tau + d
        return tau if tau is not None else torch.zeros_like(base)
