"""Whole-tensor statistics of the SLERP family and Model Stock (norms, dot products), over
the inputs as the engine read them, so that those methods can merge in chunks.

A source is a stored array (bfloat16 bits or float32) or a ``(base, model)`` pair, whose
element is ``model - base`` rounded to float32 (:func:`value_at`). Each term (a square, or
the float32 product of the two scaled values) is exact in float64 and is summed in float64,
as ``reduce_sum``/``reduce_norm`` sum a long tensor, by blocks (vectorised sums in the
compiler's order, :func:`block_sum`) whose totals are added with a compensated sum: the
result is the exact sum to within a few float64 ulps, so rounded to float32 it is torch's
float64 sum rounded to float32, unless the exact sum lies within a few 1e-16 of a float32
rounding boundary (about one statistic in 10^8; the summation order of the two is not the
same, and neither is specified by torch).

One call sums one range; the caller adds the ranges' sums with ``math.fsum``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from mergekit_math.kernels.scalar import load

_BLOCK = 4096


def value_at(src, i):  # noqa: ANN001, ANN201
    """Element ``i`` of a source as float32 (numba only): a stored array's value, or a
    ``(base, model)`` pair's ``model - base``."""
    raise NotImplementedError


@overload(value_at, inline="always")
def _value_at(src, i):  # noqa: ANN001, ANN202
    if isinstance(src, types.BaseTuple):
        return lambda src, i: load(src[1], i) - load(src[0], i)
    return lambda src, i: load(src, i)


def source_size(src):  # noqa: ANN001, ANN201
    raise NotImplementedError


@overload(source_size, inline="always")
def _source_size(src):  # noqa: ANN001, ANN202
    if isinstance(src, types.BaseTuple):
        return lambda src: src[1].shape[0]
    return lambda src: src.shape[0]


@njit(inline="always")
def _add(total, carry, x):  # noqa: ANN001, ANN202
    """Neumaier's compensated step: (total, carry) + x."""
    t = total + x
    if abs(total) >= abs(x):
        carry += (total - t) + x
    else:
        carry += (x - t) + total
    return t, carry


# The block sums let LLVM reorder their additions (``reassoc``: it vectorises them, 0.65 ->
# 0.1 ns per float64 product) and fuse a product into its sum (``contract``: a product of two
# float32 values is exact in float64, so the fused step rounds as the separate ones). The
# order is the compiler's for the machine: the sum of a block's exact terms to within a few
# float64 ulps, as the lane order it replaces was. Not inlined at numba's level, where the
# caller's flags would replace these.
_SUM_FLAGS = {"reassoc", "contract"}


@njit(fastmath=_SUM_FLAGS, error_model="numpy", nogil=True, cache=True)
def block_sum(block):  # noqa: ANN001, ANN201
    """Σ block[i] in float64 over a float32 block (the float32 terms a kernel computed into
    a buffer first: that loop vectorises, and so does this one)."""
    total = 0.0
    for i in range(block.shape[0]):
        total += np.float64(block[i])
    return total


@njit(fastmath=_SUM_FLAGS, error_model="numpy", nogil=True, cache=True)
def block_squares(block):  # noqa: ANN001, ANN201
    """Σ block[i]² in float64 (each square exact) over a float32 block, as :func:`block_sum`."""
    total = 0.0
    for i in range(block.shape[0]):
        v = np.float64(block[i])
        total += v * v
    return total


@njit(fastmath=_SUM_FLAGS, error_model="numpy", nogil=True, cache=True)
def block_dot(a, b):  # noqa: ANN001, ANN201
    """Σ a[i]·b[i] in float64 (each product exact) over two float32 blocks of one length,
    as :func:`block_sum`."""
    total = 0.0
    for i in range(a.shape[0]):
        total += np.float64(a[i]) * np.float64(b[i])
    return total


@njit(fastmath=_SUM_FLAGS, error_model="numpy", nogil=True, cache=True)
def block_sum_kept(block, keep):  # noqa: ANN001, ANN201
    """(Σ block[i], Σ block[i]·keep[i]) in float64 over a float32 block and a keep mask
    (uint8) of one length, in one loop, as :func:`block_sum` (``x·0`` is NaN for an
    infinite x, as torch's product)."""
    total = kept = 0.0
    for i in range(block.shape[0]):
        v = np.float64(block[i])
        total += v
        kept += v * np.float64(keep[i])
    return total, kept


def _squares(src, start, end, block):  # noqa: ANN001, ANN201
    """Σ x² in float64 over ``[start, end)`` of a source (numba only)."""
    raise NotImplementedError


