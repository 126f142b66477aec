"""DELLA's keep decisions for ranges of whole rows, compiled: each entry's rank in a stable
ascending sort of its row's magnitudes (equal magnitudes in index order, as
``sparsify.row_ranks`` ranks them with torch's stable argsort of the bit patterns), its keep
probability ``(density - ε) + (rank / span)·2ε`` with torch's float32 steps, and the mask
stream's decision for it (``MaskStream.keep_with``: ``byte < floor(p·256)``, a spare word
against the fraction when they are equal).

:func:`della_decisions` does it in four passes over each row while it is in cache
(magnitude bits; counts; ranks; decisions and sums). The ranks come from the
magnitudes' bits (a non-negative float's bits order like the float, NaN above inf) binned
by their top 16 bits: the magnitude of a bfloat16 difference nearly always has no lower
bits set, so a bin holds one value and its entries rank in index order from the bin's
start; the few entries with lower bits rank after them, sorted within their bins. A row
whose bins would span too wide a range, or with too many entries with lower bits (float32
inputs), is ranked by a least-significant-digit radix sort instead (four 8-bit digits, each
a stable counting pass; a digit every entry shares is skipped). On TinyLlama-shaped
bfloat16 rows this is 7-9.5 ns per entry where the radix sort, the probabilities, the byte
comparison and the sums as separate passes took 13-15.

:func:`della_probs` gives the probabilities alone and :func:`keep_bytes` the mask stream's
byte comparison with given probabilities (``MaskStream.keep_with(compiled=True)``): the
path for a block whose ties outgrow its spare words.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_math.kernels.scalar import _bits_to_f32, _f32_to_bits
from mergekit_math.kernels.stats import source_size, value_at

_MAX_BINS = 4096  # bins of one row's top-16-bit keys (a range of 32 binary exponents)


@njit(inline="always")
def _probability(rank, low, span, step):  # noqa: ANN001, ANN202
    """``low + (rank / span)·step``, each step rounded to float32 as torch's ops round it."""
    return low + (np.float32(rank) / span) * step


@njit(error_model="numpy")
def _keys(src, start, length, keys):  # noqa: ANN001, ANN202
    """The row's magnitude bits into ``keys``; (lowest, highest) top 16 bits of a nonzero
    magnitude and Σ|x| in float64."""
    lo = np.int64(0xFFFF)
    hi = np.int64(0)
    s0 = s1 = 0.0
    for i in range(length):
        v = abs(value_at(src, start + i))
        k = _f32_to_bits(v)
        keys[i] = k
        top = np.int64(k >> 16)
        lo = min(lo, top if k != 0 else np.int64(0xFFFF))
        hi = max(hi, top)
        if i & 1:
            s1 += np.float64(v)
        else:
            s0 += np.float64(v)
    return lo, hi, s0 + s1


@njit(error_model="numpy")
def _radix_ranks(keys, length, spare_keys, order, spare, counts, ranks):  # noqa: ANN001, ANN202
    """Each entry's rank (``ranks[i]``) by a stable LSD radix sort of ``keys`` (consumed)."""
    for i in range(length):
        order[i] = i
    counts[:] = 0
    for i in range(length):
        k = keys[i]
        counts[0, k & 255] += 1
        counts[1, (k >> 8) & 255] += 1
        counts[2, (k >> 16) & 255] += 1
        counts[3, k >> 24] += 1
    for digit in range(4):
        shift = 8 * digit
        hist = counts[digit]
        if hist.max() == length:  # every entry has this digit: the pass keeps the order
            continue
        total = 0
        for b in range(256):
            c = hist[b]
            hist[b] = total
            total += c
        for r in range(length):
            k = keys[r]
            b = (k >> shift) & 255
            at = hist[b]
            spare_keys[at] = k
            spare[at] = order[r]
            hist[b] = at + 1
        keys, spare_keys = spare_keys, keys
        order, spare = spare, order
    for r in range(length):
        ranks[order[r]] = r


@njit(error_model="numpy")
def _count_bins(keys, length, lo, nb, h0, h1, unclean):  # noqa: ANN001, ANN202
    """Entries per bin (two interleaved counts, ``h0 + h1``) and the positions of the
    entries with lower bits set (-1: more than ``unclean`` holds)."""
    h0[:nb] = 0
    h1[:nb] = 0
    nn = 0
    for i in range(0, length - 1, 2):
        k0, k1 = keys[i], keys[i + 1]
        h0[max(np.int64(k0 >> 16) - lo, 0)] += 1
        h1[max(np.int64(k1 >> 16) - lo, 0)] += 1
        if (k0 | k1) & 0xFFFF:
            if nn + 2 > unclean.shape[0]:
                return -1
            unclean[nn] = i
            nn += (k0 & 0xFFFF) != 0
            unclean[nn] = i + 1
            nn += (k1 & 0xFFFF) != 0
    if length & 1:
        k0 = keys[length - 1]
        h0[max(np.int64(k0 >> 16) - lo, 0)] += 1
        if k0 & 0xFFFF:
            if nn + 1 > unclean.shape[0]:
                return -1
            unclean[nn] = length - 1
            nn += 1
    return nn


