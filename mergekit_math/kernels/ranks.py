"""DELLA's keep decisions for ranges of whole rows, compiled: each entry's rank in a stable
ascending sort of its row's magnitudes (equal magnitudes in index order, as
``sparsify.row_ranks`` ranks them with torch's stable argsort of the bit patterns), its keep
probability ``(density - ε) + (rank / span)·2ε`` with torch's float32 steps, and the mask
stream's decision for it (``MaskStream.keep_with``: ``byte < floor(p·256)``, a spare word
against the fraction when they are equal).

:func:`della_decisions` does it in four passes over each row while it is in cache (the
magnitudes' bits and their range; the counts per bin, which also place each entry in its
bin; the decisions with both sums; a short one over the entries with lower bits). The ranks
come from the magnitudes' bits (a non-negative float's bits order like the float, NaN above
inf) binned by their top 16 bits: the magnitude of a bfloat16 difference nearly always has
no lower bits set, so a bin holds one value and its entries rank in index order from the
bin's start (the counting pass's increment gives each its place in its bin, so no pass
scatters ranks); the few entries with lower bits (about one in 20) rank after them, sorted
within their bins. A row whose bins would span too wide a range, or with too many entries
with lower bits (float32 inputs), is ranked by a least-significant-digit radix sort instead
(four 8-bit digits, each a stable counting pass; a digit every entry shares is skipped). On
TinyLlama-shaped bfloat16 rows this is 4.8-5.0 ns per entry (9.1-10.2 with a pass that
scattered the ranks, the sums in the bits' pass and indices numba checked for negative
values; 13-15 with the radix sort and separate passes).

:func:`della_probs` gives the probabilities alone and :func:`keep_bytes` the mask stream's
byte comparison with given probabilities (``MaskStream.keep_with(compiled=True)``): the
path for a block whose ties outgrow its spare words.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_math.kernels.scalar import _at, _bits_to_f32, _f32_to_bits
from mergekit_math.kernels.stats import source_size, value_at

_MAX_BINS = 4096  # bins of one row's top-16-bit keys (a range of 32 binary exponents)


@njit(inline="always")
def _probability(rank, low, span, step):  # noqa: ANN001, ANN202
    """``low + (rank / span)·step``, each step rounded to float32 as torch's ops round it."""
    return low + (np.float32(rank) / span) * step


@njit(error_model="numpy")
def _keys(src, start, length, keys):  # noqa: ANN001, ANN202
    """The row's magnitude bits into ``keys`` (the sign bit cleared, as ``abs``), then the
    (lowest, highest) top 16 bits of a nonzero magnitude: two loops LLVM vectorises (one
    with both 0.55 ns per entry, against 1.2 for the two in one loop)."""
    for i in range(length):
        keys[i] = _f32_to_bits(value_at(src, start + i)) & np.uint32(0x7FFFFFFF)
    lo = np.uint32(0xFFFFFFFF)  # the smallest nonzero key, less one (a zero wraps around)
    hi = np.uint32(0)
    for i in range(length):
        k = keys[i]
        hi = max(hi, k)
        lo = min(lo, k - np.uint32(1))
    if lo == np.uint32(0xFFFFFFFF):
        return np.int64(0xFFFF), np.int64(hi >> 16)
    return np.int64((lo + np.uint32(1)) >> 16), np.int64(hi >> 16)


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


@njit(inline="always")
def _bin(k, lo):  # noqa: ANN001, ANN202
    """The bin of key ``k``: its top 16 bits past ``lo`` (0: the zeros)."""
    return _at(max(np.int64(k >> 16) - lo, 0))


@njit(error_model="numpy")
def _count_bins(keys, length, lo, nb, clean, dirty, rel, unclean):  # noqa: ANN001, ANN202
    """Per bin, the entries without lower bits set (``clean``) and with (``dirty``); each
    clean entry's place among its bin's clean entries in index order into ``rel`` (the
    count before it: the histogram's own increment); the positions of the entries with
    lower bits into ``unclean``. Returns their number, -1 when ``unclean`` overflows."""
    clean[:nb] = 0
    dirty[:nb] = 0
    nn = 0
    for i in range(length):
        k = keys[i]
        c = _bin(k, lo)
        seen = clean[c]
        rel[i] = seen
        lower = (k & np.uint32(0xFFFF)) != 0
        clean[c] = seen + np.int32(not lower)
        if lower:  # about one entry in 20 for bfloat16 deltas
            if nn == unclean.shape[0]:
                return -1
            unclean[nn] = i
            dirty[c] += 1
            nn += 1
    return nn


@njit(error_model="numpy")
def _unclean_ranks(keys, lo, nn, rel, pos, dirty, fill, unclean, gkeys, gidx):  # noqa: ANN001, ANN202
    """The ranks past their bin's start (``rel``) of the ``nn`` entries with lower bits
    (``unclean``): a bin's such entries rank last in it (``pos[c + 1] - dirty[c]`` on),
    sorted. ``gkeys``/``gidx`` are indexed by rank; ``dirty`` is consumed."""
    for a in range(nn):
        fill[np.int64(keys[unclean[a]] >> 16) - lo] = 0
    for a in range(nn):  # into their bins' rank slots, in index order
        i = unclean[a]
        c = np.int64(keys[i] >> 16) - lo
        at = pos[c + 1] - dirty[c] + fill[c]
        fill[c] += 1
        gkeys[at] = keys[i]
        gidx[at] = i
    for a in range(nn):
        c = np.int64(keys[unclean[a]] >> 16) - lo
        group = dirty[c]
        if group:  # the bin's first entry with lower bits: sort its group once
            e = pos[c + 1]
            if group > 1:
                _sort_group(gkeys, gidx, e - group, e)
            for r in range(e - group, e):
                rel[gidx[r]] = r - pos[c]
            dirty[c] = 0


