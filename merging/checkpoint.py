"""Hugging Face model folders as streams of tensors.

`CheckpointReader` opens a folder holding `model.safetensors` or shards listed in
`model.safetensors.index.json`, parses and checks each file's header, and reads one
tensor at a time when asked for it (see `_SafetensorsFile` for why not through a map).

`CheckpointWriter` writes a sharded safetensors checkpoint without ever holding more
than one tensor: the names, shapes and dtype of every output tensor are known before
the first one is computed (they are the base's), so the shard layout and each shard's
header are planned up front and each tensor's bytes are appended as soon as it is
ready. The folder is built under a temporary name beside the destination and renamed
into place only when complete, so a crash or an error never leaves a partial model.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from core.devices import dtype_size
from core.errors import CheckpointError
from core.fs import replace_folder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files copied from the base into a merged folder (config, generation config, tokenizer).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.)")  # a decoder layer's tensors: prefix, index


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (``model.layers.3.mlp.up_proj.weight`` -> 3; GPT-2's
    ``h.3.``, ``blocks.3.``, ``layer.3.`` too), None outside the layers."""
    m = LAYER.match(name)
    return int(m.group(2)) if m else None


_ST_DTYPE = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_FROM_ST = {v: k for k, v in _ST_DTYPE.items()}


def parse_size(size: str | int) -> int:
    """`"2GB"` -> 2_000_000_000, `"500MiB"` -> 524_288_000, ints pass through (bytes)."""
    if isinstance(size, int):
        if size <= 0:
            raise CheckpointError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"max_shard_size {size!r} is not a size such as '2GB' or '500MiB'")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    value = int(number * base**power)
    if value <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class CheckpointReader:
    """Lazy, memory-mapped access to the tensors of a HF model folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such model folder")
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_FILE).is_file():
            files, weight_map = [SINGLE_FILE], None
        else:
            raise CheckpointError(
                f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)"
            )
        self._files: dict[str, _SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        self._info: dict[str, TensorInfo] = {}
        for f in files:
            fp = self.path / f
            if not fp.is_file():
                raise CheckpointError(f"{self.path}: shard {f} named in the index is missing")
            sf = _SafetensorsFile(fp)
            self._files[f] = sf
            for name, info in sf.infos.items():
                self._where[name] = f
                self._info[name] = info
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._where))
            if missing:
                raise CheckpointError(f"{self.path}: tensor {missing[0]} is in the index but in no shard")

    def names(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def get(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._files[self._where[name]].read(name)
        return t.to(device=device, dtype=dtype or t.dtype)

    def get_rows(self, name: str, a: int, b: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """Rows a..b of a tensor (along its first dimension), read alone: a merge that works in
        runs of rows never holds the whole tensor."""
        t = self._files[self._where[name]].read(name, a, b)
        return t.to(device=device)

    def files(self) -> list[Path]:
        return [self.path / f for f in self._files]


class _SafetensorsFile:
    """One safetensors file: its header parsed and checked, tensors read on demand.

    Tensors are read with positioned reads (`os.pread`) into fresh buffers instead of
    through a memory map: a mapped checkpoint keeps every page it has touched resident in
    the process (in our 0.5 B benchmark the file-backed RSS grew to the size of all the
    inputs), while a read tensor's buffer is freed as soon as the tensor is merged.
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
        self.data_start = 8 + n
        self.infos: dict[str, TensorInfo] = {}
        self.spans: dict[str, tuple[int, int]] = {}
        header.pop("__metadata__", None)
        end = 0
        for name, h in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0]):
            try:
                dtype, shape, (a, b) = _FROM_ST[h["dtype"]], tuple(int(x) for x in h["shape"]), h["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name} has a malformed header entry") from None
            info = TensorInfo(shape, dtype)
            if a != end or b - a != info.numel * dtype_size(dtype) or self.data_start + b > size:
                raise CheckpointError(f"{path}: tensor {name} has inconsistent data offsets")
            end = b
            self.infos[name], self.spans[name] = info, (a, b)
        self.infos = {k: self.infos[k] for k in sorted(self.infos)}

    def read(self, name: str, first: int | None = None, last: int | None = None) -> torch.Tensor:
        """The tensor, or its rows first..last (first dimension)."""
        info, (a, b) = self.infos[name], self.spans[name]
        shape = info.shape
        if first is not None and shape:
            row = (b - a) // max(shape[0], 1)
            a, b, shape = a + first * row, a + last * row, (last - first, *shape[1:])
        if b == a:
            return torch.empty(shape, dtype=info.dtype)
        buf = bytearray(b - a)
        with open(self.path, "rb", buffering=0) as f:
            view, pos = memoryview(buf), 0
            while pos < len(buf):
                got = os.preadv(f.fileno(), [view[pos:]], self.data_start + a + pos)
                if got <= 0:
                    raise CheckpointError(f"{self.path}: file ended inside tensor {name}")
                pos += got
        return torch.frombuffer(buf, dtype=info.dtype).reshape(shape)


@dataclass
class _Shard:
    file: str
    names: list[str]
    header: bytes
    data_bytes: int


