"""Candidates materialized in memory: one resident model, rewritten in place per genome.

The base and the task vectors are read once (float32) and prepared once per tensor by the
method's `prepare` (TSV's SVDs, TIES' magnitude ranks), then every candidate is merged
tensor by tensor straight into the parameters of one model on the device: no checkpoint
is written and no second model is allocated. When the task vectors do not fit on the
device next to the model (`store: auto` checks free CUDA memory), they stay in host
memory and each tensor is moved to the device just before it is merged.

Memory: the model, plus the base and N task vectors in float32 on the store device (TIES
adds a float32 rank for each entry of each task vector): this is the per-job cache that makes a
candidate cost one pass over the weights instead of a read of N+1 checkpoints.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
from transformers import AutoModelForCausalLM

from merging.checkpoint import CheckpointError
from merging.engine import non_finite_input, open_inputs, resolve_device
from merging.methods import MethodParams, get_method


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to(x, device) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(x, device) for x in obj)
    return obj


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(x) for x in obj)
    return 0


class ResidentMerge:
    """Holds one job's base, task vectors and model; `materialize` writes a candidate into it."""

    def __init__(self, base: str | os.PathLike, models: Sequence[str | os.PathLike], method: str,
                 device: str = "auto", store: str = "auto"):
        self.method = get_method(method)
        self.device = resolve_device(device)
        reader, sources = open_inputs(base, list(models))
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(self.device).eval()
        params = self.model.state_dict()
        self.names = [n for n in reader.names() if reader.info(n).dtype.is_floating_point and n in params]
        missing = [n for n in reader.names() if n not in params]
        if missing:
            raise ValueError(f"{base}: checkpoint tensor {missing[0]} is not a parameter of the model class")
        self.targets = {n: params[n] for n in self.names}
        self.store = self._store_device(reader, len(sources), store)
        self.base: dict[str, torch.Tensor] = {}
        self.prepared: dict[str, Any] = {}
        with torch.no_grad():
            for n in self.names:
                b = reader.get(n, self.device, torch.float32)
                deltas = [s.delta(n, b) for s in sources]
                bad = non_finite_input(b, deltas)
                if bad:
                    raise CheckpointError(f"{n}: NaN or infinite weights {bad}; a merge of them would be too")
                prep = self.method.prepare(deltas, n) if self.method.prepare else deltas
                self.base[n] = b.to(self.store)
                self.prepared[n] = _to(prep, self.store)
        self.n_layers = getattr(self.model.config, "num_hidden_layers", 1)

    def _store_device(self, reader, n_models: int, store: str) -> torch.device:
        if store != "auto":
            return torch.device(store)
        if self.device.type != "cuda":
            return self.device
        need = sum(reader.info(n).numel for n in self.names) * 4 * (n_models + 1)
        if self.method.name in ("ties", "dare_ties"):
            need += need * n_models // (n_models + 1)
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if need < 0.7 * free else torch.device("cpu")

    @property
    def cache_bytes(self) -> int:
        return sum(_nbytes(b) for b in self.base.values()) + sum(_nbytes(p) for p in self.prepared.values())

    @torch.no_grad()
    def materialize(self, params: MethodParams | Callable[[str], MethodParams]) -> torch.nn.Module:
        """Writes the merge with these parameters into the resident model and returns it."""
        fn = self.method.fn
        for n in self.names:
            p = params(n) if callable(params) else params
            base = self.base[n].to(self.device, non_blocking=True)
            self.targets[n].copy_(fn(base, _to(self.prepared[n], self.device), p, n))
        return self.model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().clone() for n, t in self.targets.items()}
