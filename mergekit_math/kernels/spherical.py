"""Multi-SLERP on chunks, compiled: the chunk kernel, in the float32 steps and order of
``methods/multislerp.py`` (its whole-tensor scalars come from the inputs' Gram matrix,
:func:`mergekit_math.kernels.stats.gram`).

With ``x_i`` the sources (the models, or ``(base, model)`` pairs: their deltas), ``den_i``
the float32 ``|x_i| + eps``, ``w_i`` the weights (each step rounded to float32):

    u_i = x_i / den_i                  (per element)
    m   = 0 + Σ_i u_i·w_i              the weighted mean direction (torch sums over the
                                       inputs in order, from +0)
    m̂   = m / |m|
    a_i = Σ_elements u_i·m̂             (one scalar per input, from the Gram matrix)
    t   = 0 + Σ_i (u_i − a_i·m̂)·w_i    the tangent
    out = ((m̂·c + t·s)·L) [+ base]     c = cos θ, s = sin θ / θ, L the mean length
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_math.kernels.interp import plus_base
from mergekit_math.kernels.scalar import store
from mergekit_math.kernels.stats import value_at

_ZERO = np.float32(0.0)


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
