"""The k entries of largest magnitude of a tensor, found by radix selection on float bits.

TIES keeps the top density * numel entries of each task vector by magnitude (ties at the k-th
magnitude in index order), per candidate; the sparse task-vector store keeps them once. A
sort costs O(n log n) and `kthvalue` a full copy; here the threshold comes from counting:
for non-negative floats, the order of the bit patterns is the order of the values, so two
histograms (the high 16 bits, then the low 16 bits inside the one bin that holds the k-th
value) give the k-th largest magnitude exactly, and one scan finds where its ties stop.
Every pass streams over chunks of the tensor, so memory is one chunk (chunks given as a list are
in memory already: their magnitudes' bits are made once, one int32 copy), and the result is the
stable sort's (tests/test_methods.py checks it against sorting, ties included).

The first histogram does not depend on k: `CachedChunks` keeps it (32,768 int32 counts, 128 KB a
tensor) for a tensor whose chunks never change, such as an evolve job's stored task vectors, so
that each candidate's trims skip that pass; for bfloat16 values (low 16 bits zero) the second
histogram is skipped too, since each bin of the first holds a single value.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple

import torch

SMALL = 1 << 16  # at most this many entries: selected by kthvalue (the histograms' fixed cost is higher)
TIE_SCAN = 1 << 18  # entries compared at a time while looking for the last tied entry kept
Chunks = Callable[[], Iterable[torch.Tensor]]  # a tensor's flat chunks, in index order (a list: in memory)
HI_BINS = 1 << 15  # the magnitudes' high 16 bits, sign cleared
HISTOGRAM_BYTES = 4 * HI_BINS  # one kept histogram (int32 counts)


def by_radix(numel: int) -> bool:
    """Whether a tensor of `numel` entries is selected by histograms (else by kthvalue), and so
    whether `CachedChunks` keeps a histogram for it."""
    return numel > SMALL


class CachedChunks:
    """`Chunks` that always yield the same values, with their high-bits histogram kept after its
    first use (in `out`, an int32 [HI_BINS] row of a block the caller allocated at once, so that
    many small long-lived buffers do not fragment the heap); `bfloat16`: every value is a
    bfloat16 (its float32 bits' low half is zero)."""

    def __init__(self, chunks: Chunks, bfloat16: bool = False, out: torch.Tensor | None = None):
        self.chunks, self.bfloat16, self.out, self._hist = chunks, bfloat16, out, None

    def __call__(self) -> Iterable[torch.Tensor]:
        return self.chunks()

    def histogram(self, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self._hist is None:
            h = make()
            self._hist = self.out.copy_(h) if self.out is not None else h.to(torch.int32)
        return self._hist.long()

    @property
    def nbytes(self) -> int:
        return 0 if self._hist is None else self._hist.numel() * 4


class Trim(NamedTuple):
    """Which entries are kept: |x| > threshold, and |x| == threshold at flat indices <= cutoff
    (the first of the tied entries, in index order, up to k in all). threshold < 0: all."""

    threshold: float
    cutoff: int


def _magnitude_bits(chunk: torch.Tensor) -> torch.Tensor:
    return chunk.float().abs().view(torch.int32).reshape(-1)


def _bits_value(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _select_bin(hist: torch.Tensor, need: int) -> tuple[int, int]:
    """(bin b, count above b): the bin holding the `need`-th largest value of a histogram."""
    above = hist.flip(0).cumsum(0).flip(0) - hist
    b = int(((above < need) & (above + hist >= need)).nonzero()[-1])
    return b, int(above[b])


def find_trim(chunks: Chunks, numel: int, k: int) -> Trim:
    """The `Trim` keeping exactly the k largest magnitudes (NaN-free input)."""
    if k >= numel:
        return Trim(-1.0, -1)
    if k <= 0:
        return Trim(math.inf, -1)
    if not by_radix(numel):
        return _find_trim_small(torch.cat([c.float().abs().reshape(-1) for c in chunks()]), k)
    first = chunks()
    if isinstance(first, (list, tuple)):  # in memory already: the magnitudes' bits made once for every pass
        bits = [_magnitude_bits(c) for c in first]
        chunk_bits = lambda: bits  # noqa: E731
    else:  # streamed (an iterator): made again on each pass, one chunk at a time
        chunk_bits = lambda: (_magnitude_bits(c) for c in chunks())  # noqa: E731
    def high_histogram() -> torch.Tensor:
        hi = torch.zeros(HI_BINS, dtype=torch.int64)
        for b16 in chunk_bits():
            hi += torch.bincount((b16 >> 16).cpu(), minlength=HI_BINS)
        return hi

    cached = isinstance(chunks, CachedChunks)
    hi = chunks.histogram(high_histogram) if cached else high_histogram()
    b, above = _select_bin(hi, k)
    if int(hi[b]) == k - above:  # the whole bin is kept: keep |x| >= its smallest possible value
        return Trim(_bits_value(b << 16), numel)
    if cached and chunks.bfloat16:  # the bin is one value
        threshold, room, tied = b << 16, k - above, int(hi[b])
    else:
        lo = torch.zeros(1 << 16, dtype=torch.int64)
        for b16 in chunk_bits():
            lo += torch.bincount((b16[(b16 >> 16) == b] & 0xFFFF).cpu(), minlength=1 << 16)
        low, above_in_bin = _select_bin(lo, k - above)
        threshold = (b << 16) | low
        room, tied = k - above - above_in_bin, int(lo[low])
    if room >= tied:
        return Trim(_bits_value(threshold), numel)
    offset = 0
    for b16 in chunk_bits():
        for piece in b16.split(TIE_SCAN):  # the tied entries up to the room-th: stop there
            eq = piece == threshold
            tied = int(eq.sum())  # counted, not listed, until the piece that holds the room-th
            if room <= tied:
                return Trim(_bits_value(threshold), offset + int(eq.nonzero()[room - 1]))
            room, offset = room - tied, offset + piece.numel()
    raise AssertionError("tied entries counted but not found")  # pragma: no cover


def _find_trim_small(mag: torch.Tensor, k: int) -> Trim:
    """The same `Trim` by `kthvalue`, for tensors small enough that 2^16-bin histograms cost more."""
    threshold = mag.kthvalue(mag.numel() - k + 1).values
    room = k - int((mag > threshold).sum())
    tied = (mag == threshold).nonzero().reshape(-1)
    return Trim(threshold.item(), mag.numel() if room >= len(tied) else int(tied[room - 1]))


def keep_mask(x: torch.Tensor, trim: Trim, offset: int = 0) -> torch.Tensor:
    """The bool mask of the entries `trim` keeps; `x` may be a slice starting at flat `offset`."""
    mag = x.abs().reshape(-1)
    cut = min(max(trim.cutoff - offset + 1, 0), mag.numel())  # entries up to the cutoff keep their ties
    keep = torch.empty_like(mag, dtype=torch.bool)
    torch.ge(mag[:cut], trim.threshold, out=keep[:cut])
    torch.gt(mag[cut:], trim.threshold, out=keep[cut:])
    return keep.view_as(x)


def top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """The bool mask of the k entries of largest magnitude (ties in index order)."""
    return keep_mask(x, find_trim(lambda: [x.reshape(-1)], x.numel(), k))