@njit(error_model="numpy")
def _bin_ranks(keys, length, lo, nb, ranks, pos, h0, h1, unclean, gkeys, gidx):  # noqa: ANN001, ANN202
    """Ranks by bins of the top 16 bits past ``lo`` (bin 0: the zeros): the entries
    without lower bits set rank in index order from their bin's start, those with lower
    bits after them, sorted within the bin. False: too many entries with lower bits."""
    nn = _count_bins(keys, length, lo, nb, h0, h1, unclean)
    if nn < 0:
        return False
    run = 0
    for c in range(nb):
        pos[c] = run
        run += h0[c] + h1[c]
    pos[nb] = run
    if nn:
        _unclean_ranks(keys, lo, nb, nn, ranks, pos, h0, h1, unclean, gkeys, gidx)
    for i in range(length):
        k = keys[i]
        if (k & 0xFFFF) == 0:
            c = max(np.int64(k >> 16) - lo, 0)
            r = pos[c]
            ranks[i] = r
            pos[c] = r + 1
    return True


@njit(error_model="numpy")
def _unclean_ranks(keys, lo, nb, nn, ranks, pos, h0, h1, unclean, gkeys, gidx):  # noqa: ANN001, ANN202
    """The ranks of the ``nn`` entries with lower bits (``unclean``): grouped by bin in
    index order, each group sorted; a bin's group ranks last in it (``pos[c + 1]`` is the
    next bin's start)."""
    h0[:nb] = 0  # each bin's entries with lower bits
    for a in range(nn):
        h0[np.int64(keys[unclean[a]] >> 16) - lo] += 1
    run = 0
    for c in range(nb):  # h1: where the bin's group starts, then ends
        run += h0[c]
        h1[c] = run - h0[c]
    for a in range(nn):
        i = unclean[a]
        c = np.int64(keys[i] >> 16) - lo
        at = h1[c]
        gkeys[at] = keys[i]
        gidx[at] = i
        h1[c] = at + 1
    for c in range(nb):
        if h0[c]:
            _sort_group(gkeys, gidx, h1[c] - h0[c], h1[c], pos[c + 1] - h1[c], ranks)


@njit(error_model="numpy")
def _sort_group(gkeys, gidx, s, e, offset, ranks):  # noqa: ANN001, ANN202
    """Stable insertion sort of ``gkeys[s:e]`` (with ``gidx``), then each entry's rank:
    ``offset`` + its position."""
    if e - s > 32:  # a long group: a stable merge sort
        order = np.argsort(gkeys[s:e], kind="mergesort")
        for a in range(e - s):
            ranks[gidx[s + order[a]]] = offset + s + a
        return
    for a in range(s + 1, e):
        k, ix = gkeys[a], gidx[a]
        b = a - 1
        while b >= s and gkeys[b] > k:
            gkeys[b + 1], gidx[b + 1] = gkeys[b], gidx[b]
            b -= 1
        gkeys[b + 1], gidx[b + 1] = k, ix
    for a in range(s, e):
        ranks[gidx[a]] = offset + a


