"""SCE on chunks, compiled: the per-element variance its selection ranks, the sums of the
kept squares its coefficients come from, and the chunk kernel, in the float32 steps and
order of ``methods/sce.py``.

Each works on one range of a tensor's inputs as stored (bfloat16 bits or float32), with
``δ_j = m_j - base`` rounded to float32 and ``keep`` the range's 0/1 mask (uint8; None:
every position kept, as ``x·1`` is ``x``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from mergekit_math.kernels.elementwise import _count_inputs
from mergekit_math.kernels.scalar import _at, _f32_to_bits, load, sign_bit_one, step, store
from mergekit_math.kernels.select_passes import BINS, SHIFT, add_bins
from mergekit_math.kernels.stats import _add, block_sum

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_DIVISOR_FLOOR = np.float32(1e-6)  # methods/sce.py's, as torch's clamp rounds it
_BLOCK = 4096


def keep_at(keep, i):  # noqa: ANN001, ANN201
    """The 0/1 float32 factor of position ``i`` (numba only): 1 where ``keep`` is None."""
    raise NotImplementedError


@overload(keep_at, inline="always")
def _keep_at(keep, i):  # noqa: ANN001, ANN202
    if isinstance(keep, types.NoneType):
        return lambda keep, i: _ONE
    return lambda keep, i: np.float32(keep[_at(i)])


@njit(inline="always")
def _variance(base, ms, i):  # noqa: ANN001, ANN202
    """Var_j(δ_j) at position ``i`` as ``torch.var`` computes it on the CPU: Welford's
    update in float64 over the models in order, the sum of squared deviations divided by
    the count, rounded to float32."""
    k = len(ms)
    b = load(base, i)
    mean = 0.0
    m2 = 0.0
    for j in range(k):
        x = np.float64(load(ms[j], i) - b)
        d = x - mean
        mean += d / (j + 1)
        m2 += d * (x - mean)
    return np.float32(m2 / k)


def _as_stored(block, v):  # noqa: ANN001, ANN201
    """Variance ``v`` as ``block`` stores it (numba only): the value in a float32 block,
    its top-16-bit bin (``bits >> 15``, the last bin for a sign bit) in a uint16 one."""
    raise NotImplementedError


@overload(_as_stored, inline="always")
def _as_stored_impl(block, v):  # noqa: ANN001, ANN202
    if block.dtype == types.uint16:
        return lambda block, v: np.uint16(
            min(_f32_to_bits(v) >> np.uint32(SHIFT), np.uint32(BINS - 1))
        )
    return lambda block, v: v


def _bins(block, hist):  # noqa: ANN001, ANN201
    """Add a block's bins (numba only): of its float32 values, or its uint16 bins."""
    raise NotImplementedError


@overload(_bins, inline="always")
def _bins_impl(block, hist):  # noqa: ANN001, ANN202
    if block.dtype == types.uint16:

        def keys(block, hist):  # noqa: ANN001, ANN202
            for i in range(block.shape[0]):
                hist[block[i]] += 1

        return keys
    return lambda block, hist: add_bins(block, hist)


@njit(nogil=True, cache=True, error_model="numpy")
def variance_into(base, ms, out, hist):  # noqa: ANN001, ANN201
    """out = Var_j(δ_j) (population) per position, as ``torch.var`` computes it on the CPU
    (:func:`_variance`); or, where ``out`` is uint16, each variance's top-16-bit bin
    (``bits >> 15``: how :func:`squares_above_bin` compares them, half the bytes of the
    values). The bins are added to ``hist`` as they are written (the selection's first
    pass, :func:`~mergekit_math.kernels.select.kth_largest_bits_from`; a NaN with its sign
    bit set counts in the last bin: the caller does not select where some variance is not
    finite). Returns (nonzero, non-finite) counts.

    By blocks, each histogrammed while it is in cache (the pass is bound by memory: 1.9 ->
    1.5 ns per element for two bfloat16 models, against a histogram pass of its own over
    the variances; Welford's steps block by block in float64 buffers were slower, 1.6-1.9)."""
    n = out.shape[0]
    nonzero = 0
    bad = 0
    for start in range(0, n, _BLOCK):
        block = out[start : min(n, start + _BLOCK)]
        for i in range(block.shape[0]):
            v = _variance(base, ms, start + i)
            block[i] = _as_stored(block, v)
            nonzero += v != 0
            bad += not np.isfinite(v)
        _bins(block, hist)
    return nonzero, bad


@njit(nogil=True, cache=True, error_model="numpy")
def variance_bits_at(base, ms, positions, out):  # noqa: ANN001, ANN201
    """out[p] = the float32 bits of :func:`_variance` at ``positions[p]``: the exact values
    of the few variances whose bins were stored."""
    for p in range(positions.shape[0]):
        out[p] = _f32_to_bits(_variance(base, ms, positions[p]))


@njit(nogil=True, cache=True, error_model="numpy")
def keep_between(values, low, high, out):  # noqa: ANN001, ANN201
    """out = 1 where low < value < high, else 0 (a :class:`TieRule`'s bounds, compared in
    float32; its runs of ties are marked by the caller)."""
    for i in range(out.shape[0]):
        out[i] = (values[i] > low) & (values[i] < high)


