"""Devices and dtypes by name, as specs give them."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from .errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` is CUDA when present, else the CPU; a CUDA device asked for where there is none is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device} asked for, but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: str | torch.device = "auto") -> str:
    """The evaluation dtype's name: `auto` is bfloat16 on CUDA and float32 elsewhere (bfloat16
    matmuls on CPU run several times slower than float32 ones)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if resolve_device(str(device)).type == "cuda" else "float32"


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@contextmanager
def torch_threads(n: int | None):
    """torch's intra-op thread count set to `n` inside the block (None: left as it is). Float
    sums depend on how work is split, so a result that must not vary fixes it this way."""
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