@njit(error_model="numpy")
def _workspace(row):  # noqa: ANN001, ANN202
    """The buffers :func:`_row_ranks` works in for rows of ``row`` entries."""
    bins = min(_MAX_BINS, 2 * row + 256)  # wider ones would cost more than a radix sort
    limit = max(row // 8, 16)
    return (
        np.empty(row, np.uint32),
        np.empty(row, np.uint32),
        np.empty(row, np.int32),
        np.empty(row, np.int32),
        np.empty((4, 256), np.int32),
        np.empty(bins + 1, np.int32),
        np.empty(bins, np.int32),
        np.empty(bins, np.int32),
        np.empty(limit, np.int32),
        np.empty(limit, np.uint32),
        np.empty(limit, np.int32),
    )


@njit(error_model="numpy")
def _row_ranks(keys, length, lo, hi, work, ranks, misses):  # noqa: ANN001, ANN202
    """The row's ranks (``keys`` and ``lo``, ``hi`` from :func:`_keys`) into ``ranks``: by
    bins, or by the radix sort when the bins do not fit or give up. ``misses``: rows in a
    row the bins gave up on (after 4, float32 inputs, the radix sort only); returns its
    new value."""
    copy, spare_keys, order, spare_order, counts, pos, h0, h1, unclean, gkeys, gidx = work
    lo = min(lo, hi) - 1
    nb = hi - lo + 1
    if misses < 4 and lo >= 0 and nb <= h0.shape[0]:
        if _bin_ranks(keys, length, lo, nb, ranks, pos, h0, h1, unclean, gkeys, gidx):
            return 0
        misses += 1
    copy[:length] = keys[:length]
    _radix_ranks(copy, length, spare_keys, order, spare_order, counts, ranks)
    return misses


@njit(nogil=True, cache=True, error_model="numpy")
def della_ranks(src, row, ranks):  # noqa: ANN001, ANN201
    """Each entry's rank (int32) in a stable ascending sort of its row's magnitudes, for a
    source of whole rows of ``row`` entries."""
    keys = np.empty(row, np.uint32)
    work = _workspace(row)
    misses = 0
    for start in range(0, source_size(src), row):
        lo, hi, _ = _keys(src, start, row, keys)
        misses = _row_ranks(keys, row, lo, hi, work, ranks[start : start + row], misses)


@njit(nogil=True, cache=True, error_model="numpy")
def della_probs(src, row, low, step, probs):  # noqa: ANN001, ANN201
    """The keep probability of each entry of ``src`` (whole rows of ``row`` entries) into
    the float32 array ``probs``: ``low + (rank / span)·step`` with span = max(row - 1, 1),
    the rank's quotient, product and sum each rounded to float32 (``low``, ``step``
    float32)."""
    n = source_size(src)
    span = np.float32(max(row - 1, 1))
    ranks = np.empty(n, np.int32)
    della_ranks(src, row, ranks)
    for i in range(n):
        probs[i] = _probability(ranks[i], low, span, step)


@njit(error_model="numpy")
def _decide(keys, ranks, row, start, below, at, kept, low, span, step):  # noqa: ANN001, ANN202
    """Row ``start``'s decisions into ``kept``, its entries' bytes and spare words from
    ``at = (primary, spare, block, offset in it, ties so far in it)``; returns Σ|x·keep|
    (float64) and the position after the row, or -1.0 and ``at`` unchanged when a block's
    ties outgrow its spare words."""
    primary, spare, q, w, tied = at
    width, words = primary.shape[1], spare.shape[1]
    a0 = a1 = 0.0
    i = 0
    while i < row:
        seg = min(row - i, width - w)
        bytes_ = primary[q]
        for j in range(i, i + seg):
            r = ranks[j]
            byte = np.int32(bytes_[w + j - i])
            keep = byte < below[r]
            if byte == below[r]:  # about one entry in 256
                if tied == words:
                    return -1.0, at
                scaled = np.float64(_probability(r, low, span, step)) * 256.0
                keep = np.float64(spare[q, tied]) * 2.0**-32 < scaled - np.floor(scaled)
                tied += 1
            kept[start + j] = keep
            if j & 1:
                a1 += np.float64(_bits_to_f32(keys[j]) * np.float32(keep))
            else:
                a0 += np.float64(_bits_to_f32(keys[j]) * np.float32(keep))
        i += seg
        w += seg
        if w == width:
            q, w, tied = q + 1, 0, 0
    return a0 + a1, (primary, spare, q, w, tied)


@njit(nogil=True, cache=True, error_model="numpy")
def della_decisions(src, row, low, step, primary, spare, kept, sums):  # noqa: ANN001, ANN201
    """DELLA's keep decisions for a source of whole rows of ``row`` entries (a stored
    array or a ``(base, model)`` pair) that starts a mask block, into the bool array
    ``kept``: probability ``low + (rank / span)·step`` (span = max(row - 1, 1), float32
    steps), decided by the blocks' bytes ``primary`` (rows of 65536) and spare words
    ``spare`` as ``MaskStream.keep_with``. ``sums`` gets (Σ|x|, Σ|x·keep|) in float64.
    Returns False when a block's ties outgrow its spare words (nothing is then complete)."""
    span = np.float32(max(row - 1, 1))
    below = np.empty(row, np.int32)  # floor(p·256) of each rank: exact
    for r in range(row):
        below[r] = np.int32(np.floor(_probability(r, low, span, step) * 256.0))
    keys, ranks = np.empty(row, np.uint32), np.empty(row, np.int32)
    work = _workspace(row)
    at = (primary, spare, 0, 0, 0)
    before = after = 0.0
    misses = 0
    for start in range(0, source_size(src), row):
        lo, hi, total = _keys(src, start, row, keys)
        before += total
        misses = _row_ranks(keys, row, lo, hi, work, ranks, misses)
        kept_sum, at = _decide(keys, ranks, row, start, below, at, kept, low, span, step)
        if kept_sum < 0:
            return False
        after += kept_sum
    sums[0], sums[1] = before, after
    return True


@njit(nogil=True, cache=True, error_model="numpy")
def keep_bytes(primary, probs, kept, tied):  # noqa: ANN001, ANN201
    """The mask stream's byte comparison (``MaskStream.keep_with``) in one pass: per entry,
    ``below = floor(p·256)`` (exact) and ``kept = byte < below``; the positions where
    ``byte == below`` (decided by a spare word) are written to ``tied`` while it has room.
    ``primary`` holds the blocks' bytes as rows of 65536. Returns the number of ties."""
    n = kept.shape[0]
    width = primary.shape[1]
    count = 0
    for q in range(primary.shape[0]):
        start = q * width
        row = primary[q]
        for c in range(min(width, n - start)):
            i = start + c
            below = np.int32(np.floor(probs[i] * 256.0))
            byte = np.int32(row[c])
            kept[i] = byte < below
            if byte == below:  # about one entry in 256: a predictable branch
                if count < tied.shape[0]:
                    tied[count] = i
                count += 1
    return count
