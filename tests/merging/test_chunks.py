"""merging.chunks: a method run on runs of rows gives the whole tensor's values bit for bit."""
import numpy as np
import pytest
import torch

import merging.chunks as chunks
from merging.chunks import merge_rows, row_chunks
from merging.methods import get_method
from merging.task_vectors import ModelSource


def _params(method: str, rng):
    kw = {"weights": [float(w) for w in rng.uniform(-0.3, 1.0, 3)]}
    if "ties" in method or "dare" in method:
        kw["density"] = float(rng.uniform(0.1, 0.9))
    return get_method(method).params(**kw)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv"])
@pytest.mark.parametrize("shape", [(300, 70), (1000, 3), (37, 5, 4)])
def test_runs_of_rows_give_the_whole_tensors_values(method, shape, monkeypatch):
    """Task vectors rounded to bfloat16 (many magnitudes tied at TIES' k-th value), runs of at
    most 512 entries: every method equals its own call on the whole tensor, bit for bit, given the
    task vectors whole or as functions making their rows (TSV, which cannot run on rows, is called
    whole; DARE's masks are drawn per entry, so a run draws its own)."""
    monkeypatch.setattr(chunks, "CHUNK", 512)
    rng = np.random.default_rng(sum(shape))
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=gen)
    deltas = [(torch.randn(shape, generator=gen) * 0.01).bfloat16().float() for _ in range(3)]
    m, p = get_method(method), _params(method, rng)
    want = m.fn(base, deltas, p, "model.layers.0.mlp.up_proj.weight")
    got = merge_rows(m, base, deltas, p, "model.layers.0.mlp.up_proj.weight")
    assert torch.equal(got, want)
    as_rows = [lambda a, b, base_rows, d=d: d[a:b] + 0 * base_rows for d in deltas]  # made run by run (TIES: streamed)
    assert torch.equal(merge_rows(m, base, as_rows, p, "model.layers.0.mlp.up_proj.weight"), want)
    assert len(row_chunks(shape, True)) > 1  # the case runs in several runs when the method allows it


def test_row_chunks_cover_the_tensor_in_aligned_runs(monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK", 100)
    for shape in [(37, 5), (1000, 3), (7, 300), (9,)]:
        spans = row_chunks(shape, True)
        assert spans[0][0] == 0 and spans[-1][1] == shape[0]
        assert all(a == b for (_, a), (b, _) in zip(spans, spans[1:]))
        assert all((b - a) * int(np.prod(shape[1:])) % 8 == 0 for a, b in spans[:-1])
        assert all((b - a) * int(np.prod(shape[1:])) <= max(100, 8 * int(np.prod(shape[1:]))) for a, b in spans)
    assert row_chunks((1000, 3), False) == [(0, 1000)]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv"])
def test_the_engine_by_runs_writes_the_same_bytes(method, tmp_path, monkeypatch):
    """merging.merge on two bfloat16 fine-tunes and a LoRA adapter (its embedding's delta transposed,
    non-contiguous): with runs of 256 entries (every
    matrix merged a run at a time; for linear, task arithmetic and DARE read as stored and made
    float32 run by run) the output equals the whole-tensor merge, byte for byte."""
    from factories import perturbed, save, tiny_llama
    from peft import LoraConfig, get_peft_model

    from merging import merge

    base = save(tiny_llama().to(torch.bfloat16), tmp_path / "base")
    fts = [perturbed(base, tmp_path / f"ft{i}", seed=i + 1) for i in range(2)]
    torch.manual_seed(1)
    get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "down_proj", "embed_tokens"])).save_pretrained(
                                                tmp_path / "lora", save_embedding_layers=False)  # a transposed delta
    p = _params(method, np.random.default_rng(5)).model_dump(by_alias=True, exclude_none=True)
    spec = {"base": str(base), "models": [{"name": f"m{i}", "path": str(m)} for i, m in enumerate([*fts, tmp_path / "lora"])],
            "method": method, "params": p, "device": "cpu"}
    whole = merge(spec, tmp_path / "whole", progress=False)
    monkeypatch.setattr(chunks, "CHUNK", 256)
    read_as = []
    as_rows = ModelSource.delta_rows
    monkeypatch.setattr(ModelSource, "delta_rows", lambda self, n, b: read_as.append(b.dtype) or as_rows(self, n, b))
    runs = merge(spec, tmp_path / "runs", progress=False)
    assert set(read_as) == ({torch.bfloat16} if method in ("linear", "task_arithmetic", "dare_linear", "dare_ties") else set())
    files = sorted(f.name for f in whole.glob("*.safetensors"))
    assert files and files == sorted(f.name for f in runs.glob("*.safetensors"))
    assert all((whole / f).read_bytes() == (runs / f).read_bytes() for f in files)
