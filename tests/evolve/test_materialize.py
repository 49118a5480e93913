"""The resident merge and its task-vector stores (evolve.materialize, merging.store)."""

import numpy as np
import pytest
import torch
from factories import perturbed, save, state_dict, tiny_llama

import merging.chunks
from evolve.materialize import ResidentMerge, store_settings_for
from merging import merge
from merging.methods import get_method
from merging.store import StoredTensor, StoreSettings, tensor_bytes

METHODS = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base = save(tiny_llama(hidden=48, vocab=56), root / "base")
    return base, [perturbed(base, root / f"ft{i}", seed=i + 1, scale=0.05) for i in range(3)]


def params_for(method: str, rng: np.random.Generator):
    kw = {"weights": [float(w) for w in rng.uniform(0.1, 1.0, 3)]}
    if "ties" in method or "dare" in method:
        kw["density"] = float(rng.uniform(0.1, 0.9))
    return get_method(method).params(**kw)


def spec(base, models, method, p):
    return {"base": str(base), "models": [{"name": f"m{i}", "path": str(m)} for i, m in enumerate(models)],
            "method": method, "params": p.model_dump(by_alias=True, exclude_none=True), "device": "cpu"}


@pytest.mark.parametrize("method", METHODS)
def test_chunked_candidate_equals_the_streaming_merge(family, method, tmp_path, monkeypatch):
    """In float32 with the dense store, a candidate merged in runs of 64 elements (TIES' trims
    found over whole tensors in chunks) is the streamed checkpoint bit for bit, and so is an exact
    materialization with a lossy store (what the final check measures)."""
    base, models = family
    p = params_for(method, np.random.default_rng(3))
    exported = state_dict(merge(spec(base, models, method, p), tmp_path / "out", progress=False))  # whole tensors
    monkeypatch.setattr(merging.chunks, "CHUNK", 64)
    for store in ("dense", "sparse"):
        rm = ResidentMerge(base, models, method, device="cpu", store=store_settings_for(torch.float32, store))
        got = (rm.materialize(p, exact=True) if store == "sparse" else rm.materialize(p)).state_dict()
        assert exported.keys() == got.keys()
        for k in exported:
            assert torch.equal(exported[k], got[k]), (store, k)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_incremental_candidates_in_runs_equal_fresh_ones(family, method, monkeypatch):
    """float32 model and dense store, runs of 64 entries: a candidate written as the update of the
    previous one (old masks out, new in, run by run at each run's flat offset) equals a fresh
    materialization to float32 rounding (a run given another run's offset would differ by the
    task vectors' size, about 0.05)."""
    base, models = family
    monkeypatch.setattr(merging.chunks, "CHUNK", 64)
    rng = np.random.default_rng(4)
    cands = [params_for(method, rng) for _ in range(4)]
    fresh = ResidentMerge(base, models, method, device="cpu", reanchor_every=1)
    rm = ResidentMerge(base, models, method, device="cpu", reanchor_every=100)
    for p in cands:
        got = rm.materialize(p).state_dict()
        for k, want in fresh.materialize(p).state_dict().items():
            assert torch.allclose(got[k], want, rtol=0, atol=1e-5), k


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsv", "dare_ties"])
def test_incremental_drift_after_1000_candidates_is_bounded(method, tmp_path):
    """bfloat16 model, every candidate written as an update of the previous one and re-anchored
    every 16: after 1,000 random candidates, each weight lies within 8 bf16 steps of a fresh
    materialization of the same parameters, a step (ulp) taken at the largest magnitude the weight
    had since the anchor (each of 15 updates rounds by at most half a step, the fresh one too);
    without re-anchoring, 160 candidates already drift further."""
    root = tmp_path
    base = save(tiny_llama(hidden=16, layers=1, vocab=24), root / "base")
    models = [perturbed(base, root / f"ft{i}", seed=i + 1, scale=0.05) for i in range(3)]
    rng = np.random.default_rng(0)
    cands = [params_for(method, rng) for _ in range(1000)]
    fresh = ResidentMerge(base, models, method, device="cpu", dtype="bfloat16", reanchor_every=1)
    drifts = {}
    for every, n in ((16, 1000), (10**6, 160)):
        rm = ResidentMerge(base, models, method, device="cpu", dtype="bfloat16", reanchor_every=every)
        worst, peak = 0.0, None
        for i, p in enumerate(cands[:n]):
            sd = {k: v.float().abs() for k, v in rm.materialize(p).state_dict().items()}
            peak = sd if i % every == 0 else {k: torch.maximum(peak[k], v) for k, v in sd.items()}
            if i % 16 == 15:  # the last update before an anchor
                ref = fresh.materialize(p).state_dict()
                for k, v in rm.state_dict().items():
                    ulp = torch.maximum(peak[k], ref[k].float().abs()).clamp(min=1e-30).log2().floor().exp2() / 128
                    worst = max(worst, float(((v.float() - ref[k].float()).abs() / ulp).max()))
        drifts[every] = worst
    assert drifts[16] <= 8.0
    assert drifts[10**6] > drifts[16]


