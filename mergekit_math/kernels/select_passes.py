"""The compiled passes of the k-th largest selection (:mod:`mergekit_math.kernels.select`):
the first pass's histograms of the magnitudes' top 16 bits (with the values that have low
bits collected, :func:`histogram`, or counted apart, :func:`histogram_pairs`), and the
second passes over the answers' bins (:func:`collect_bins`, :func:`histogram_low`).

The low-bits pass does not branch on the bin: a bfloat16 model's deltas repeat a few values so
often that a fifth of a tensor may sit in the answer's bin, and a branch on it mispredicted
(2.2 ns per element, 0.6 without).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from mergekit_math.kernels.scalar import _f32_to_bits, load
from mergekit_math.kernels.stats import source_size

BINS = 1 << 16
SHIFT = 15  # bits 30..15: exponent and the top 8 mantissa bits (bit 31, the sign, is 0)
LOW = 1 << SHIFT


def magnitude_at(src, i):  # noqa: ANN001, ANN201
    """Element ``i``'s magnitude as float32 (numba only): ``src`` is a float32 array of
    magnitudes, or a ``(base, model)`` pair of stored arrays (bfloat16 bits or float32),
    whose |model - base| is computed here, as ``magnitude_into`` writes it."""
    raise NotImplementedError


@overload(magnitude_at, inline="always")
def _magnitude_at(src, i):  # noqa: ANN001, ANN202
    if isinstance(src, types.BaseTuple):
        return lambda src, i: abs(load(src[1], i) - load(src[0], i))
    return lambda src, i: src[i]


def part(src, start, end):  # noqa: ANN001, ANN201
    """``src[start:end]`` of an array or of both arrays of a pair (numba only)."""
    raise NotImplementedError


@overload(part, inline="always")
def _part(src, start, end):  # noqa: ANN001, ANN202
    if isinstance(src, types.BaseTuple):
        return lambda src, start, end: (src[0][start:end], src[1][start:end])
    return lambda src, start, end: src[start:end]


_BLOCK = 2048
_LOW_MASK = np.uint32(LOW - 1)
_NONFINITE = 0x7F800000 >> SHIFT  # the first bin of inf and NaN

# Each kernel first writes a block's magnitude bits into a small buffer, in a loop of its own
# over a slice (vectorised: LLVM did not vectorise loops from a run-time start, nor the same
# loop in a helper compiled apart; inlined, :func:`_block_bits`, it does), then scatters from
# it: 0.35-0.4 ns per element from stored bfloat16 pairs, where computing in the scatter loop
# took 0.9.


def _block_bits(src, start, n, bits):  # noqa: ANN001, ANN202
    """Write the magnitude bits of block ``start`` of ``src`` into ``bits``; its length
    (numba only). ``src`` is a source of :func:`magnitude_at`, or a ``(base, model, scale,
    row)`` 4-tuple: the values ``|model − base|·scale[r]`` of rows of ``row`` entries
    (float32 steps; Arcee Fusion's importances, recomputed where they were not stored)."""
    raise NotImplementedError


@overload(_block_bits, inline="always")
def _block_bits_of(src, start, n, bits):  # noqa: ANN001, ANN202
    if isinstance(src, types.BaseTuple) and len(src) == 4:

        def scaled(src, start, n, bits):  # noqa: ANN001, ANN202
            base, model, scale, row = src
            end = min(n, start + _BLOCK)
            i = start
            while i < end:  # per row the block holds: a loop from 0 over slices vectorises
                r = i // row
                stop = min(end, (r + 1) * row)
                k = scale[r]
                b, m, out = base[i:stop], model[i:stop], bits[i - start : stop - start]
                for j in range(stop - i):
                    out[j] = _f32_to_bits(abs(load(m, j) - load(b, j)) * k)
                i = stop
            return end - start

        return scaled

    def stored(src, start, n, bits):  # noqa: ANN001, ANN202
        block = part(src, start, min(n, start + _BLOCK))
        count = source_size(block)
        for i in range(count):
            bits[i] = _f32_to_bits(magnitude_at(block, i))
        return count

    return stored


@njit(inline="always")
def add_bins(values, hist):  # noqa: ANN001, ANN201
    """Add the top-16-bit bins of the float32 ``values`` to ``hist``: the selection's first
    pass made where the values are written, while they are in cache (SCE's variances,
    Arcee Fusion's importances; :func:`~mergekit_math.kernels.select.kth_largest_bits_from`).
    A value with its sign bit set counts in the last bin: the callers flag those and do not
    select from such a histogram."""
    for i in range(values.shape[0]):
        hist[min(_f32_to_bits(values[i]) >> np.uint32(SHIFT), np.uint32(BINS - 1))] += 1


@njit(inline="always")
def _scatter(bits, count, hist, found, j, full):  # noqa: ANN001, ANN202
    """Add a block's ``count`` bits to ``hist`` and, unless ``full``, write those with some
    low bit set into ``found`` from place ``j`` on; the next free place. Each value is written
    at the next free place, which advances only on a match: no branch (a bfloat16 model's
    deltas have a few in 100, whose branch mispredicted: 1.14 -> 1.03 ns per element)."""
    if full:  # float32 inputs: most values have low bits, the second pass counts them
        for i in range(count):
            hist[bits[i] >> np.uint32(SHIFT)] += 1
        return j
    for i in range(count):
        v = bits[i]
        hist[v >> np.uint32(SHIFT)] += 1
        found[j] = v
        j += (v & _LOW_MASK) != 0
    return j


@njit(nogil=True, cache=True, error_model="numpy")
def histogram(src, hist, found):  # noqa: ANN001, ANN201
    """Add the bins of the magnitudes of ``src`` (see :func:`magnitude_at`) to ``hist`` and
    write the bits of those with some of their low 15 bits set into ``found``: returns how
    many (-1: a value has its sign bit set, negative or -0, not a magnitude; -2: ``found``
    was too small, ``hist`` is whole). A bfloat16 model's deltas have few of them (about 3
    in 100): collected in the scatter loop they cost 0.25-0.4 ns per element, the second
    pass that counted them 0.85."""
    bits = np.empty(_BLOCK, np.uint32)
    n = source_size(src)
    signs = np.uint32(0)
    j = 0
    full = False
    for start in range(0, n, _BLOCK):
        count = _block_bits(src, start, n, bits)
        for i in range(count):  # a loop of its own: in the one above it stopped vectorising
            signs |= bits[i]
        if signs >> np.uint32(31):  # before the scatter: its bin would lie past ``hist``
            return -1
        # a block fits in ``found`` (the scatter writes every value at the next free place)
        full = full or j + count > found.shape[0]
        j = _scatter(bits, count, hist, found, j, full)
    return -2 if full else j


@njit(inline="always")
def _split_bin(v):  # noqa: ANN001, ANN202
    """A magnitude's bin in the split histogram: its top-16-bit bin times two, plus one where
    some low bit is set (the bin's clean values, all equal to its smallest, counted apart)."""
    return ((v >> np.uint32(SHIFT - 1)) & np.uint32(0xFFFFFFFE)) | np.uint32((v & _LOW_MASK) != 0)


@njit(nogil=True, cache=True, error_model="numpy")
def histogram_pairs(base, models, hists, spans):  # noqa: ANN001, ANN201
    """The split histograms (:func:`_split_bin`, ``2 * BINS`` bins) of the magnitudes
    ``|model − base|`` of several models of one base in one pass, each block of the base
    read once for all of them: model ``q``'s into ``hists[q]``, the first and one past the
    last bin it filled, bins 0 and 1 left out (unchanged entries, zeros, are common), into
    ``spans[q]`` (zeroed by the caller; the parts' histograms are added over those alone).
    The clean and dirty counts of each bin stand in for the collected values of
    :func:`histogram`: where the answer is a bin's clean value (nearly always for a bfloat16
    model's deltas) they give it and its ties, and no value is written per element (1.0 ->
    0.6-0.75 ns per element and model for two). A magnitude has no sign bit."""
    k = len(models)
    n = base.shape[0]
    bits = np.empty((k, _BLOCK), np.uint32)
    low = np.full(k, np.uint32(2 * BINS), np.uint32)
    high = np.zeros(k, np.uint32)
    for start in range(0, n, _BLOCK):
        end = min(n, start + _BLOCK)
        count = end - start
        b = base[start:end]
        for q in range(k):
            m, row = models[q][start:end], bits[q]
            for i in range(count):
                row[i] = _split_bin(_f32_to_bits(abs(load(m, i) - load(b, i))))
        for q in range(k):
            hist, row = hists[q], bits[q]
            lo, hi = low[q], high[q]
            for i in range(count):  # a loop of its own: in the scatter it would not vectorise
                v = row[i]
                lo = min(lo, v if v > 1 else np.uint32(2 * BINS))  # zeros: bins 0, 1
                hi = max(hi, v)
            low[q], high[q] = lo, hi
            for i in range(count):
                hist[row[i]] += 1
    for q in range(k):
        if high[q] > 1:  # else every value lies in bins 0 and 1: (0, 0)
            spans[q, 0] = low[q]
            spans[q, 1] = high[q] + 1


_SUB = 256  # elements per sub-block of the second pass


@njit(inline="always")
def _clean_and_dirty(sub, bin_):  # noqa: ANN001, ANN202
    """How many values of ``sub`` lie in bin ``bin_`` with their low 15 bits all zero, and
    how many with some set (a vectorised reduction)."""
    clean = 0
    dirty = 0
    for i in range(sub.shape[0]):
        v = sub[i]
        hit = (v >> np.uint32(SHIFT)) == bin_
        zero = (v & _LOW_MASK) == 0
        clean += hit & zero
        dirty += hit & (not zero)
    return clean, dirty


@njit(inline="always")
def _pack_dirty(sub, bin_, packed):  # noqa: ANN001, ANN202
    """The low bits of the values of ``sub`` in bin ``bin_`` with some low bit set, packed
    into ``packed`` (each written at the next free place, which advances only on a match:
    no branch); their number."""
    j = 0
    for i in range(sub.shape[0]):
        v = sub[i]
        packed[j] = v & _LOW_MASK
        j += ((v >> np.uint32(SHIFT)) == bin_) & ((v & _LOW_MASK) != 0)
    return j


@njit(inline="always")
def _count_low(sub, bin_, packed, hist):  # noqa: ANN001, ANN202
    """Add the low bits of the dirty values of ``sub`` in bin ``bin_`` to ``hist``; the number
    of its clean ones (all for ``hist[0]``, added once by the caller)."""
    clean, dirty = _clean_and_dirty(sub, bin_)
    if dirty:
        for t in range(_pack_dirty(sub, bin_, packed)):
            hist[packed[t]] += 1
    return clean


@njit(nogil=True, cache=True, error_model="numpy")
def histogram_low(src, bin_, hist):  # noqa: ANN001, ANN201
    """Add the low 15 bits of the magnitudes in bin ``bin_`` to ``hist`` (32768 bins).

    A bfloat16 model's deltas mostly have their low 15 bits all zero: per sub-block of 256
    the values in the bin are counted as clean (all zero: one count for ``hist[0]``) or
    dirty in one vectorised pass, and only a sub-block with dirty ones packs their low bits
    (a serial loop) and counts them. Counting every value with a 0 or 1 would chain most of
    them through ``hist[0]``; packing every sub-block cost 0.65 ns per element, this 0.3."""
    bits = np.empty(_BLOCK, np.uint32)
    packed = np.empty(_SUB, np.uint32)
    n = source_size(src)
    zeros = 0
    for start in range(0, n, _BLOCK):
        count = _block_bits(src, start, n, bits)
        for s in range(0, count, _SUB):
            zeros += _count_low(bits[s : min(s + _SUB, count)], bin_, packed, hist)
    hist[0] += zeros


@njit(nogil=True, cache=True, error_model="numpy")
def histogram_low2(src, first, second, hist):  # noqa: ANN001, ANN201
    """:func:`histogram_low` of two bins at once, into the rows of ``hist`` (2 x 32768)."""
    bits = np.empty(_BLOCK, np.uint32)
    packed = np.empty(_SUB, np.uint32)
    n = source_size(src)
    zeros_first = 0
    zeros_second = 0
    for start in range(0, n, _BLOCK):
        count = _block_bits(src, start, n, bits)
        for s in range(0, count, _SUB):
            sub = bits[s : min(s + _SUB, count)]
            zeros_first += _count_low(sub, first, packed, hist[0])
            zeros_second += _count_low(sub, second, packed, hist[1])
    hist[0, 0] += zeros_first
    hist[1, 0] += zeros_second


@njit(inline="always")
def _in_bins(v, first, second, third, dirty):  # noqa: ANN001, ANN202
    top = v >> np.uint32(SHIFT)
    hit = (top == first) | (top == second) | (top == third)
    return hit & ((v & _LOW_MASK) != 0) if dirty else hit


@njit(nogil=True, cache=True, error_model="numpy")
def collect_bins(src, first, second, third, out, dirty=False):  # noqa: ANN001, ANN201
    """Write the bits of the magnitudes in bins ``first``, ``second`` or ``third`` (with
    ``dirty``, only those with some low bit set) into ``out``, in index order; returns how
    many there are (those past its end not written). Per block, a vectorised loop flags
    them, a byte each, and a loop over the flags eight at a time (one uint64) copies only
    where a word has some: 0.45-0.5 ns per element where the bins hold 1 in 170 (SCE's
    variances), against 1.1 for a vectorised count per sub-block of 256 and a branch per
    value of each sub-block with some, 2.7 for writing every value at the next free place,
    which a match advances."""
    bits = np.empty(_BLOCK, np.uint32)
    flags = np.zeros(_BLOCK, np.uint8)
    words = flags.view(np.uint64)
    n = source_size(src)
    j = 0
    for start in range(0, n, _BLOCK):
        count = _block_bits(src, start, n, bits)
        for i in range(count):
            flags[i] = _in_bins(bits[i], first, second, third, dirty)
        for i in range(count, min(_BLOCK, count + 8)):  # a last, short block's last word
            flags[i] = 0
        for w in range((count + 7) // 8):
            if words[w]:
                for i in range(8 * w, 8 * w + 8):
                    if flags[i]:
                        if j < out.shape[0]:
                            out[j] = bits[i]
                        j += 1
    return j
