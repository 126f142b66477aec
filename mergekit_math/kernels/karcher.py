"""The Karcher mean on chunks, compiled: the passes of ``methods/karcher.py``'s gradient
descent over a tensor's inputs as stored, with the iterate ``M`` and the tangent ``T`` held
as float32 arrays, each element computed in the torch path's float32 steps and order.

With ``x_j`` the usable inputs, ``r_j`` their float32 norms, ``u_j = x_j / r_j``:

- :func:`start_into`: the start ``M = Σ_j u_j·w_j`` (from +0) and ``Σ M²`` (or
  :func:`first_into`: ``M = u_0`` where that length is below tol);
- :func:`dots`: ``M ← M / div`` (the start's length, or the previous step's normalisation;
  ``div`` 1 leaves it) and ``Σ M·u_j`` per input;
- :func:`tangent`: ``T = 0 + Σ_active f_j·(u_j − c_j·M)`` and ``Σ T²``;
- :func:`step`: ``M ← c·M + s·(T / ‖T‖)`` and ``Σ M²``;
- :func:`result`: the chunk's ``scale·(M / div)``; :func:`start`: the same of the start
  ``M = Σ_j w_j·u_j`` computed from the inputs, where the descent stops there (decided from
  the inputs' Gram matrix: ``methods/karcher.py``'s ``first_step``).

Sums are float64 by blocks of 4096 elements (the block's float32 terms, summed by
:func:`~mergekit_math.kernels.stats.block_sum`), the blocks added with compensation (as in
:mod:`mergekit_math.kernels.stats`): ``reduce_sum`` and ``reduce_norm``'s float64 sums of
the tensors over 32768 elements, to within a few float64 ulps.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_math.kernels.elementwise import _count_bad
from mergekit_math.kernels.scalar import load, store
from mergekit_math.kernels.spherical import _mean_at
from mergekit_math.kernels.stats import _add, block_squares, block_sum

_ZERO = np.float32(0.0)
_BLOCK = 4096


@njit(nogil=True, cache=True, error_model="numpy")
def start_into(xs, norms, ws, out):  # noqa: ANN001, ANN201
    """out = Σ_j w_j·u_j (from +0); returns Σ out² in float64. The division by its length is
    left to the first :func:`dots` pass."""
    n = out.shape[0]
    total = carry = 0.0
    for start in range(0, n, _BLOCK):
        size = min(_BLOCK, n - start)
        here = out[start : start + size]
        for i in range(size):
            here[i] = _mean_at(xs, start + i, norms, ws)
        total, carry = _add(total, carry, block_squares(here))
    return total + carry


@njit(nogil=True, cache=True, error_model="numpy")
def first_into(x, norm, out):  # noqa: ANN001, ANN201
    """out = u_0 (the start when the weighted mean's length is below tol)."""
    for i in range(out.shape[0]):
        out[i] = load(x, i) / norm


@njit(nogil=True, cache=True, error_model="numpy")
def dots(xs, norms, mean, div, out):  # noqa: ANN001, ANN201
    """mean ← mean / div in place, then out[j] = Σ mean·u_j over the range, in float64."""
    n = mean.shape[0]
    k = len(xs)
    block = np.empty((k, _BLOCK), np.float32)
    total = np.zeros(k)
    carry = np.zeros(k)
    for start in range(0, n, _BLOCK):
        size = min(_BLOCK, n - start)
        here = mean[start : start + size]
        for i in range(size):
            m = here[i] / div
            here[i] = m
            for j in range(k):
                block[j, i] = m * (load(xs[j], start + i) / norms[j])
        for j in range(k):
            total[j], carry[j] = _add(total[j], carry[j], block_sum(block[j, :size]))
    for j in range(k):
        out[j] = total[j] + carry[j]


@njit(nogil=True, cache=True, error_model="numpy")
def tangent(xs, norms, mean, cos, f, active, out):  # noqa: ANN001, ANN201
    """out = 0 + Σ_{active j} f_j·(u_j − cos_j·mean); returns Σ out² in float64."""
    n = mean.shape[0]
    total = carry = 0.0
    for start in range(0, n, _BLOCK):
        size = min(_BLOCK, n - start)
        here, there = mean[start : start + size], out[start : start + size]
        for i in range(size):
            m = here[i]
            t = _ZERO
            for j in range(len(xs)):
                if active[j]:
                    t = t + f[j] * ((load(xs[j], start + i) / norms[j]) - cos[j] * m)
            there[i] = t
        total, carry = _add(total, carry, block_squares(there))
    return total + carry


@njit(nogil=True, cache=True, error_model="numpy")
def step(mean, tangent, c, s, length):  # noqa: ANN001, ANN201
    """mean ← c·mean + s·(tangent / length) in place; returns Σ mean² in float64."""
    n = mean.shape[0]
    total = carry = 0.0
    for start in range(0, n, _BLOCK):
        size = min(_BLOCK, n - start)
        here, along = mean[start : start + size], tangent[start : start + size]
        for i in range(size):
            here[i] = c * here[i] + s * (along[i] / length)
        total, carry = _add(total, carry, block_squares(here))
    return total + carry


@njit(nogil=True, cache=True, error_model="numpy")
def result(xs, mean, div, scale, out, bad):  # noqa: ANN001, ANN201
    """out = scale·(mean / div) over a chunk; bad[j] counts input j's non-finite elements
    (None: the inputs are known finite, and not read)."""
    _count_bad(xs, bad)
    for i in range(out.shape[0]):
        m = mean[i] / div
        store(out, i, scale * m)


@njit(nogil=True, cache=True, error_model="numpy")
def start(xs, norms, ws, div, scale, inputs, out, bad):  # noqa: ANN001, ANN201
    """out = scale·(M / div) over a chunk, ``M = Σ_j w_j·u_j`` (from +0) of the usable
    inputs ``xs``: the result where the descent stopped at its start. bad[j] counts input
    j's non-finite elements over all ``inputs`` (None: known finite, not read)."""
    _count_bad(inputs, bad)
    for i in range(out.shape[0]):
        m = _mean_at(xs, i, norms, ws) / div
        store(out, i, scale * m)
