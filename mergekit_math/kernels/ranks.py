"""DELLA's keep decisions for ranges of whole rows, compiled: each entry's rank in a stable
ascending sort of its row's magnitudes (equal magnitudes in index order, as
``sparsify.row_ranks`` ranks them with torch's stable argsort of the bit patterns), its keep
probability ``(density - ε) + (rank / span)·2ε`` with torch's float32 steps, and the mask
stream's decision for it (``MaskStream.keep_with``: ``byte < floor(p·256)``, a spare word
against the fraction when they are equal).

:func:`della_decisions` needs few ranks. The magnitudes' bits (a non-negative float's bits
order like the float, NaN above inf) are binned by their top 16 bits, and a bin's entries
hold the ranks from its start to its end, whatever their order inside it; the threshold
``floor(p·256)`` rises with the rank, so an entry whose byte is below the threshold of its
bin's first rank is kept and one above that of its last rank dropped, without its rank.
That decides about 99 entries in 100 of a TinyLlama-shaped bfloat16 row (a threshold step
spans ~27 ranks). The others get their exact rank: an entry without lower bits set (nearly
all bfloat16 differences) ranks in its bin by the count of such entries before it, which
the counting pass records; one with lower bits by two vectorised counts over the row
(:func:`_place`). Passes per row: the bits and their range, the counts, the bins' first
ranks and thresholds, the sure decisions, the exact ranks and the uncertain decisions, the
L1 sums (one vectorised loop); the sure decisions and the bins' pass sixteen at a time with
AVX-512's gathers (:mod:`~mergekit_math.kernels.della_lanes`). The bins' tables are indexed
by the keys' top 16 bits themselves (2**15 entries, the row's range zeroed), so neither the
counting loop nor the sure pass subtracts an offset or clamps; each bin's two counts are 16
bits of one uint32 (3-4% less time per entry than int64 halves: half the table to zero and to
read), so a row of 65,536 entries or more is radix-sorted. 1.7-1.9 ns per entry on
TinyLlama-shaped bfloat16 rows (1.9-2.0 with an offset per row and the sums in two loops; 2.8
with both passes scalar; 4.9 ranking every entry: the bins' rank
offsets, the entries with lower bits sorted within their bins, and the decisions in one
branching pass; 13-15 with a radix sort of every row). A row of 65,536 entries or more, one
whose bins would span too wide a range (more than 32 binary exponents), or one with more than
max(64, row/16) uncertain entries with lower bits (float32 magnitudes alike by the
hundred), is ranked by a least-significant-digit radix sort instead (four 8-bit digits,
each a stable counting pass; a digit every entry shares is skipped).

:func:`della_ranks` ranks every entry (the radix sort of every row); :func:`della_probs`
gives the probabilities from them and :func:`keep_bytes` the mask stream's byte comparison
with given probabilities (``MaskStream.keep_with(compiled=True)``): the path for a block
whose ties outgrow its spare words.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_math.kernels.della_lanes import bounds16, sure16
from mergekit_math.kernels.scalar import _at, _f32_to_bits
from mergekit_math.kernels.stats import block_sum_kept, source_size, value_at

_MAX_BINS = 4096  # bins of one row's top-16-bit keys (a range of 32 binary exponents)
_TOPS = 1 << 15  # a magnitude's top 16 bits (its sign bit clear): a bin's index in the tables
_NARROW = 1 << 16  # rows shorter than this are binned: a bin's counts fit 16 bits each


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
def _bin(k):  # noqa: ANN001, ANN202
    """The bin of key ``k``: its top 16 bits (0: the zeros, in a binned row)."""
    return _at(np.int64(k >> 16))


@njit(error_model="numpy")
def _radix_workspace(row):  # noqa: ANN001, ANN202
    """The buffers :func:`_radix_ranks` works in for rows of ``row`` entries: a copy of the
    keys (it consumes them), the spare keys, the order and its spare, the digit counts."""
    return (
        np.empty(row, np.uint32),
        np.empty(row, np.uint32),
        np.empty(row, np.int32),
        np.empty(row, np.int32),
        np.empty((4, 256), np.int32),
    )


@njit(nogil=True, cache=True, error_model="numpy")
def della_ranks(src, row, ranks):  # noqa: ANN001, ANN201
    """Each entry's rank (int32) in a stable ascending sort of its row's magnitudes, for a
    source of whole rows of ``row`` entries: a radix sort of every row (the reference the
    tests hold :func:`della_decisions` to, and the path of a block whose ties outgrow its
    spare words, :func:`della_probs`)."""
    keys, spare_keys, order, spare_order, counts = _radix_workspace(row)
    for start in range(0, source_size(src), row):
        _keys(src, start, row, keys)
        _radix_ranks(keys, row, spare_keys, order, spare_order, counts, ranks[start : start + row])


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
def _bin_counts(keys, length, first, hi, table, rel):  # noqa: ANN001, ANN202
    """Per bin (0 and ``first .. hi``, the row's), its entries (``table``'s high 16 bits,
    uint32: rows under 65,536 entries) and those without lower bits set (the low 16); each
    entry's count of the latter before it in its bin into ``rel`` (its place there when it
    has no lower bits: equal keys rank in index order, below every key of the bin with
    lower bits). The bins are indexed by the keys' top 16 bits themselves: no offset, no
    clamp in the loop."""
    table[0] = 0
    table[first : hi + 1] = 0
    for i in range(length):
        k = keys[_at(i)]
        c = _bin(k)
        t = table[c]
        rel[_at(i)] = np.int32(t & np.uint32(0xFFFF))
        table[c] = t + np.uint32(0x10000) + np.uint32((k & np.uint32(0xFFFF)) == 0)


@njit(inline="always")
def _one_bin(table, c, run, below, pos, bounds):  # noqa: ANN001, ANN202
    """Bin ``c`` of :func:`_bounds`, whose first rank is ``run``; returns the next bin's."""
    count = np.int32(table[c] >> np.uint32(16))
    pos[c] = run
    bounds[c] = below[_at(run)] | (below[_at(run + max(count - 1, 0))] << 16)
    return run + count


