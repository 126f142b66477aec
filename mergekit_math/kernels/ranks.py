"""DELLA's keep probabilities for a range of whole rows, compiled: each entry's rank in a
stable ascending sort of its row's magnitudes (equal magnitudes in index order, as
``sparsify.row_ranks`` ranks them with torch's stable argsort of the bit patterns), turned
into ``(density - ε) + (rank / span)·2ε`` with torch's float32 steps.

The ranks come from a least-significant-digit radix sort of the magnitudes' bits (a
non-negative float's bits order like the float, NaN above inf), four 8-bit digits, each a
stable counting pass over the row; the four histograms are counted in one pass first, and a
digit every entry of the row shares (the top byte of most rows, often the lowest) is skipped.

:func:`keep_bytes` is the mask stream's byte comparison with those probabilities in one pass
(``MaskStream.keep_with(compiled=True)``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_math.kernels.scalar import _f32_to_bits
from mergekit_math.kernels.stats import source_size, value_at


@njit(error_model="numpy")
def _row_probs(src, start, length, keys, spare_keys, order, spare, counts, low, span, step, probs):  # noqa: ANN001, ANN202
    for i in range(length):
        keys[i] = _f32_to_bits(abs(value_at(src, start + i)))
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
        probs[start + order[r]] = low + (np.float32(r) / span) * step


@njit(nogil=True, cache=True, error_model="numpy")
def della_probs(src, row, low, step, probs):  # noqa: ANN001, ANN201
    """The keep probability of each entry of ``src`` (a source of whole rows of ``row``
    entries: a stored array or a ``(base, model)`` pair) into the float32 array ``probs``:
    ``low + (rank / span)·step`` with span = max(row - 1, 1), the rank's quotient, product
    and sum each rounded to float32 (``low``, ``step`` float32)."""
    n = source_size(src)
    span = np.float32(max(row - 1, 1))
    keys = np.empty(row, np.uint32)
    spare_keys = np.empty(row, np.uint32)
    order = np.empty(row, np.int32)
    spare = np.empty(row, np.int32)
    counts = np.empty((4, 256), np.int32)
    for start in range(0, n, row):
        _row_probs(src, start, row, keys, spare_keys, order, spare, counts, low, span, step, probs)


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
