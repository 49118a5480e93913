"""TSV-C on its own: compress a fine-tune's task vector to its top singular triplets.

For every 2-D weight (token embeddings excepted, as in TSV-M) the task vector
tau = theta_ft - theta_base is replaced by its best rank-k approximation
U_k diag(S_k) V_k^T with k = max(1, round(fraction * min(m, n))) (Gargiulo et al. 2025,
TSV-C: a few percent of the rank keeps most of a layer's task vector); other tensors keep
their full task vector. The result is written as a HF folder (base + compressed tau),
streamed tensor by tensor, and the kept energy sum(S_k^2)/sum(S^2) is reported per
matrix, so a user sees what a given fraction costs.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from core.devices import resolve_device

from .checkpoint import CheckpointWriter
from .methods.tsv import is_matrix, tsv_c
from .task_vectors import open_inputs


def compress(base: str | os.PathLike, model: str | os.PathLike, out_dir: str | os.PathLike, fraction: float = 0.1,
             device: str = "auto", overwrite: bool = False) -> dict:
    """Writes base + rank-reduced task vector of `model` to `out_dir`; returns the energy report."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    reader, (source,) = open_inputs(base, [model])
    dev = resolve_device(device)
    infos = {n: reader.info(n) for n in reader.names()}
    kept: dict[str, float] = {}
    total = kept_sum = 0.0
    with CheckpointWriter(out_dir, infos, overwrite=overwrite) as w:
        for name in w.expected:
            if not infos[name].dtype.is_floating_point:
                w.write(name, reader.get(name))
                continue
            b = reader.get(name, dev, torch.float32)
            tau = source.delta(name, b)
            if is_matrix(tau, name):
                k = max(1, round(fraction * min(tau.shape)))
                u, s, v, frac = tsv_c(tau, k)
                energy = float((tau**2).sum())
                kept[name], total, kept_sum = frac, total + energy, kept_sum + frac * energy
                tau = (u * s) @ v.T
            w.write(name, b + tau)
        w.finish(side_files_from=base)
    return {"fraction": fraction, "kept_energy": kept_sum / total if total else 1.0, "per_matrix": kept,
            "out": str(Path(out_dir))}