@njit(error_model="numpy")
def _bounds(table, first, hi, below, pos, bounds):  # noqa: ANN001, ANN202
    """Per bin (0, then ``first .. hi``), its first rank (``pos``) and ``floor(256·p)`` at
    its first and last rank (``bounds``: the first in the low 16 bits): ``below`` rises
    with the rank, so every entry of the bin has a threshold between the two, whatever its
    place in the bin."""
    run, c, end = np.int64(_one_bin(table, 0, np.int32(0), below, pos, bounds)), first, hi + 1
    table_at, below_at = table.ctypes.data, below.ctypes.data
    pos_at, bounds_at = pos.ctypes.data, bounds.ctypes.data
    while c + 16 <= end:  # sixteen bins at a time (della_lanes.bounds16), the rest one by one
        run = bounds16(table_at + 4 * c, below_at, pos_at + 4 * c, bounds_at + 4 * c, run)
        c += 16
    run = np.int32(run)
    for c in range(c, end):  # noqa: B020
        run = _one_bin(table, c, run, below, pos, bounds)


@njit(error_model="numpy")
def _sure(keys, bounds, bytes_, w, i0, seg, kept, k0, slow, ns):  # noqa: ANN001, ANN202
    """Entries ``i0 .. i0+seg-1`` of the row (at ``k0`` in ``kept``; their bytes from
    ``bytes_[w:]``) decided by their bin's thresholds: kept when the byte is below the
    lowest, dropped when above the highest; the others (a byte between the two, about one
    entry in 100) are appended to ``slow`` (int32) and left dropped. Returns their new
    count. Sixteen at a time (:func:`~mergekit_math.kernels.della_lanes.sure16`), the rest
    one by one."""
    j, end = i0, i0 + seg
    key_at, bounds_at, byte_at = keys.ctypes.data, bounds.ctypes.data, bytes_.ctypes.data + w - i0
    kept_at, slow_at = kept.ctypes.data + k0, slow.ctypes.data
    while j + 16 <= end:
        ns += sure16(key_at + 4 * j, bounds_at, byte_at + j, kept_at + j, slow_at + 4 * ns, j)
        j += 16
    for j in range(j, end):  # noqa: B020 (the tail after the vector steps)
        bound = bounds[_bin(keys[_at(j)])]
        first = bound & 0xFFFF
        byte = np.int32(bytes_[_at(w + j - i0)])
        kept[_at(k0 + j)] = byte < first
        slow[_at(ns)] = j
        ns += np.int64(np.uint32(byte - first) <= np.uint32((bound >> 16) - first))
    return ns


@njit(error_model="numpy")
def _ranked(ranks, below, bytes_, w, i0, seg, kept, k0, slow, ns):  # noqa: ANN001, ANN202
    """:func:`_sure` for a row with every rank known: kept when the byte is below its
    threshold; the ties appended to ``slow``."""
    for j in range(i0, i0 + seg):
        byte = np.int32(bytes_[_at(w + j - i0)])
        b = below[_at(ranks[_at(j)])]
        kept[_at(k0 + j)] = byte < b
        slow[_at(ns)] = j
        ns += np.int64(byte == b)
    return ns


@njit(error_model="numpy")
def _place(keys, length, j):  # noqa: ANN001, ANN202
    """The place in its bin of entry ``j`` with lower bits set, in a stable ascending
    sort: the bin's entries below it and those equal to it before it. Two loops LLVM
    vectorises."""
    k = keys[_at(j)]
    floor = k & np.uint32(0xFFFF0000)
    n = np.int32(0)
    for i in range(j):
        n += np.int32(keys[i] == k)
    for i in range(length):
        n += np.int32((keys[i] >= floor) & (keys[i] < k))
    return n


