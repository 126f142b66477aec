"""Whole-tensor statistics of the SLERP family and Model Stock (norms, dot products), over
the inputs as the engine read them, so that those methods can merge in chunks.

A source is a stored array (bfloat16 bits or float32) or a ``(base, model)`` pair, whose
element is ``model - base`` rounded to float32 (:func:`value_at`). Each term (a square, or
the float32 product of the two scaled values) is exact in float64 and is summed in float64,
as ``reduce_sum``/``reduce_norm`` sum a long tensor, in blocks of eight lanes whose totals
are added with a compensated sum: the result is the exact sum to within a few float64 ulps,
so rounded to float32 it is torch's float64 sum rounded to float32, unless the exact sum
lies within a few 1e-16 of a float32 rounding boundary (about one statistic in 10^8; the
summation order of the two is not the same, and neither is specified by torch).

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


@njit(nogil=True, cache=True, error_model="numpy")
def sum_squares(src):  # noqa: ANN001, ANN201
    """Σ x² in float64 over a source."""
    n = source_size(src)
    total = 0.0
    carry = 0.0
    for start in range(0, n, _BLOCK):
        end = min(start + _BLOCK, n)
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
        i = start
        while i + 8 <= end:
            v0 = np.float64(value_at(src, i))
            v1 = np.float64(value_at(src, i + 1))
            v2 = np.float64(value_at(src, i + 2))
            v3 = np.float64(value_at(src, i + 3))
            v4 = np.float64(value_at(src, i + 4))
            v5 = np.float64(value_at(src, i + 5))
            v6 = np.float64(value_at(src, i + 6))
            v7 = np.float64(value_at(src, i + 7))
            a0 += v0 * v0
            a1 += v1 * v1
            a2 += v2 * v2
            a3 += v3 * v3
            a4 += v4 * v4
            a5 += v5 * v5
            a6 += v6 * v6
            a7 += v7 * v7
            i += 8
        while i < end:
            v0 = np.float64(value_at(src, i))
            a0 += v0 * v0
            i += 1
        total, carry = _add(total, carry, ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)))
    return total + carry


@njit(inline="always")
def _term(x, y, i, nx, ny):  # noqa: ANN001, ANN202
    return np.float64((value_at(x, i) / nx) * (value_at(y, i) / ny))


@njit(nogil=True, cache=True, error_model="numpy")
def sum_products(x, y, nx, ny):  # noqa: ANN001, ANN201
    """Σ (x/nx)·(y/ny) in float64 over two sources of one size, each quotient and the
    product rounded to float32 as torch computes ``(a / na) * (b / nb)``."""
    n = source_size(x)
    total = 0.0
    carry = 0.0
    for start in range(0, n, _BLOCK):
        end = min(start + _BLOCK, n)
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
        i = start
        while i + 8 <= end:
            a0 += _term(x, y, i, nx, ny)
            a1 += _term(x, y, i + 1, nx, ny)
            a2 += _term(x, y, i + 2, nx, ny)
            a3 += _term(x, y, i + 3, nx, ny)
            a4 += _term(x, y, i + 4, nx, ny)
            a5 += _term(x, y, i + 5, nx, ny)
            a6 += _term(x, y, i + 6, nx, ny)
            a7 += _term(x, y, i + 7, nx, ny)
            i += 8
        while i < end:
            a0 += _term(x, y, i, nx, ny)
            i += 1
        total, carry = _add(total, carry, ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)))
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
