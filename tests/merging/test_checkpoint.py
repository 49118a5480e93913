import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file

from core.errors import CheckpointError
from merging.checkpoint import CheckpointReader, CheckpointWriter, TensorInfo, parse_size, write_checkpoint


def random_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "layer.0.w": torch.randn(16, 16, generator=g),
        "layer.0.b": torch.randn(16, generator=g),
        "layer.1.w": torch.randn(16, 16, generator=g).half(),
        "positions": torch.arange(12),
        "empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_sharded_round_trip_and_index(tmp_path, dtype):
    state = random_state()
    out = write_checkpoint(tmp_path / "m", state, dtype=dtype, max_shard_size=600)
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # not the temporary folder's 0700
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and set(index["weight_map"]) == set(state)
    total = 0
    for f in files:
        loaded = load_file(out / f)  # safetensors' own reader is the oracle for the format
        assert {n for n, s in index["weight_map"].items() if s == f} == set(loaded)
        size = sum(t.numel() * t.element_size() for t in loaded.values())
        assert size <= 600 or len(loaded) == 1
        total += size
    assert index["metadata"]["total_size"] == total
    reader = CheckpointReader(out)
    for n, t in state.items():
        want = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        got = reader.get(n)
        assert got.dtype == want.dtype and torch.equal(got, want), n


def test_single_file_when_it_fits(tmp_path):
    out = write_checkpoint(tmp_path / "m", random_state())
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    header_len = struct.unpack("<Q", (out / "model.safetensors").read_bytes()[:8])[0]
    assert header_len % 8 == 0


def test_failed_write_leaves_nothing(tmp_path):
    state = random_state()
    infos = {n: TensorInfo(tuple(t.shape), t.dtype) for n, t in state.items()}
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "m", infos, max_shard_size=1000) as w:
            w.write(w.expected[0], state[w.expected[0]])
            raise RuntimeError("crash in the middle")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_wrong_order_shape_and_existing(tmp_path):
    state = random_state()
    infos = {n: TensorInfo(tuple(t.shape), t.dtype) for n, t in state.items()}
    with CheckpointWriter(tmp_path / "m", infos) as w:
        with pytest.raises(CheckpointError, match="expected embed.weight"):
            w.write("layer.0.w", state["layer.0.w"])
        with pytest.raises(CheckpointError, match="shape"):
            w.write("embed.weight", torch.zeros(3))
        with pytest.raises(CheckpointError, match="finished early"):
            w.finish()
    (tmp_path / "exists").mkdir()
    with pytest.raises(CheckpointError, match="exists"):
        CheckpointWriter(tmp_path / "exists", infos)


def test_overwrite_replaces_atomically(tmp_path):
    write_checkpoint(tmp_path / "m", {"a": torch.ones(3)})
    write_checkpoint(tmp_path / "m", {"b": torch.zeros(2)}, overwrite=True)
    assert CheckpointReader(tmp_path / "m").names() == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_reader_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        CheckpointReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointReader(tmp_path / "empty")
    out = write_checkpoint(tmp_path / "m", random_state(), max_shard_size=1500)
    next(out.glob("model-00002-*")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        CheckpointReader(out)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        CheckpointReader(tmp_path / "junk")
    out = write_checkpoint(tmp_path / "cut", random_state())
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="inconsistent data offsets"):
        CheckpointReader(out)


@pytest.mark.parametrize("text,value", [("2GB", 2 * 10**9), ("500MiB", 500 * 2**20), ("1.5KB", 1500), (64, 64)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "GB", "-1GB", "2 parsecs", 0])
def test_parse_size_rejects(bad):
    with pytest.raises(CheckpointError):
        parse_size(bad)