@njit(error_model="numpy")
def _settle(slow, ns, ranks, below, primary, spare, k0, kept, tie, low, span, step):  # noqa: ANN001, ANN202
    """The decisions of the ``slow`` entries (row at ``k0``) from their ranks, in index
    order: a byte equal to the threshold takes its block's next spare word (``tie`` holds
    the block of the last tie and the words it took). False when a block's ties outgrow its
    spare words."""
    width, words = primary.shape[1], spare.shape[1]
    shift = 0  # the blocks' width is a power of two (65536, see della_decisions): shifts
    while (1 << shift) < width:
        shift += 1
    for a in range(ns):
        j = slow[a]
        r = ranks[_at(j)]
        e = k0 + j
        q, w = e >> shift, e & (width - 1)
        byte = np.int32(primary[q, w])
        b = below[_at(r)]
        keep = byte < b
        if byte == b:
            if q != tie[0]:
                tie[0], tie[1] = q, 0
            if tie[1] == words:
                return False
            scaled = np.float64(_probability(r, low, span, step)) * 256.0
            keep = np.float64(spare[q, tie[1]]) * 2.0**-32 < scaled - np.floor(scaled)
            tie[1] += 1
        kept[_at(e)] = keep
    return True


@njit(nogil=True, cache=True, error_model="numpy")
def della_decisions(src, row, low, step, primary, spare, kept, sums):  # noqa: ANN001, ANN201
    """DELLA's keep decisions for a source of whole rows of ``row`` entries (a stored
    array or a ``(base, model)`` pair) that starts a mask block, into the bool array
    ``kept``: probability ``low + (rank / span)·step`` (span = max(row - 1, 1), float32
    steps), decided by the blocks' bytes ``primary`` (rows of 65536: a power of two, or
    ValueError) and spare words ``spare`` as ``MaskStream.keep_with``. ``sums`` gets
    (Σ|x|, Σ|x·keep|) in float64.
    Returns False when a block's ties outgrow its spare words (nothing is then complete).

    A binned row needs no rank but those of the entries whose byte lies between their
    bin's first and last threshold (:func:`_sure`); a row the bins do not fit, or with
    too many such entries with lower bits, is radix-sorted (module docstring)."""
    if primary.shape[1] & (primary.shape[1] - 1):
        raise ValueError("della_decisions: mask blocks must be a power of two wide")
    span = np.float32(max(row - 1, 1))
    below = np.empty(row, np.int32)  # floor(p·256) of each rank: exact
    for r in range(row):
        below[r] = np.int32(np.floor(_probability(r, low, span, step) * 256.0))
    keys, ranks, slow = np.empty(row, np.uint32), np.empty(row, np.int32), np.empty(row, np.int32)
    copy, spare_keys, order, spare_order, counts = _radix_workspace(row)
    nbins = min(_MAX_BINS, 2 * row + 256)  # wider ones would cost more than a radix sort
    table, pos, bounds = (
        np.empty(_TOPS, np.uint32),
        np.empty(_TOPS, np.int32),
        np.empty(_TOPS, np.int32),
    )
    tie = np.array([-1, 0])
    width = primary.shape[1]
    before = after = 0.0
    for start in range(0, source_size(src), row):
        first, hi = _keys(src, start, row, keys)
        first = min(first, hi)  # the lowest nonzero bin (0: a subnormal, or all zeros)
        binned = row < _NARROW and first > 0 and hi - first + 2 <= nbins
        if binned:
            _bin_counts(keys, row, first, hi, table, ranks)
            _bounds(table, first, hi, below, pos, bounds)
        else:
            copy[:row] = keys[:row]
            _radix_ranks(copy, row, spare_keys, order, spare_order, counts, ranks)
        ns, i = 0, 0
        while i < row:  # a segment per mask block the row lies in
            e = start + i
            q, w = e // width, e % width
            seg = min(row - i, width - w)
            if binned:
                ns = _sure(keys, bounds, primary[q], w, i, seg, kept, start, slow, ns)
            else:
                ns = _ranked(ranks, below, primary[q], w, i, seg, kept, start, slow, ns)
            i += seg
        if binned:
            ns_lower = 0
            for a in range(ns):
                ns_lower += np.int64((keys[slow[a]] & np.uint32(0xFFFF)) != 0)
            if ns_lower > max(64, row // 16):  # float32 magnitudes alike by the hundred
                binned = False
                copy[:row] = keys[:row]
                _radix_ranks(copy, row, spare_keys, order, spare_order, counts, ranks)
        if binned:
            for a in range(ns):
                j = slow[a]
                k = keys[j]
                at = pos[_bin(k)]
                ranks[j] = at + (_place(keys, row, j) if k & np.uint32(0xFFFF) else ranks[j])
        if not _settle(slow, ns, ranks, below, primary, spare, start, kept, tie, low, span, step):
            return False
        total, kept_total = block_sum_kept(
            keys.view(np.float32), kept[start : start + row].view(np.uint8)
        )
        before += total
        after += kept_total
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
