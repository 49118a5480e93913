"""Merge methods against closed forms, brute-force loop references and properties."""

import pytest
import torch

from merging.methods import get_method, method_params, methods
from merging.methods.tsv import tsv_c, tsv_m_factors


def run(method, base, deltas, name="layers.0.mlp.up_proj.weight", **params):
    p = method_params(method, params, len(deltas))
    return get_method(method).fn(base, deltas, p, name)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", sorted(methods("tensor")))
@pytest.mark.parametrize("shape", [(12, 8), (8,)])
def test_identical_copies_of_base_give_base(method, shape):
    base = rand(*shape)
    out = run(method, base, [torch.zeros(shape)] * 3)
    assert torch.allclose(out, base, atol=1e-6)


@pytest.mark.parametrize("method,params", [("task_arithmetic", {"lambda": 0}), ("ties", {"lambda": 0}),
                                           ("dare_linear", {"lambda": 0}), ("dare_ties", {"lambda": 0}),
                                           ("tsv", {"alpha": 0})])
def test_zero_scale_gives_base(method, params):
    base = rand(10, 6)
    assert torch.equal(run(method, base, [rand(10, 6, seed=s) for s in (1, 2)], **params), base)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_identical_fine_tunes_give_the_fine_tune(method):
    """Averaging-type merges of N copies of one model return that model (density 1: nothing trimmed)."""
    base, tau = rand(9, 7), rand(9, 7, seed=1)
    extra = {} if method == "linear" else {"density": 1.0}
    assert torch.allclose(run(method, base, [tau] * 4, **extra), base + tau, atol=1e-6)


def test_task_arithmetic_and_linear_formulas():
    base, taus = rand(5, 4), [rand(5, 4, seed=s) for s in (1, 2, 3)]
    w = [0.5, -1.0, 2.0]
    want = base + 0.7 * (0.5 * taus[0] - 1.0 * taus[1] + 2.0 * taus[2])
    assert torch.allclose(run("task_arithmetic", base, taus, weights=w, **{"lambda": 0.7}), want, atol=1e-6)
    models = [base + t for t in taus]
    w = [1.0, 2.0, 1.0]
    want = sum(wi * m for wi, m in zip(w, models)) / sum(w)
    assert torch.allclose(run("linear", base, taus, weights=w), want, atol=1e-6)


def ties_reference(base, taus, densities, weights, lam):
    """TIES written entry by entry with Python loops, independently of the vectorized code."""
    flat = [t.flatten().tolist() for t in taus]
    trimmed = []
    for vec, d in zip(flat, densities):
        k = int(d * len(vec))
        order = sorted(range(len(vec)), key=lambda j: (-abs(vec[j]), j))[:k]
        keep = set(order)
        trimmed.append([v if j in keep else 0.0 for j, v in enumerate(vec)])
    out = []
    for j in range(len(flat[0])):
        s = sum(w * t[j] for w, t in zip(weights, trimmed))
        sign = 1.0 if s >= 0 else -1.0
        num = den = 0.0
        for w, t in zip(weights, trimmed):
            wt = w * t[j]
            if wt != 0 and (wt > 0) == (sign > 0):
                num += wt
                den += w
        out.append(num / den if abs(den) >= 1e-8 else num)
    return base + lam * torch.tensor(out).view_as(base)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("densities,weights,lam", [([0.2] * 3, [1.0] * 3, 1.0), ([0.5, 0.3, 0.9], [1.0, 0.5, 2.0], 0.8),
                                                   ([0.4, 0.6, 0.25], [0.7, -0.4, 0.0], 1.0)])
def test_ties_against_loop_reference(densities, weights, lam, tied, chunked, monkeypatch):
    """Whole tensors, and runs of 2 rows with the trims found over the whole tensor in chunks of
    3 rows (what an evolve job's resident merge does), with magnitudes tied at the trim
    threshold (rounded to one decimal) and negative and zero weights."""
    import merging.selection

    base, taus = rand(7, 6), [rand(7, 6, seed=s) for s in (1, 2, 3)]
    if tied:
        taus = [t.round(decimals=1) for t in taus]
    m = get_method("ties")
    p = method_params("ties", {"density": densities, "weights": weights, "lambda": lam}, 3)
    if chunked:  # and by radix selection, as large tensors are
        monkeypatch.setattr(merging.selection, "SMALL", 0)
        ctx = m.context([lambda t=t: [t[a:a + 3].reshape(-1) for a in range(0, 7, 3)] for t in taus], 42, p, "w")
        got = torch.cat([m.fn(base[a:a + 2], [t[a:a + 2] for t in taus], p, "w", ctx=ctx, offset=a * 6)
                         for a in range(0, 7, 2)])
    else:
        got = m.fn(base, taus, p, "w")
    assert torch.allclose(got, ties_reference(base, taus, densities, weights, lam), atol=1e-5)


