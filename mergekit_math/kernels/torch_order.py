"""torch's float32 sum of a short contiguous row, in torch's own order, compiled: what a
preparation needs to give torch's bits without importing torch (SCE's kept squares of its
small tensors, the sum of its coefficients).

torch sums on the CPU with ``cascade_sum`` (aten/src/ATen/native/cpu/SumKernel.cpp): the
output is filled with 0 and the row's sum added to it; a contiguous row of at least 8
floats by ``vectorized_inner_sum`` — 8-lane vectors (the kernel is registered for AVX2 and
the default build, both 8 floats wide, not for AVX-512), summed by ``row_sum`` as four
interleaved columns of vectors through ``multi_row_sum``'s four levels (each level's
partial added into the next every ``2^level_power`` steps), the columns then added in
order; the elements past the last whole vector into a 0-started float, then the 8 lanes in
order; a shorter row by the same ``row_sum`` over four interleaved scalars. torch splits
rows over 32768 elements between threads (``methods.base.SINGLE_THREAD_REDUCTION``), so only
rows up to that length are summed here.

:func:`mergekit_math.kernels.torch_sums_known` says where this is torch's order: x86-64
(aarch64's vectors have other widths) with a torch version it was checked against
(tests/test_torch_order.py: every length up to 300 and longer rows against ``torch.sum``).
Elsewhere the callers use torch.
"""

from __future__ import annotations

import numpy as np
from numba import njit

import mergekit_math.kernels.target  # noqa: F401 (numba's target, before any kernel)

_LANES = 8
_ILP = 4
_LEVELS = 4


@njit(inline="always")
def _level_power(groups):  # noqa: ANN001, ANN202
    """``max(4, CeilLog2(groups) / 4)``."""
    ceil_log2 = 0
    while (1 << ceil_log2) < groups:
        ceil_log2 += 1
    return max(4, ceil_log2 // _LEVELS)


@njit(inline="always")
def _add_group(acc, x, i, width):  # noqa: ANN001, ANN202
    """Group ``i``'s four columns (items ``4i .. 4i+3``) added into the first level."""
    for k in range(_ILP):
        at = (i * _ILP + k) * width
        for lane in range(width):
            acc[0, k, lane] += x[at + lane]


@njit(error_model="numpy")
def _columns(x, groups, width):  # noqa: ANN001, ANN202
    """``multi_row_sum`` over ``groups`` groups of four columns, each ``width`` floats (a
    vector's lanes, or one float): the four columns' sums, shape (4, width)."""
    power = _level_power(groups)
    step = 1 << power
    mask = step - 1
    acc = np.zeros((_LEVELS, _ILP, width), np.float32)
    i = 0
    while i + step <= groups:
        for _ in range(step):
            _add_group(acc, x, i, width)
            i += 1
        for j in range(1, _LEVELS):
            for k in range(_ILP):
                for lane in range(width):
                    acc[j, k, lane] += acc[j - 1, k, lane]
                    acc[j - 1, k, lane] = 0
            if i & (mask << (j * power)):
                break
    while i < groups:
        _add_group(acc, x, i, width)
        i += 1
    for j in range(1, _LEVELS):
        for k in range(_ILP):
            for lane in range(width):
                acc[0, k, lane] += acc[j, k, lane]
    return acc[0]


@njit(error_model="numpy")
def _row(x, count, width):  # noqa: ANN001, ANN202
    """``row_sum`` of ``count`` items of ``width`` floats: the first column's sum (its
    lanes) after the leftover items and the other columns are added to it."""
    groups = count // _ILP
    columns = _columns(x, groups, width)
    first = columns[0]
    for i in range(groups * _ILP, count):
        for lane in range(width):
            first[lane] += x[i * width + lane]
    for k in range(1, _ILP):
        for lane in range(width):
            first[lane] += columns[k, lane]
    return first


@njit(nogil=True, cache=True, error_model="numpy")
def row_sum(x):  # noqa: ANN001, ANN201
    """torch's float32 ``x.sum()`` of a contiguous float32 row of at most 32768 elements
    (module docstring), as a float32."""
    n = x.shape[0]
    zero = np.float32(0.0)
    if n < _LANES:
        return zero + _row(x, n, 1)[0]
    vectors = n // _LANES
    lanes = _row(x, vectors, _LANES)
    total = zero
    for i in range(vectors * _LANES, n):
        total += x[i]
    for lane in range(_LANES):
        total += lanes[lane]
    return zero + total