def test_store_forms_round_trip():
    """Dense at any setting and sparse at density 1 give the tensor back exactly; lowrank at the
    matrix's own rank reproduces a rank-3 matrix; sparse keeps exactly the k largest magnitudes
    (sorted by hand); each form's bytes are what `tensor_bytes` (the memory plan) says."""
    g = torch.Generator().manual_seed(0)
    low = torch.randn(60, 3, generator=g) @ torch.randn(3, 40, generator=g)
    full = torch.randn(60, 40, generator=g)
    f32 = lambda kind, **kw: StoreSettings(kind, torch.float32, **kw)  # noqa: E731
    for t in (low, full, full[0]):
        assert torch.equal(StoredTensor.make(t, "w", f32("dense")).get(), t)
        assert torch.equal(StoredTensor.make(t, "w", f32("sparse", density=1.0)).get(), t)
        assert torch.equal(StoredTensor.make(t, "w", f32("lowrank", rank=1.0)).get(), t)
    lr = StoredTensor.make(low, "w", f32("lowrank", rank=0.1))  # rank ceil(0.1 * 40) = 4 >= 3
    assert lr.form == "lowrank" and torch.allclose(lr.get(), low, atol=1e-4)
    k = int(0.2 * full.numel())
    order = sorted(range(full.numel()), key=lambda j: (-abs(float(full.view(-1)[j])), j))[:k]
    expect = torch.zeros(full.numel())
    expect[order] = full.view(-1)[order]
    sp = StoredTensor.make(full, "w", f32("sparse", density=0.2))
    assert sp.form == "sparse" and torch.equal(sp.get(), expect.view_as(full))
    for s in (StoreSettings("dense"), StoreSettings("lowrank", rank=0.05), StoreSettings("sparse", density=0.05)):
        for t, name in ((full, "model.layers.0.mlp.up_proj.weight"), (full, "model.embed_tokens.weight"), (full[0], "b")):
            assert StoredTensor.make(t, name, s).nbytes == tensor_bytes(t.shape, name, s), (s.kind, name)
    zero = StoredTensor.make(torch.zeros(6, 4), "w", StoreSettings("dense"))
    assert zero.nbytes == 0 and torch.equal(zero.get(), torch.zeros(6, 4))


@pytest.mark.parametrize("kind", ["dense", "lowrank", "sparse", "zero"])
def test_chunks_are_the_tensor_in_pieces(kind):
    """Runs of rows from `chunks` put back together are `get()` (sparse bits stay byte-aligned
    with 5 entries a row)."""
    g = torch.Generator().manual_seed(1)
    t = torch.zeros(37, 5) if kind == "zero" else torch.randn(37, 5, generator=g)
    s = StoredTensor.make(t, "w", StoreSettings("dense" if kind == "zero" else kind, torch.float32, rank=0.4, density=0.3))
    spans = [(a, min(a + 8, 37)) for a in range(0, 37, 8)]
    assert torch.equal(torch.cat(list(s.chunks(spans))), s.get())


@pytest.mark.parametrize("kind", ["dense", "lowrank", "sparse"])
def test_lossy_store_candidate_is_the_method_on_the_stored_vectors(family, kind):
    """With a compressed store the candidate is base + f(stored tau): checked against the method
    applied by hand to each tensor's round-tripped task vectors; the store's bytes are the plan's."""
    base, models = family
    settings = StoreSettings(kind, torch.float32, rank=0.25, density=0.3)
    rm = ResidentMerge(base, models, "ties", device="cpu", store=settings)
    p = params_for("ties", np.random.default_rng(1))
    got = rm.materialize(p).state_dict()
    b, fts = state_dict(base), [state_dict(m) for m in models]
    fn = get_method("ties").fn
    for name in got:
        taus = [StoredTensor.make(ft[name].float() - b[name].float(), name, settings).get() for ft in fts]
        assert torch.equal(got[name], fn(b[name].float(), taus, p, name)), name
    assert rm.cache_bytes == sum(tensor_bytes(t.shape, n, settings) for n, t in b.items()) * len(models)
