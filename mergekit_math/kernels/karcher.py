"""The Karcher mean on chunks, compiled: the passes of ``methods/karcher.py``'s gradient
descent over a tensor's inputs as stored, with the iterate ``M`` and the tangent ``T`` held
as float32 arrays, each element computed in the torch path's float32 steps and order.

With ``x_j`` the usable inputs, ``r_j`` their float32 norms, ``u_j = x_j / r_j``:

- :func:`linear_into`: the start ``Σ_j u_j·w_j`` (from +0; its Σ² is
  :func:`mergekit_math.kernels.spherical.mean_squares`, the same sum) divided by its length,
  ``M``;
- :func:`dots`: ``M ← M / div`` (the previous step's normalisation; ``div`` 1 leaves it) and
  ``Σ M·u_j`` per input;
- :func:`tangent`: ``T = 0 + Σ_active f_j·(u_j − c_j·M)`` and ``Σ T²``;
- :func:`step`: ``M ← c·M + s·(T / ‖T‖)`` and ``Σ M²``;
- :func:`result`: the chunk's ``scale·(M / div)``.

Sums are float64 by blocks of 4096 elements, the blocks added with compensation (as in
:mod:`mergekit_math.kernels.stats`): ``reduce_sum`` and ``reduce_norm``'s float64 sums of
the tensors over 32768 elements, to within a few float64 ulps.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_math.kernels.elementwise import _count_bad
from mergekit_math.kernels.scalar import load, store
from mergekit_math.kernels.spherical import _mean_at
from mergekit_math.kernels.stats import _add

_ZERO = np.float32(0.0)
_BLOCK = 4096


@njit(nogil=True, cache=True, error_model="numpy")
def linear_into(xs, norms, ws, length, first, out):  # noqa: ANN001, ANN201
    """out = (Σ_j w_j·u_j) / length, or u_0 where the start's length is below tol
    (``first``)."""
    for i in range(out.shape[0]):
        if first:
            out[i] = load(xs[0], i) / norms[0]
        else:
            out[i] = _mean_at(xs, i, norms, ws) / length


@njit(nogil=True, cache=True, error_model="numpy")
def dots(xs, norms, mean, div, out):  # noqa: ANN001, ANN201
    """mean ← mean / div in place, then out[j] = Σ mean·u_j over the range, in float64."""
    n = mean.shape[0]
    k = len(xs)
    total = np.zeros(k)
    carry = np.zeros(k)
    acc = np.zeros(k)
    for start in range(0, n, _BLOCK):
        acc[:] = 0.0
        for i in range(start, min(start + _BLOCK, n)):
            m = mean[i] / div
            mean[i] = m
            for j in range(k):
                acc[j] += np.float64(m * (load(xs[j], i) / norms[j]))
        for j in range(k):
            total[j], carry[j] = _add(total[j], carry[j], acc[j])
    for j in range(k):
        out[j] = total[j] + carry[j]


@njit(nogil=True, cache=True, error_model="numpy")
def tangent(xs, norms, mean, cos, f, active, out):  # noqa: ANN001, ANN201
    """out = 0 + Σ_{active j} f_j·(u_j − cos_j·mean); returns Σ out² in float64."""
    n = mean.shape[0]
    total = carry = 0.0
    for start in range(0, n, _BLOCK):
        acc = 0.0
        for i in range(start, min(start + _BLOCK, n)):
            m = mean[i]
            t = _ZERO
            for j in range(len(xs)):
                if active[j]:
                    t = t + f[j] * ((load(xs[j], i) / norms[j]) - cos[j] * m)
            out[i] = t
            acc += np.float64(t) * np.float64(t)
        total, carry = _add(total, carry, acc)
    return total + carry


@njit(nogil=True, cache=True, error_model="numpy")
def step(mean, tangent, c, s, length):  # noqa: ANN001, ANN201
    """mean ← c·mean + s·(tangent / length) in place; returns Σ mean² in float64."""
    n = mean.shape[0]
    total = carry = 0.0
    for start in range(0, n, _BLOCK):
        acc = 0.0
        for i in range(start, min(start + _BLOCK, n)):
            m = c * mean[i] + s * (tangent[i] / length)
            mean[i] = m
            acc += np.float64(m) * np.float64(m)
        total, carry = _add(total, carry, acc)
    return total + carry


@njit(nogil=True, cache=True, error_model="numpy")
def result(xs, mean, div, scale, out, bad):  # noqa: ANN001, ANN201
    """out = scale·(mean / div) over a chunk; bad[j] counts input j's non-finite elements."""
    _count_bad(xs, bad)
    for i in range(out.shape[0]):
        m = mean[i] / div
        store(out, i, scale * m)
