"""Task vectors tau_i = theta_i - theta_base, one tensor at a time, from a fine-tuned model
folder or a PEFT LoRA adapter folder (`open_source` tells them apart)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from core.errors import CheckpointError

from .adapters import LoraAdapter, is_adapter
from .checkpoint import CheckpointReader, TensorInfo
from .chunks import tensor_rows


class ModelSource:
    """A full fine-tune: its tensors minus the base's."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reader = CheckpointReader(path)
        self.rows: dict[str, torch.Tensor] = {}  # vocabulary tensors: output row -> this model's row (merging.vocab)

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """theta - base in base's dtype: the stored tensor is promoted inside the subtraction (one
        pass, no copy in base's dtype first; the same values, a promotion to float32 is exact).
        A vocabulary tensor whose rows differ from the base's goes through its row map."""
        if name in self.rows:
            from .vocab import gather_rows

            return gather_rows(self.reader.get(name, base.device), self.rows[name].to(base.device), base)
        return torch.sub(self.reader.get(name, base.device), base)

    def delta_rows(self, name: str, base: torch.Tensor):
        """`delta` by runs of rows (a `merging.chunks.RowFn`), from ``base`` as stored: the tensor
        is read once in its own dtype and each run promoted inside the subtraction."""
        if name in self.rows:
            return tensor_rows(self.delta(name, base.float()))
        mine = self.reader.get(name, base.device)
        return lambda a, b, base_rows: torch.sub(mine[a:b], base_rows)

    def mismatch(self, infos: dict[str, TensorInfo], vocab: frozenset[str] = frozenset()) -> str | None:
        """The first way this model differs from the base's tensor names and shapes, or None
        (`vocab`: tensors whose first dimension, the vocabulary, may differ)."""
        for name, info in infos.items():
            if name not in self.reader:
                return f"tensor {name} is missing"
            mine = self.reader.info(name).shape
            if name in vocab and len(mine) == len(info.shape) and mine[1:] == info.shape[1:]:
                continue
            if mine != info.shape:
                return f"tensor {name} has shape {self.reader.info(name).shape}, the base has {info.shape}"
        extra = sorted(set(self.reader.names()) - set(infos))
        if extra:
            return f"tensor {extra[0]} is not in the base"
        return None


class AdapterSource:
    """A LoRA adapter: scale * B @ A on its targets, zero elsewhere."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.adapter = LoraAdapter(path)

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor:
        rows = self.adapter.target_shape(name)[0] if name in self.adapter.targets() else base.shape[0]
        if base.ndim and base.shape[0] > rows:  # a vocabulary extended by tokenizer: union: no update on new rows
            out = torch.zeros_like(base)
            out[:rows] = self.adapter.delta(name, base[:rows])
            return out
        return self.adapter.delta(name, base)

    def delta_rows(self, name: str, base: torch.Tensor):
        """`delta` as a `merging.chunks.RowFn` (made whole first: scale * B @ A)."""
        return tensor_rows(self.delta(name, base.float()))

    def mismatch(self, infos: dict[str, TensorInfo], vocab: frozenset[str] = frozenset()) -> str | None:
        for name in self.adapter.targets():
            if name not in infos:
                return f"adapter target {name} is not a tensor of the base"
            shape = self.adapter.target_shape(name)
            if shape != infos[name].shape:
                return f"adapter target {name} has shape {shape}, the base has {infos[name].shape}"
        return None


def open_source(path: str | os.PathLike) -> ModelSource | AdapterSource:
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: no such model folder")
    return AdapterSource(path) if is_adapter(path) else ModelSource(path)


def open_inputs(base: str | os.PathLike, paths: list[str | os.PathLike], tokenizer: str | None = None):
    """Opens the base and the sources and checks that they fit together: the same tensor names
    and shapes, and vocabularies that agree on their shared token ids; vocabularies of other
    sizes need a `tokenizer` mode (base or union, merging/vocab.py), which sets the sources' row
    maps."""
    from .vocab import align, vocab_tensors

    reader = CheckpointReader(base)
    infos = {n: reader.info(n) for n in reader.names()}
    vocab = frozenset(vocab_tensors(infos))
    sources = []
    for i, p in enumerate(paths):
        try:
            src = open_source(p)
        except CheckpointError as e:
            raise CheckpointError(str(e), field=f"models[{i}].path") from None
        problem = src.mismatch(infos, vocab)
        if problem:
            raise CheckpointError(f"models[{i}] ({p}) does not match the base {base}: {problem}", field=f"models[{i}].path")
        sources.append(src)
    align(base, infos, sources, paths, tokenizer)
    return reader, sources
