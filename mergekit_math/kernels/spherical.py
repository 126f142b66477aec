"""Multi-SLERP on chunks, compiled: the three whole-tensor passes of its preparation and the
chunk kernel, in the float32 steps and order of ``methods/multislerp.py``.

With ``x_i`` the sources (the models, or ``(base, model)`` pairs: their deltas), ``den_i``
the float32 ``|x_i| + eps``, ``w_i`` the weights (each step rounded to float32):

    u_i = x_i / den_i                  (per element)
    m   = 0 + Σ_i u_i·w_i              the weighted mean direction (torch sums over the
                                       inputs in order, from +0)
    m̂   = m / |m|
    a_i = Σ_elements u_i·m̂             (pass 3, one sum per input)
    t   = 0 + Σ_i (u_i − a_i·m̂)·w_i    the tangent
    out = ((m̂·c + t·s)·L) [+ base]     c = cos θ, s = sin θ / θ, L the mean length

Pass 2 sums m², pass 3 the a_i, pass 4 t²; each block of 4096 elements computes its float32
terms into a buffer (a loop that vectorises), sums them in eight float64 lanes, and the
blocks' sums are added with compensation (see :mod:`mergekit_math.kernels.stats`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_math.kernels.interp import plus_base
from mergekit_math.kernels.scalar import store
from mergekit_math.kernels.stats import _add, block_squares, block_sum, source_size, value_at

_ZERO = np.float32(0.0)
_BLOCK = 4096


@njit(inline="always")
def _mean_at(xs, i, den, ws):  # noqa: ANN001, ANN202
    m = _ZERO
    for j in range(len(xs)):
        m = m + (value_at(xs[j], i) / den[j]) * ws[j]
    return m


@njit(inline="always")
def _tangent_at(xs, i, den, ws, unit, along):  # noqa: ANN001, ANN202
    t = _ZERO
    for j in range(len(xs)):
        t = t + ((value_at(xs[j], i) / den[j]) - along[j] * unit) * ws[j]
    return t


@njit(nogil=True, cache=True, error_model="numpy")
def mean_squares(xs, den, ws):  # noqa: ANN001, ANN201
    """Σ m² in float64 over a range (pass 2)."""
    n = source_size(xs[0])
    block = np.empty(_BLOCK, np.float32)
    total = carry = 0.0
    for start in range(0, n, _BLOCK):
        size = min(_BLOCK, n - start)
        for i in range(size):
            block[i] = _mean_at(xs, start + i, den, ws)
        total, carry = _add(total, carry, block_squares(block[:size]))
    return total + carry


@njit(nogil=True, cache=True, error_model="numpy")
def alongs(xs, den, ws, length, out):  # noqa: ANN001, ANN201
    """Σ u_i·m̂ per input, in float64, into ``out`` (pass 3; ``length`` is |m|)."""
    n = source_size(xs[0])
    k = len(xs)
    block = np.empty((k, _BLOCK), np.float32)
    total = np.zeros(k)
    carry = np.zeros(k)
    for start in range(0, n, _BLOCK):
        size = min(_BLOCK, n - start)
        for i in range(size):
            unit = _mean_at(xs, start + i, den, ws) / length
            for j in range(k):
                block[j, i] = (value_at(xs[j], start + i) / den[j]) * unit
        for j in range(k):
            total[j], carry[j] = _add(total[j], carry[j], block_sum(block[j, :size]))
    for j in range(k):
        out[j] = total[j] + carry[j]


@njit(nogil=True, cache=True, error_model="numpy")
def tangent_squares(xs, den, ws, length, along):  # noqa: ANN001, ANN201
    """Σ t² in float64 over a range (pass 4; ``along`` the float32 a_i)."""
    n = source_size(xs[0])
    block = np.empty(_BLOCK, np.float32)
    total = carry = 0.0
    for start in range(0, n, _BLOCK):
        size = min(_BLOCK, n - start)
        for i in range(size):
            unit = _mean_at(xs, start + i, den, ws) / length
            block[i] = _tangent_at(xs, start + i, den, ws, unit, along)
        total, carry = _add(total, carry, block_squares(block[:size]))
    return total + carry


@njit(nogil=True, cache=True, error_model="numpy")
def chunk(xs, den, ws, length, along, cos, sinc, scale, out):  # noqa: ANN001, ANN201
    """out = (m̂·cos + t·sinc)·scale, plus the base where the sources are pairs."""
    for i in range(out.shape[0]):
        unit = _mean_at(xs, i, den, ws) / length
        t = _tangent_at(xs, i, den, ws, unit, along)
        store(out, i, plus_base(xs[0], i, (unit * cos + t * sinc) * scale))


@njit(nogil=True, cache=True, error_model="numpy")
def weighted(xs, ws, out):  # noqa: ANN001, ANN201
    """The linear fallback: out = x_0·w_0 + x_1·w_1 + … (+ base)."""
    for i in range(out.shape[0]):
        r = value_at(xs[0], i) * ws[0]
        for j in range(1, len(xs)):
            r = r + value_at(xs[j], i) * ws[j]
        store(out, i, plus_base(xs[0], i, r))
