"""The k-th largest of non-negative float32 values (TIES trims, Breadcrumbs windows) by
radix selection on their bits: a non-negative float's bits order like the float, so one
histogram pass over the top 16 bits (exponent and 8 mantissa bits) finds the bin holding
the answer, and a second pass, a histogram of the low 15 bits of that bin's elements per
range, finds the exact value and how many elements of each range equal it. No sort, no
copy of the values, no positions: about 1.2 ns per element against 4-5 for the
sample-bracketed ``torch.kthvalue`` selection, and 4.6 for the three-pass radix selection
that collected the tied positions (those are found later, in the few ranges that need them,
see :class:`mergekit_math.methods.selection.TieRule`).

The second pass does not branch on the bin: a bfloat16 model's deltas repeat a few values so
often that a fifth of a tensor may sit in the answer's bin, and a branch on it mispredicted
(2.2 ns per element, 0.6 without).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_math.kernels.scalar import _f32_to_bits

BINS = 1 << 16
SHIFT = 15  # bits 30..15: exponent and the top 8 mantissa bits (bit 31, the sign, is 0)
LOW = 1 << SHIFT


@njit(nogil=True, cache=True)
def histogram(values, hist):  # noqa: ANN001, ANN201
    """Add the bins of ``values`` to ``hist``; returns False if a value has its sign bit
    set (negative, or -0: not a magnitude)."""
    for i in range(values.shape[0]):
        bits = _f32_to_bits(values[i])
        if bits >> np.uint32(31):
            return False
        hist[bits >> np.uint32(SHIFT)] += 1
    return True


_BLOCK = 4096


@njit(nogil=True, cache=True)
def histogram_low(values, bin_, hist):  # noqa: ANN001, ANN201
    """Add the low 15 bits of the values in bin ``bin_`` to ``hist`` (32768 bins).

    Per block, the low bits of the values in the bin are first packed into a buffer (each
    written at the next free place, which advances only on a match: no branch), then
    counted: counting every value with a 0 or 1 would chain most of them through one
    counter, since a bfloat16 model's deltas mostly have their low 15 bits all zero."""
    packed = np.empty(_BLOCK, np.uint32)
    for start in range(0, values.shape[0], _BLOCK):
        block = values[start : start + _BLOCK]  # a slice: loops from 0 compile better
        j = 0
        for i in range(block.shape[0]):
            bits = _f32_to_bits(block[i])
            packed[j] = bits & np.uint32(LOW - 1)
            j += (bits >> np.uint32(SHIFT)) == bin_
        for t in range(j):
            hist[packed[t]] += 1


@njit(nogil=True, cache=True)
def histogram_low2(values, first, second, hist):  # noqa: ANN001, ANN201
    """:func:`histogram_low` of two bins at once, into the rows of ``hist`` (2 x 32768)."""
    packed = np.empty(_BLOCK, np.uint32)
    for start in range(0, values.shape[0], _BLOCK):
        block = values[start : start + _BLOCK]
        j = 0
        for i in range(block.shape[0]):
            bits = _f32_to_bits(block[i])
            high = bits >> np.uint32(SHIFT)
            packed[j] = bits
            j += (high == first) | (high == second)
        for t in range(j):
            bits = packed[t]
            hist[np.int64((bits >> np.uint32(SHIFT)) != first), bits & np.uint32(LOW - 1)] += 1


def _pick(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the ``k``-th largest and how many elements lie in higher bins."""
    higher = np.cumsum(hist[::-1])[::-1] - hist
    bin_ = int(np.flatnonzero((higher < k) & (higher + hist >= k))[-1])
    return bin_, int(higher[bin_])


# histogram tasks per selection: enough to share between the worker threads, few enough
# that summing their 512 KB histograms stays cheap
_TASKS = 8


def _tasks(n: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(range index, start, end)``: the ranges, each cut at the selection's task grid."""
    step = max(1 << 18, -(-n // _TASKS))
    out = []
    for r, (start, end) in enumerate(ranges):
        cut = start
        while cut < end:
            stop = min(end, (cut // step + 1) * step)
            out.append((r, cut, stop))
            cut = stop
    return out


def kth_largest_bits(
    values,  # noqa: ANN001
    ks: list[int],
    map,  # noqa: ANN001
    ranges: list[tuple[int, int]],
) -> list[tuple[float, int, list[int]]] | None:
    """For each ``k`` of ``ks``: ``(threshold, above, ties)``, the exact ``k``-th largest
    of a flat float32 CPU tensor of magnitudes, how many values exceed it and, per range of
    ``ranges`` (which cover the tensor), how many equal it; None if some value has its sign
    bit set. ``map`` runs the passes (one histogram pass for all ``ks``, one for their
    bins)."""
    flat = values.numpy()
    n = flat.shape[0]
    step = max(1 << 18, -(-n // _TASKS))

    def count(start: int) -> np.ndarray | None:
        hist = np.zeros(BINS, np.int64)
        return hist if histogram(flat[start : start + step], hist) else None

    parts = list(map(count, range(0, n, step)))
    if any(h is None for h in parts):
        return None
    high = np.sum(parts, axis=0)
    picks = [_pick(high, k) for k in ks]
    bins = np.array(sorted({b for b, _ in picks}), np.uint32)
    tasks = _tasks(n, ranges)
    counts = np.int32 if step < 1 << 31 else np.int64  # per task: halves what is zeroed

    def count_low(task: tuple[int, int, int]) -> np.ndarray:
        hist = np.zeros((bins.shape[0], LOW), counts)
        part = flat[task[1] : task[2]]
        if bins.shape[0] == 1:
            histogram_low(part, bins[0], hist[0])
        else:
            histogram_low2(part, bins[0], bins[1], hist)
        return hist

    lows = list(map(count_low, tasks))
    total = np.sum(lows, axis=0, dtype=np.int64)
    found = []
    for k, (bin_, above) in zip(ks, picks):
        row = int(np.searchsorted(bins, bin_))
        low, above_low = _pick(total[row], k - above)
        ties = [0] * len(ranges)
        for (r, _, _), hist in zip(tasks, lows):
            ties[r] += int(hist[row, low])
        bits = np.uint32((bin_ << SHIFT) | low)
        threshold = float(np.array([bits], np.uint32).view(np.float32)[0])
        found.append((threshold, above + above_low, ties))
    return found