@overload(_squares, inline="always")
def _squares_of(src, start, end, block):  # noqa: ANN001, ANN202
    if isinstance(src, types.Array) and src.dtype == types.float32:
        return lambda src, start, end, block: block_squares(src[start:end])

    # bfloat16 bits or a pair's differences: the float32 values into the block first (that
    # loop vectorises; squaring them where they are converted does not), then squared and
    # summed: 0.51 -> 0.35 ns per bfloat16 element, 1.0 -> 0.45 per pair; float32 elements
    # are summed where they lie (the slice is the block: 0.28 ns, against 0.47 copied)
    def staged(src, start, end, block):  # noqa: ANN001, ANN202
        size = end - start
        for i in range(size):
            block[i] = value_at(src, start + i)
        return block_squares(block[:size])

    return staged


@njit(nogil=True, cache=True, error_model="numpy")
def sum_squares(src):  # noqa: ANN001, ANN201
    """Σ x² in float64 over a source."""
    n = source_size(src)
    total = carry = 0.0
    block = np.empty(_BLOCK, np.float32)
    for start in range(0, n, _BLOCK):
        end = min(start + _BLOCK, n)
        total, carry = _add(total, carry, _squares(src, start, end, block))
    return total + carry


@njit(nogil=True, cache=True, error_model="numpy")
def sum_products(x, y, nx, ny):  # noqa: ANN001, ANN201
    """Σ (x/nx)·(y/ny) in float64 over two sources of one size, each quotient and the
    product rounded to float32 as torch computes ``(a / na) * (b / nb)``. The block's
    products go to a buffer first, then are summed (1.7 -> 0.5 ns per element)."""
    n = source_size(x)
    total = carry = 0.0
    block = np.empty(_BLOCK, np.float32)
    for start in range(0, n, _BLOCK):
        size = min(_BLOCK, n - start)
        for i in range(size):
            block[i] = (value_at(x, start + i) / nx) * (value_at(y, start + i) / ny)
        total, carry = _add(total, carry, block_sum(block[:size]))
    return total + carry


@njit(nogil=True, cache=True, error_model="numpy")
def sum_abs_kept(src, keep):  # noqa: ANN001, ANN201
    """(Σ |x|, Σ |x·keep|) in float64 over a source and its keep mask (uint8/bool): the
    L1 norms before and after a drop (``x·0`` is ±0, NaN for an infinite x, as torch's
    product with the mask)."""
    n = source_size(src)
    before = after = 0.0
    carry_before = carry_after = 0.0
    for start in range(0, n, _BLOCK):
        end = min(start + _BLOCK, n)
        b0 = b1 = b2 = b3 = 0.0
        a0 = a1 = a2 = a3 = 0.0
        i = start
        while i + 4 <= end:
            x0, x1 = value_at(src, i), value_at(src, i + 1)
            x2, x3 = value_at(src, i + 2), value_at(src, i + 3)
            b0 += np.float64(abs(x0))
            b1 += np.float64(abs(x1))
            b2 += np.float64(abs(x2))
            b3 += np.float64(abs(x3))
            a0 += np.float64(abs(x0 * np.float32(keep[i])))
            a1 += np.float64(abs(x1 * np.float32(keep[i + 1])))
            a2 += np.float64(abs(x2 * np.float32(keep[i + 2])))
            a3 += np.float64(abs(x3 * np.float32(keep[i + 3])))
            i += 4
        while i < end:
            x0 = value_at(src, i)
            b0 += np.float64(abs(x0))
            a0 += np.float64(abs(x0 * np.float32(keep[i])))
            i += 1
        before, carry_before = _add(before, carry_before, (b0 + b1) + (b2 + b3))
        after, carry_after = _add(after, carry_after, (a0 + a1) + (a2 + a3))
    return before + carry_before, after + carry_after


@njit(nogil=True, cache=True, error_model="numpy")
def gram(xs, out):  # noqa: ANN001, ANN201
    """out[j, l] = Σ x_j·x_l in float64 over a range of the sources ``xs`` (one read of
    them for every pair): each block's float32 values into a buffer, then each pair's
    exact products summed (:func:`block_dot`), the blocks added with compensation."""
    n = source_size(xs[0])
    k = len(xs)
    block = np.empty((k, _BLOCK), np.float32)
    total = np.zeros((k, k))
    carry = np.zeros((k, k))
    for start in range(0, n, _BLOCK):
        size = min(_BLOCK, n - start)
        for j in range(k):
            src, here = xs[j], block[j]
            for i in range(size):
                here[i] = value_at(src, start + i)
        for j in range(k):
            for m in range(j, k):
                s = block_dot(block[j, :size], block[m, :size])
                total[j, m], carry[j, m] = _add(total[j, m], carry[j, m], s)
    for j in range(k):
        for m in range(j, k):
            out[j, m] = out[m, j] = total[j, m] + carry[j, m]