@pytest.mark.parametrize("radix", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trim_selection_equals_sorting(dtype, radix, monkeypatch):
    """The radix selection (and kthvalue, which small tensors take) keeps exactly the entries a
    stable sort by magnitude keeps, with many ties (bfloat16 values, zeros, repeated magnitudes
    of both signs) and at every k; so does it from a kept histogram (`CachedChunks`, its first
    pass made once for all k; for bfloat16 values without the second)."""
    import merging.selection
    from merging.methods.ties import trim_top_k

    monkeypatch.setattr(merging.selection, "SMALL", 0 if radix else 1 << 16)
    monkeypatch.setattr(merging.selection, "TIE_SCAN", 37)  # ties looked for across several pieces

    g = torch.Generator().manual_seed(0)
    tau = (torch.randn(997, generator=g) * 0.01).to(dtype).float()
    tau[::7] = 0.0
    tau[1::13] = -tau[::13][:len(tau[1::13])]
    order = sorted(range(len(tau)), key=lambda j: (-abs(float(tau[j])), j))
    passes = []
    cached = merging.selection.CachedChunks(lambda: passes.append(1) or (c for c in tau.split(100)),
                                            bfloat16=dtype == torch.bfloat16)
    for k in [0, 1, 2, 50, 143, 500, 855, 996, 997]:
        keep = torch.zeros(len(tau), dtype=torch.bool)
        keep[order[:k]] = True
        assert torch.equal(trim_top_k(tau, (k + 0.5) / len(tau) if k < len(tau) else 1.0), tau * keep), k
        streamed = merging.selection.find_trim(lambda: (c for c in tau.split(100)), len(tau), k)  # chunks from disk
        assert streamed == merging.selection.find_trim(lambda: [tau], len(tau), k), k
        assert merging.selection.find_trim(cached, len(tau), k) == streamed, k
    if radix:  # one histogram pass in all; then per k at most a second histogram and the tie scan
        assert cached.nbytes == 4 * merging.selection.HI_BINS
        assert len(passes) <= 1 + 7 * (1 if dtype == torch.bfloat16 else 2) + 7


def test_ties_sign_election_by_hand():
    base = torch.zeros(3)
    taus = [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([3.0, -2.0, -1.0]), torch.tensor([-1.0, 4.0, -0.5])]
    # entry 0: sum 3 > 0 -> mean of 1, 3; entry 1: sum 1 > 0 -> 4; entry 2: sum 0.5 > 0 -> 2
    assert torch.allclose(run("ties", base, taus, density=1.0), torch.tensor([2.0, 4.0, 2.0]))


def test_dare_drops_and_rescales():
    base, tau = torch.zeros(200, 50), rand(200, 50, seed=3)
    out = run("dare_linear", base, [tau], density=0.3, seed=5)
    kept = out != 0
    assert torch.allclose(out[kept], tau[kept] / 0.3)
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    assert torch.equal(out, run("dare_linear", base, [tau], density=0.3, seed=5))
    assert not torch.equal(out, run("dare_linear", base, [tau], density=0.3, seed=6))
    assert not torch.equal(out, run("dare_linear", base, [tau], name="other.weight", density=0.3, seed=5))


def test_dare_draws_each_models_mask_apart():
    """Two identical task vectors, weight on one or the other: different masks, so different
    merges (a mask keyed only by seed and tensor would give the same)."""
    base, tau = torch.zeros(100, 40), rand(100, 40, seed=3)
    one = run("dare_linear", base, [tau, tau], density=0.5, weights=[1.0, 0.0])
    other = run("dare_linear", base, [tau, tau], density=0.5, weights=[0.0, 1.0])
    both = (one != 0) & (other != 0)
    assert not torch.equal(one, other)
    assert abs(both.float().mean().item() - 0.25) < 0.03  # independent Bernoulli(0.5) masks


def test_dare_is_unbiased_over_seeds():
    base, tau = torch.zeros(30, 20), rand(30, 20, seed=4)
    mean = torch.stack([run("dare_linear", base, [tau], density=0.5, seed=s) for s in range(2000)]).mean(0)
    # each entry's mean of 2000 draws of tau*2*Bernoulli(0.5) has sd |tau|/sqrt(2000)
    assert torch.all((mean - tau).abs() <= 5 * tau.abs() / 2000**0.5 + 1e-6)


@pytest.mark.parametrize("density", [1.0])
def test_dare_without_drop_reduces_to_its_combiner(density):
    base, taus = rand(6, 5), [rand(6, 5, seed=s) for s in (1, 2)]
    assert torch.allclose(run("dare_linear", base, taus, density=density),
                          run("task_arithmetic", base, taus), atol=1e-6)
    assert torch.allclose(run("dare_ties", base, taus, density=density),
                          run("ties", base, taus, density=density), atol=1e-6)


def test_tsv_factors_are_orthonormal():
    taus = [rand(24, 16, seed=s) for s in range(4)]
    u, s, v, task = tsv_m_factors(taus)
    assert task.tolist() == [i for i in range(4) for _ in range(4)]
    assert u.shape == (24, 16) and v.shape == (16, 16) and s.shape == (16,)
    assert torch.allclose(u.T @ u, torch.eye(16), atol=1e-5)
    assert torch.allclose(v.T @ v, torch.eye(16), atol=1e-5)


def test_tsv_one_task_full_rank_is_task_arithmetic():
    base, tau = rand(10, 7), rand(10, 7, seed=1)
    assert torch.allclose(run("tsv", base, [tau]), base + tau, atol=1e-5)


def low_rank(m, n, r, seed):
    return rand(m, r, seed=seed) @ rand(r, n, seed=seed + 100)


def test_tsv_c_keeps_energy_of_low_rank_task_vectors():
    tau = low_rank(30, 20, 3, seed=1)
    u, s, v, kept = tsv_c(tau, 3)
    assert kept > 1 - 1e-6
    assert torch.allclose((u * s) @ v.T, tau, atol=1e-4)
    *_, kept1 = tsv_c(tau, 1)
    sv = torch.linalg.svdvals(tau)
    assert abs(kept1 - float(sv[0] ** 2 / (sv**2).sum())) < 1e-6


def test_tsv_merges_orthogonal_low_rank_tasks_exactly():
    """Tasks in mutually orthogonal rank-3 subspaces (k = 12 // 4 = 3) do not interfere: TSV-M = task arithmetic."""
    q_left, _ = torch.linalg.qr(rand(16, 16, seed=7))
    q_right, _ = torch.linalg.qr(rand(12, 12, seed=8))
    taus = []
    for i in range(4):
        s = torch.diag(torch.tensor([3.0 + i, 2.0 + i, 1.0 + i]))
        taus.append(q_left[:, 3 * i:3 * i + 3] @ s @ q_right[:, 3 * i:3 * i + 3].T)
    base = rand(16, 12)
    assert torch.allclose(run("tsv", base, taus), base + sum(taus), atol=1e-5)


def test_tsv_weights_scale_each_tasks_singular_values_after_orthogonalization():
    """Step 4 with weights, in the factor form of the paper: U_perp diag(S * w[task]) V_perp^T."""
    base, taus = rand(10, 8), [rand(10, 8, seed=s) for s in (1, 2, 3)]
    u, s, v, task = tsv_m_factors(taus)
    w = torch.tensor([0.5, 0.0, 2.0])
    want = base + 0.7 * (u * (s * w[task])) @ v.T
    assert torch.allclose(run("tsv", base, taus, alpha=0.7, weights=w.tolist()), want, atol=1e-5)


def test_tsv_averages_non_matrices_and_embeddings():
    base, taus = rand(8), [rand(8, seed=s) for s in (1, 2)]
    assert torch.allclose(run("tsv", base, taus), base + (taus[0] + taus[1]) / 2, atol=1e-6)
    base, taus = rand(8, 4), [rand(8, 4, seed=s) for s in (1, 2)]
    got = run("tsv", base, taus, name="model.embed_tokens.weight")
    assert torch.allclose(got, base + (taus[0] + taus[1]) / 2, atol=1e-6)


@pytest.mark.parametrize("method,params,msg", [
    ("ties", {"density": 1.5}, "params.density"),
    ("ties", {"densty": 0.5}, "params.densty"),
    ("task_arithmetic", {"weights": [1.0]}, "params.weights: 1 values for 2 models"),
    ("linear", {"lambda": 1.0}, "params.lambda"),
])
def test_params_validation_names_the_field(method, params, msg):
    with pytest.raises(ValueError, match=msg.replace(".", r"\.")):
        method_params(method, params, 2)


@pytest.mark.parametrize("method,params", [("tsv", {"alpha": 0.7, "weights": [0.0, 1.5]})])
@pytest.mark.parametrize("shape", [(12, 9), (9,)])
def test_prepared_path_equals_raw_path(method, params, shape):
    """What a search prepares once gives the same merge as the streaming path."""
    base, taus = rand(*shape), [rand(*shape, seed=s) for s in (1, 2)]
    m = get_method(method)
    prepared = m.prepare(taus, "layers.0.w")
    p = method_params(method, params, 2)
    assert torch.allclose(m.fn(base, prepared, p, "layers.0.w"), m.fn(base, taus, p, "layers.0.w"), atol=1e-6)
    if method == "tsv":  # one computation either way: an evolve candidate equals its export exactly
        assert torch.equal(m.fn(base, prepared, p, "layers.0.w"), m.fn(base, taus, p, "layers.0.w"))


def test_ties_breaks_magnitude_ties_in_index_order():
    tau = torch.tensor([1.0, -2.0, 3.0, 2.0, -2.0, 0.5])
    assert run("ties", torch.zeros(6), [tau], density=0.5).tolist() == [0.0, -2.0, 3.0, 2.0, 0.0, 0.0]


def test_ties_with_many_equal_magnitudes_against_loop_reference():
    g = torch.Generator().manual_seed(9)
    base = torch.zeros(8, 6)
    taus = [torch.randint(-3, 4, (8, 6), generator=g).float() for _ in range(3)]
    got = run("ties", base, taus, density=[0.3, 0.5, 0.7], weights=[1.0, 0.5, 2.0])
    assert torch.allclose(got, ties_reference(base, taus, [0.3, 0.5, 0.7], [1.0, 0.5, 2.0], 1.0), atol=1e-6)
