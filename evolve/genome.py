"""Search spaces: a real vector (a genome) <-> merge parameters.

Each method has searchable parameters: per-model ones (`weights`, and `density` for the
sparsifying methods), one value per model, and global scalars (`lambda`, `alpha`).
With `granularity: global` there is one gene per model and parameter; with `per_block`
the decoder layers are split into B contiguous blocks and every parameter gets one gene
per block (Akiba et al. 2025, "Evolutionary optimization of model merging recipes",
parameter-space merging per layer group). Tensors outside the layers follow the nearest
block: embeddings the first, the final norm and the LM head the last.

Parameters that are not searched keep their fixed values from the spec's `params` (or
the method's defaults). Genes outside their bounds are clipped on decoding (pymoo's
operators keep them inside; a hand-written genome may not).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from merging.checkpoint import layer_index
from merging.methods import MethodParams, get_method, method_params

PER_MODEL = ("weights", "density")
GLOBAL = ("lambda", "alpha")

# Default bounds per method: what a user gets without `search.space`.
_INPUT_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|embed_positions|wte|word_embeddings)\.")


@dataclass(frozen=True)
class Gene:
    param: str
    model: int | None
    block: int
    low: float
    high: float

    @property
    def label(self) -> str:
        who = f"[{self.model}]" if self.model is not None else ""
        return f"{self.param}{who}@b{self.block}"


def block_of(name: str, n_layers: int, n_blocks: int) -> int:
    """The block a tensor belongs to: its layer's block, or the first/last for the rest."""
    if n_blocks == 1:
        return 0
    layer = layer_index(name)
    if layer is None:
        return 0 if _INPUT_EMBEDDING.search(name) else n_blocks - 1
    return min(n_blocks - 1, layer * n_blocks // max(n_layers, 1))


class SearchSpace:
    """Maps genomes to per-tensor merge parameters for one method and one set of models."""

    def __init__(self, method: str, n_models: int, space: Mapping[str, Sequence[float]] | None = None,
                 fixed: Mapping[str, Any] | None = None, n_blocks: int = 1, n_layers: int = 1):
        self.method, self.n_models = method, n_models
        self.n_blocks, self.n_layers = n_blocks, n_layers
        self.fixed = dict(fixed or {})
        space = dict(get_method(method).space if space is None else space)
        known = set(get_method(method).params.model_fields) | {
            f.alias for f in get_method(method).params.model_fields.values() if f.alias
        }
        genes = []
        for param, bounds in space.items():
            if param not in known or param not in PER_MODEL + GLOBAL:
                raise ValueError(f"search.space.{param}: not a searchable parameter of {method} "
                                 f"(searchable: {', '.join(p for p in PER_MODEL + GLOBAL if p in known)})")
            low, high = (float(b) for b in bounds)
            if not low <= high:
                raise ValueError(f"search.space.{param}: lower bound {low} above upper bound {high}")
            if param in self.fixed:
                raise ValueError(f"params.{param}: both fixed and searched")
            for block in range(n_blocks):
                models = range(n_models) if param in PER_MODEL else [None]
                genes.extend(Gene(param, m, block, low, high) for m in models)
        if not genes:
            raise ValueError("search.space: nothing to search")
        self.genes = genes
        self._params_cls = get_method(method).params
        method_params(method, self.fixed, n_models)  # fixed values valid on their own
        for param, bounds in space.items():  # both ends of every range valid for the method
            for v in (float(bounds[0]), float(bounds[1])):
                try:
                    method_params(method, {**self.fixed, param: [v] * n_models if param in PER_MODEL else v}, n_models)
                except ValueError as e:
                    if str(e).startswith(f"params.{param}"):
                        raise ValueError(f"search.space.{param}: {v} is outside what {method} accepts "
                                         f"({str(e).split(': ', 1)[-1].replace('Value error, ', '')})") from None

    @property
    def n_var(self) -> int:
        return len(self.genes)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array([g.low for g in self.genes]), np.array([g.high for g in self.genes])

    def decode(self, x: Sequence[float]) -> list[dict[str, Any]]:
        """Genome -> one parameter dict per block (clipped to the bounds)."""
        x = np.asarray(x, dtype=float)
        if x.shape != (self.n_var,):
            raise ValueError(f"genome has {x.shape} genes, the space has {self.n_var}")
        x = np.clip(x, *self.bounds)
        blocks: list[dict[str, Any]] = [dict(self.fixed) for _ in range(self.n_blocks)]
        for g, v in zip(self.genes, x):
            if g.model is None:
                blocks[g.block][g.param] = float(v)
            else:
                blocks[g.block].setdefault(g.param, [0.0] * self.n_models)[g.model] = float(v)
        return blocks

    def encode(self, blocks: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> np.ndarray:
        """Parameter dicts (one per block, or one for all) -> genome."""
        if isinstance(blocks, Mapping):
            blocks = [blocks] * self.n_blocks
        x = []
        for g in self.genes:
            v = blocks[g.block][g.param]
            x.append(v[g.model] if g.model is not None else v)
        return np.asarray(x, dtype=float)

    def params(self, x: Sequence[float]) -> list[MethodParams]:
        """Genome -> validated method parameters per block."""
        return [method_params(self.method, b, self.n_models) for b in self.decode(x)]

    def params_for_tensor(self, x: Sequence[float]):
        """Genome -> a function tensor name -> method parameters (what the merge engine takes)."""
        per_block = self.params(x)
        return lambda name: per_block[block_of(name, self.n_layers, self.n_blocks)]