def plan_shards(infos: dict[str, TensorInfo], dtype_of: dict[str, torch.dtype], max_shard_size: int) -> list[_Shard]:
    """Assigns tensors, in order, to shards of at most `max_shard_size` bytes (a single
    larger tensor gets a shard of its own) and builds each shard's safetensors header."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, info in infos.items():
        nbytes = info.numel * dtype_size(dtype_of[name])
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    shards = []
    for i, names in enumerate(groups):
        file = SINGLE_FILE if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            nbytes = infos[name].numel * dtype_size(dtype_of[name])
            header[name] = {
                "dtype": _ST_DTYPE[dtype_of[name]],
                "shape": list(infos[name].shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        shards.append(_Shard(file, names, raw, offset))
    return shards


class CheckpointWriter:
    """Streams tensors into a new HF model folder; use as a context manager.

    Tensors must be written in the order of `infos` (the plan). On a clean exit the
    folder is complete and renamed to `out_dir`; on an exception it is deleted.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        infos: dict[str, TensorInfo],
        dtype: torch.dtype | None = None,
        max_shard_size: str | int = "2GB",
        overwrite: bool = False,
    ):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise CheckpointError(f"{self.out_dir}: output folder exists (choose another or allow overwrite: --overwrite)")
        self.infos = dict(infos)
        # Floating tensors take the requested dtype; integer buffers keep theirs.
        self.dtype_of = {
            n: (dtype if dtype is not None and i.dtype.is_floating_point else i.dtype) for n, i in self.infos.items()
        }
        self.shards = plan_shards(self.infos, self.dtype_of, parse_size(max_shard_size))
        self._order = [n for s in self.shards for n in s.names]
        self._shard_of = {n: i for i, s in enumerate(self.shards) for n in s.names}
        self._next = 0
        self._file = None
        self._shard_i = -1
        self._written_in_shard = 0
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> "CheckpointWriter":
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        return self

    def _open_next_shard(self) -> None:
        self._close_shard()
        self._shard_i += 1
        shard = self.shards[self._shard_i]
        self._file = open(self.tmp / shard.file, "wb")
        self._file.write(struct.pack("<Q", len(shard.header)))
        self._file.write(shard.header)
        self._written_in_shard = 0

    def _close_shard(self) -> None:
        if self._file is not None:
            shard = self.shards[self._shard_i]
            assert self._written_in_shard == shard.data_bytes, "shard data does not match its header"
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    @property
    def expected(self) -> list[str]:
        """The names still to write, in order."""
        return self._order[self._next:]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or name != self._order[self._next]:
            want = self._order[self._next] if self._next < len(self._order) else "nothing more"
            raise CheckpointError(f"writer expected {want}, got {name}")
        info = self.infos[name]
        if tuple(tensor.shape) != info.shape:
            raise CheckpointError(f"{name}: shape {tuple(tensor.shape)} differs from the planned {info.shape}")
        while self._shard_i < self._shard_of[name]:
            self._open_next_shard()
        t = tensor.detach().to(device="cpu", dtype=self.dtype_of[name]).contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self._file.write(memoryview(data))
        self._written_in_shard += t.numel() * t.element_size()
        self._next += 1

    def finish(self, side_files_from: str | os.PathLike | None = None, card: str | None = None,
               edit: Callable[[Path], None] | None = None) -> Path:
        """Closes the last shard, writes the index, side files and model card, lets `edit` change
        the folder's files (a new vocabulary's tokenizer and config), then renames into place."""
        if self._next != len(self._order):
            raise CheckpointError(f"writer finished early: {self._order[self._next]} and others not written")
        while self._shard_i < len(self.shards) - 1:  # shards holding only zero-size tensors
            self._open_next_shard()
        self._close_shard()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.data_bytes for s in self.shards)},
                "weight_map": {n: s.file for s in self.shards for n in s.names},
            }
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if side_files_from is not None:
            for f in SIDE_FILES:
                src = Path(side_files_from) / f
                if src.is_file():
                    shutil.copy2(src, self.tmp / f)
            if self.dtype_of and (self.tmp / "config.json").is_file():
                _set_config_dtype(self.tmp / "config.json", next(iter(self.dtype_of.values())))
        if card is not None:
            (self.tmp / "README.md").write_text(card)
        if edit is not None:
            edit(self.tmp)
        _replace_dir(self.tmp, self.out_dir, self.overwrite)
        self.tmp = None
        return self.out_dir

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def _set_config_dtype(config: Path, dtype: torch.dtype) -> None:
    cfg = json.loads(config.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in cfg or key == "torch_dtype":
            cfg[key] = name
    config.write_text(json.dumps(cfg, indent=2) + "\n")


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Renames `tmp` to `out` (`core.fs.replace_folder`); an existing `out` only if `overwrite`."""
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: output folder exists")
    replace_folder(tmp, out)


def write_checkpoint(
    out_dir: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "2GB",
    side_files_from: str | os.PathLike | None = None,
    card: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes an in-memory state dict as a HF folder (tests, the zoo, small models)."""
    infos = {n: TensorInfo(tuple(t.shape), t.dtype) for n, t in tensors.items()}
    with CheckpointWriter(out_dir, infos, dtype, max_shard_size, overwrite) as w:
        for n in w.expected:
            w.write(n, tensors[n])
        return w.finish(side_files_from, card)


def iter_tensors(reader: CheckpointReader, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    for n in names if names is not None else reader.names():
        yield n, reader.get(n)
