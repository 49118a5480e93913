"""Counter-based random draws: the draw for entry j of stream `key` is a hash of (key, j).

A stateful generator (torch's Mersenne twister on the CPU, Philox on CUDA) must draw a tensor's
entries in order, from its start, on one device: its masks differ across devices, and a run of
rows cannot draw its own entries without drawing every entry before them. A counter-based
generator (Salmon et al., SC 2011, "Parallel random numbers: as easy as 1, 2, 3") computes draw j
directly as a bijective hash of the counter j mixed with the stream's key, so any slice of a
tensor, on any device, with any number of threads, gets the same bits.

The hash is MurmurHash3's 32-bit finalizer (fmix32: xor-shift, multiply, three times; Appleby,
2011), applied to j xor key in int32 lanes with wrapping multiplies: every 32-bit output is
equally likely. The draw u_j is that output's bits; an entry is kept when u_j read as a signed
int32 is below round(density * 2^32) - 2^31 (as unsigned: u_j xor 2^31 < round(density * 2^32)),
with probability density to 2^-32. On the CPU a mask costs 1.6 ns an entry on two threads
(`torch.rand` and a compare: 3.5 ns), hashed in blocks that stay in the cache.
"""
from __future__ import annotations

import zlib

import torch

BLOCK = 1 << 18  # entries hashed at once on the CPU (1 MB of int32: cached, and few parallel regions); a GPU: 2^24
_M1, _M2 = 0x85EBCA6B - (1 << 32), 0xC2B2AE35 - (1 << 32)  # fmix32's multipliers as signed int32


def stream_key(*parts: object) -> int:
    """A 32-bit stream key from its parts (seed, tensor name, model index...)."""
    return zlib.crc32(":".join(map(str, parts)).encode())


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finalizer, in place on an int32 tensor read as unsigned (shifts made logical
    by masking; multiplies wrap mod 2^32). Returns `x`."""
    x ^= (x >> 16) & 0xFFFF
    x.mul_(_M1)
    x ^= (x >> 13) & 0x7FFFF
    x.mul_(_M2)
    x ^= (x >> 16) & 0xFFFF
    return x


def _signed(u: int) -> int:
    return u - (1 << 32) if u >= 1 << 31 else u


def draws(key: int, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """u_j for j = start .. start + n - 1 of stream `key`, as int32 (the unsigned value's bits).

    Counters are taken mod 2^32 with the higher bits folded into the key, so tensors of more than
    4 G entries draw distinct streams per 4 G block."""
    out = torch.empty(n, dtype=torch.int32, device=device)
    j = start
    while j < start + n:
        hi, lo = divmod(j, 1 << 32)
        m = min(start + n - j, (1 << 31) - lo % (1 << 31))  # counters of one sign as int32
        first = _signed(lo)
        part = out[j - start:j - start + m]
        torch.arange(first, first + m, dtype=torch.int32, device=device, out=part)
        part ^= _signed(stream_key(key, hi) if hi else key)
        fmix32(part)
        j += m
    return out


def threshold(density: float) -> int:
    """The t with P(u_j read as a signed int32 < t) = round(density * 2^32) / 2^32; 2^31 keeps all."""
    return round(density * (1 << 32)) - (1 << 31)


def keep_scaled(x: torch.Tensor, key: int, density: float, offset: int = 0) -> torch.Tensor:
    """x * m / density with m_j = [u_j as signed < threshold(density)] for entry j = offset + the
    row-major flat index of x (a new tensor unless nothing is dropped; `x`, of any strides, may be
    rows of a larger tensor starting at flat index `offset`)."""
    t = threshold(density)
    if t >= 1 << 31:  # density within 2^-33 of 1: every draw is below it
        return x
    out = (x / density).contiguous()
    flat = out.view(-1)
    block = BLOCK if out.device.type == "cpu" else 1 << 24
    for s in range(0, flat.numel(), block):
        part = flat[s:s + block]
        part.mul_(draws(key, offset + s, part.numel(), out.device) < t)
    return out