@njit(error_model="numpy")
def _sort_group(gkeys, gidx, s, e):  # noqa: ANN001, ANN202
    """Stable sort of ``gkeys[s:e]`` (with ``gidx``): insertion, or merge for long ones."""
    if e - s > 32:
        order = np.argsort(gkeys[s:e], kind="mergesort")
        gkeys[s:e], gidx[s:e] = gkeys[s:e][order], gidx[s:e][order]
        return
    for a in range(s + 1, e):
        k, ix = gkeys[a], gidx[a]
        b = a - 1
        while b >= s and gkeys[b] > k:
            gkeys[b + 1], gidx[b + 1] = gkeys[b], gidx[b]
            b -= 1
        gkeys[b + 1], gidx[b + 1] = k, ix


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
        np.empty(bins, np.int32),
        np.empty(limit, np.int32),
    )


@njit(error_model="numpy")
def _row_ranks(keys, length, lo, hi, work, ranks, misses):  # noqa: ANN001, ANN202
    """The row's ranks (``keys`` and ``lo``, ``hi`` from :func:`_keys`) into ``ranks``.
    Returns ``(binned, lo, misses)``: binned, an entry's rank is ``ranks[i]`` plus its
    bin's start (``work[5][_bin(keys[i], lo)]``); else ``ranks`` holds the ranks of the
    radix sort (the bins do not fit, or gave up). ``misses``: rows in a row the bins gave
    up on (after 4, float32 inputs, the radix sort only)."""
    copy, spare_keys, order, spare_order, counts, pos, clean, dirty, fill, unclean = work
    lo = min(lo, hi) - 1
    nb = hi - lo + 1
    if misses < 4 and lo >= 0 and nb <= clean.shape[0]:
        nn = _count_bins(keys, length, lo, nb, clean, dirty, ranks, unclean)
        if nn >= 0:
            run = 0
            for c in range(nb):
                pos[c] = run
                run += clean[c] + dirty[c]
            pos[nb] = run
            if nn:
                _unclean_ranks(keys, lo, nn, ranks, pos, dirty, fill, unclean, spare_keys, order)
            return True, lo, 0
        misses += 1
    copy[:length] = keys[:length]
    _radix_ranks(copy, length, spare_keys, order, spare_order, counts, ranks)
    return False, lo, misses


@njit(nogil=True, cache=True, error_model="numpy")
def della_ranks(src, row, ranks):  # noqa: ANN001, ANN201
    """Each entry's rank (int32) in a stable ascending sort of its row's magnitudes, for a
    source of whole rows of ``row`` entries."""
    keys = np.empty(row, np.uint32)
    work = _workspace(row)
    pos = work[5]
    misses = 0
    for start in range(0, source_size(src), row):
        lo, hi = _keys(src, start, row, keys)
        out = ranks[start : start + row]
        binned, lo, misses = _row_ranks(keys, row, lo, hi, work, out, misses)
        if binned:
            for i in range(row):
                out[i] += pos[_bin(keys[i], lo)]


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
def _decide(keys, ranks, binned, lo, pos, row, start, below, at, kept, low, span, step):  # noqa: ANN001, ANN202
    """Row ``start``'s decisions into ``kept``, its entries' bytes and spare words from
    ``at = (primary, spare, block, offset in it, ties so far in it)``; returns (Σ|x·keep|,
    Σ|x|) (float64) and the position after the row, or -1.0 and ``at`` unchanged when a
    block's ties outgrow its spare words. Ranks as :func:`_row_ranks` leaves them."""
    primary, spare, q, w, tied = at
    width, words = primary.shape[1], spare.shape[1]
    a0 = a1 = t0 = t1 = 0.0
    i = 0
    while i < row:
        seg = min(row - i, width - w)
        bytes_ = primary[q]
        for j in range(i, i + seg):
            k = keys[_at(j)]
            r = ranks[_at(j)]
            if binned:
                r += pos[_bin(k, lo)]
            byte = np.int32(bytes_[_at(w + j - i)])
            b = below[_at(r)]
            keep = byte < b
            if byte == b:  # about one entry in 256
                if tied == words:
                    return -1.0, 0.0, at
                scaled = np.float64(_probability(r, low, span, step)) * 256.0
                keep = np.float64(spare[q, tied]) * 2.0**-32 < scaled - np.floor(scaled)
                tied += 1
            kept[_at(start + j)] = keep
            v = _bits_to_f32(k)
            if j & 1:
                a1 += np.float64(v * np.float32(keep))
                t1 += np.float64(v)
            else:
                a0 += np.float64(v * np.float32(keep))
                t0 += np.float64(v)
        i += seg
        w += seg
        if w == width:
            q, w, tied = q + 1, 0, 0
    return a0 + a1, t0 + t1, (primary, spare, q, w, tied)


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
    pos = work[5]
    at = (primary, spare, 0, 0, 0)
    before = after = 0.0
    misses = 0
    for start in range(0, source_size(src), row):
        lo, hi = _keys(src, start, row, keys)
        binned, lo, misses = _row_ranks(keys, row, lo, hi, work, ranks, misses)
        kept_sum, total, at = _decide(
            keys, ranks, binned, lo, pos, row, start, below, at, kept, low, span, step
        )
        if kept_sum < 0:
            return False
        before += total
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
