"""merging.chunks: a method run on runs of rows gives the whole tensor's values bit for bit."""
import numpy as np
import pytest
import torch

import merging.chunks as chunks
from merging.chunks import merge_rows, row_chunks
from merging.methods import get_method


def _params(method: str, rng):
    kw = {"weights": [float(w) for w in rng.uniform(-0.3, 1.0, 3)]}
    if "ties" in method or "dare" in method:
        kw["density"] = float(rng.uniform(0.1, 0.9))
    return get_method(method).params(**kw)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "tsv"])
@pytest.mark.parametrize("shape", [(300, 70), (1000, 3), (37, 5, 4)])
def test_runs_of_rows_give_the_whole_tensors_values(method, shape, monkeypatch):
    """Task vectors rounded to bfloat16 (many magnitudes tied at TIES' k-th value), runs of at
    most 512 entries: every method equals its own call on the whole tensor, bit for bit (DARE and
    TSV, which cannot run on rows, are called whole)."""
    monkeypatch.setattr(chunks, "CHUNK", 512)
    rng = np.random.default_rng(sum(shape))
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=gen)
    deltas = [(torch.randn(shape, generator=gen) * 0.01).bfloat16().float() for _ in range(3)]
    m, p = get_method(method), _params(method, rng)
    want = m.fn(base, deltas, p, "model.layers.0.mlp.up_proj.weight")
    got = merge_rows(m, base, deltas, p, "model.layers.0.mlp.up_proj.weight")
    assert torch.equal(got, want)
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