@njit(nogil=True, cache=True, error_model="numpy")
def kept_squares(base, ms, keep, out):  # noqa: ANN001, ANN201
    """out[j] = Σ (δ_j·keep)² over the range: each square rounded to float32 (torch's
    ``square()``), summed in float64 by blocks whose sums are added with compensation (see
    :mod:`mergekit_math.kernels.stats`). Per block the float32 squares go into a buffer
    first (a loop that vectorises), then :func:`~mergekit_math.kernels.stats.block_sum`:
    3.0 -> 1.0 ns per element for two bfloat16 models, against one float64 accumulator
    chain per lane where they were converted."""
    n = base.shape[0]
    block = np.empty(_BLOCK, np.float32)
    sums = np.zeros((2, len(ms)))  # the totals and their compensations
    for start in range(0, n, _BLOCK):  # a block of the base and mask stays in cache
        _add_block_squares(base, ms, keep, start, min(_BLOCK, n - start), block, sums)
    out[:] = sums[0] + sums[1]


@njit(inline="always")
def _add_block_squares(base, ms, keep, start, size, block, sums):  # noqa: ANN001, ANN202
    """Each model's Σ (δ_j·keep)² over a block, its float32 squares in ``block`` first,
    added to ``sums`` (row 0 the totals, row 1 their compensations)."""
    for j in range(len(ms)):
        m = ms[j]
        for i in range(size):
            d = (load(m, start + i) - load(base, start + i)) * keep_at(keep, start + i)
            block[i] = d * d
        sums[0, j], sums[1, j] = _add(sums[0, j], sums[1, j], block_sum(block[:size]))


@njit(nogil=True, cache=True, error_model="numpy")
def squares_above_bin(base, ms, keys, bin_, keep, out, where):  # noqa: ANN001, ANN201
    """The selection's second pass, the keep mask and :func:`kept_squares` in one pass, for
    a range of variances stored as their bins (``keys``, uint16: :func:`variance_into`)
    where the k-th largest lies in bin ``bin_``: keep = 1 where the bin is above it, else
    0; out[j] = Σ (δ_j·keep)² as :func:`kept_squares`; the positions of the variances in
    the bin into ``where``, in index order (the caller decides those and adds their squares
    with :func:`add_squares_at`). Returns how many there are (those past the end of
    ``where`` not written).

    Per block: the mask and a flag per position (a loop that vectorises), the flags eight
    at a time (one uint64) where the bin holds few values, then each model's squares."""
    n = base.shape[0]
    block = np.empty(_BLOCK, np.float32)
    flags = np.zeros(_BLOCK, np.uint8)
    words = flags.view(np.uint64)
    sums = np.zeros((2, len(ms)))
    found = 0
    for start in range(0, n, _BLOCK):
        size = min(_BLOCK, n - start)
        for i in range(size):
            b = keys[_at(start + i)]
            keep[_at(start + i)] = b > bin_
            flags[i] = b == bin_
        for i in range(size, min(_BLOCK, size + 8)):  # a last, short block's last word
            flags[i] = 0
        for w in range((size + 7) // 8):
            if words[w]:
                for i in range(8 * w, 8 * w + 8):
                    if flags[i]:
                        if found < where.shape[0]:
                            where[found] = start + i
                        found += 1
        _add_block_squares(base, ms, keep, start, size, block, sums)
    out[:] = sums[0] + sums[1]
    return found


@njit(nogil=True, cache=True, error_model="numpy")
def add_squares_at(base, ms, positions, out):  # noqa: ANN001, ANN201
    """out[j] += Σ δ_j² over ``positions`` (each square rounded to float32, summed in
    float64 with compensation): the kept positions :func:`squares_above_bin` left out."""
    for j in range(len(ms)):
        m = ms[j]
        total = 0.0
        carry = 0.0
        for i in positions:
            d = load(m, i) - load(base, i)
            total, carry = _add(total, carry, np.float64(d * d))
        out[j] += total + carry


@njit(error_model="numpy")
def _merge_loop(base, ms, keep, ws, out):  # noqa: ANN001, ANN202
    for i in range(out.shape[0]):
        b = load(base, i)
        f = keep_at(keep, i)
        total = _ZERO  # torch's sum over the models starts at +0
        for j in range(len(ms)):
            total = total + (load(ms[j], i) - b) * f
        elected = sign_bit_one(total)
        merged = _ZERO
        divisor = _ZERO
        for j in range(len(ms)):
            d = (load(ms[j], i) - b) * f
            erased = step(d * elected) * ws[j]
            merged = merged + d * erased
            divisor = divisor + erased
        divisor = _DIVISOR_FLOOR if divisor < _DIVISOR_FLOOR else divisor  # clamp keeps NaN
        store(out, i, b + merged / divisor)


@njit(nogil=True, cache=True, error_model="numpy")
def merge(base, ms, keep, ws, out, bad):  # noqa: ANN001, ANN201
    """out = base + Σ_j δ_j·e_j / max(Σ_j e_j, 1e-6), with δ_j kept by ``keep`` and
    ``e_j = w_j`` where δ_j has the sign elected by Σ_j δ_j, else 0; ``bad``: base first,
    then the models (None: the inputs are known finite, nothing counted)."""
    _count_inputs(base, ms, bad)
    _merge_loop(base, ms, keep, ws, out)
