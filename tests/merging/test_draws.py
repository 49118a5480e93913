"""merging.draws: counter-based draws equal a plain-integer MurmurHash3 finalizer, on any slice,
block size and thread count, and behave as independent uniform bits (binomial bounds)."""
import math

import numpy as np
import pytest
import torch

import merging.draws as draws_mod
from merging.draws import draws, keep_scaled, stream_key, threshold

MASK = (1 << 32) - 1


def fmix32_reference(h: int) -> int:
    """MurmurHash3's fmix32 (Appleby, MurmurHash3.cpp) over Python integers."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK
    return h ^ (h >> 16)


def reference(key: int, j: int) -> int:
    hi, lo = divmod(j, 1 << 32)
    k = stream_key(key, hi) if hi else key
    return fmix32_reference(lo ^ k)


@pytest.mark.parametrize("start", [0, 12345, (1 << 31) - 40, (1 << 32) - 40, 5 << 32])
def test_draws_equal_the_integer_reference(start):
    key = stream_key(7, "model.layers.0.mlp.up_proj.weight", 2)
    got = draws(key, start, 100).tolist()
    assert [g & MASK for g in got] == [reference(key, j) for j in range(start, start + 100)]


def test_a_slice_draws_what_the_whole_draws(monkeypatch):
    key = stream_key(0, "w", 0)
    whole = draws(key, 0, 5000)
    assert torch.equal(draws(key, 1234, 777), whole[1234:2011])
    x = torch.randn(50, 100)
    want = keep_scaled(x, key, 0.3)
    monkeypatch.setattr(draws_mod, "BLOCK", 64)
    assert torch.equal(keep_scaled(x, key, 0.3), want)
    assert torch.equal(keep_scaled(x[20:37], key, 0.3, offset=20 * 100), want[20:37])


def test_masks_do_not_depend_on_the_thread_count():
    x, key = torch.randn(1 << 19), stream_key(3, "t", 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = keep_scaled(x, key, 0.37)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(keep_scaled(x, key, 0.37), one)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.9])
def test_keep_rates_and_independence_are_binomial(density):
    """Keep rate of 2^18 entries, joint keep rate of two streams, keeps of neighbouring entries:
    within 5 binomial standard deviations of d and d^2 (independent Bernoulli(d) draws)."""
    n = 1 << 18
    ones = torch.ones(n)
    a = keep_scaled(ones, stream_key(0, "w", 0), density) != 0
    b = keep_scaled(ones, stream_key(0, "w", 1), density) != 0
    assert abs(a.float().mean().item() - density) <= 5 * math.sqrt(density * (1 - density) / n)
    d2 = density ** 2
    for joint in ((a & b).float().mean().item(), (a[1:] & a[:-1]).float().mean().item()):
        assert abs(joint - d2) <= 5 * math.sqrt(d2 * (1 - d2) / n)
    kept = keep_scaled(ones, stream_key(0, "w", 0), density)
    assert torch.all(kept[a] == 1 / density)


def test_top_bytes_are_uniform():
    """Chi-square of the draws' top byte over 2^20 draws, 255 degrees of freedom: below the
    0.999 quantile (about 330)."""
    u = draws(stream_key(1, "x", 0), 0, 1 << 20).to(torch.int64) & MASK
    counts = np.bincount((u >> 24).numpy(), minlength=256)
    expected = len(u) / 256
    assert ((counts - expected) ** 2 / expected).sum() < 330


def test_masks_follow_the_documented_rule():
    """Entry j is kept when (u_j xor 2^31) < round(density * 2^32), u_j the integer reference:
    checked entry by entry, at a slice's offset and on a transposed (non-contiguous) input, whose
    entries are numbered in row-major order."""
    key, d = stream_key(11, "model.embed_tokens.weight", 1), 0.37
    x = torch.randn(40, 30) + 5.0  # no zeros: a zero entry reads as dropped
    got = keep_scaled(x, key, d, offset=1000) != 0
    want = [(reference(key, 1000 + j) ^ (1 << 31)) < round(d * (1 << 32)) for j in range(x.numel())]
    assert got.reshape(-1).tolist() == want
    xt = x.t()
    assert not xt.is_contiguous()
    assert torch.equal(keep_scaled(xt, key, d, offset=1000), keep_scaled(xt.contiguous(), key, d, offset=1000))


@pytest.mark.parametrize("density, kept", [(2.0 ** -34, 0.0), (0.5, None), (1 - 1e-10, 1.0), (1 - 2.0 ** -34, 1.0)])
def test_extreme_densities_keep_what_they_say(density, kept):
    """threshold() counts the draws kept out of 2^32; at the ends no draw is wrongly all-or-nothing
    (a threshold of 2^31 must not wrap to -2^31 and drop every entry)."""
    assert threshold(density) + (1 << 31) == round(density * (1 << 32))
    out = keep_scaled(torch.ones(1 << 16), stream_key(2, "w", 0), density)
    share = float((out != 0).float().mean())
    if kept is None:
        assert abs(share - density) < 0.01
    else:
        assert share == kept


@pytest.mark.gpu
def test_cuda_draws_equal_cpu_draws():
    key = stream_key(5, "model.embed_tokens.weight", 0)
    assert torch.equal(draws(key, (1 << 31) - 1000, 1 << 20, "cuda").cpu(), draws(key, (1 << 31) - 1000, 1 << 20))
    x = torch.randn(300, 700)
    assert torch.equal(keep_scaled(x.cuda(), key, 0.3).cpu(), keep_scaled(x, key, 0.3))
