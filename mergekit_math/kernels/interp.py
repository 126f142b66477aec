"""Fused chunk kernels of the interpolating methods (SLERP, NuSLERP, Model Stock): once the
preparation has turned a tensor's norms and angles into a few float32 coefficients, each
output element is a short combination of the inputs at its position, computed here in the
torch path's float32 steps and order (each product, sum and quotient rounded, no fused
multiply-add).

Sources are stored arrays or ``(base, model)`` pairs (the model's delta), as in
:mod:`mergekit_math.kernels.stats`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from mergekit_math.kernels.elementwise import _count_bad, _count_inputs
from mergekit_math.kernels.scalar import load, store
from mergekit_math.kernels.stats import value_at

_ZERO = np.float32(0.0)


def plus_base(src, i, r):  # noqa: ANN001, ANN201
    """``base + r`` for a ``(base, model)`` source, ``r`` for a stored array (numba only)."""
    raise NotImplementedError


@overload(plus_base, inline="always")
def _plus_base(src, i, r):  # noqa: ANN001, ANN202
    if isinstance(src, types.BaseTuple):
        return lambda src, i, r: load(src[0], i) + r
    return lambda src, i, r: r


@njit(error_model="numpy")
def _pair_loop(a, b, ca, cb, out):  # noqa: ANN001, ANN202
    for i in range(out.shape[0]):
        store(out, i, ca * load(a, i) + cb * load(b, i))


@njit(nogil=True, cache=True, error_model="numpy")
def pair(a, b, ca, cb, out, bad):  # noqa: ANN001, ANN201
    """out = ca·a + cb·b (SLERP's ``coef_a * a + coef_b * b``); bad[0] counts a's
    non-finite elements, bad[1] b's."""
    _count_inputs(a, (b,), bad)
    _pair_loop(a, b, ca, cb, out)


@njit(error_model="numpy")
def _linear_loop(x, y, c1, c2, out):  # noqa: ANN001, ANN202
    for i in range(out.shape[0]):
        store(out, i, plus_base(x, i, c1 * value_at(x, i) + c2 * value_at(y, i)))


@njit(error_model="numpy")
def _spherical_loop(x, y, c1, c2, div, out):  # noqa: ANN001, ANN202
    for i in range(out.shape[0]):
        store(out, i, plus_base(x, i, (c1 * value_at(x, i) + c2 * value_at(y, i)) / div))


@njit(nogil=True, cache=True, error_model="numpy")
def two_way(x, y, c1, c2, div, spherical, out):  # noqa: ANN001, ANN201
    """NuSLERP's ``(c1·x + c2·y) / div`` (``spherical``), else ``c1·x + c2·y``, plus the
    base where the sources are ``(base, model)`` pairs (their deltas)."""
    if spherical:
        _spherical_loop(x, y, c1, c2, div, out)
    else:
        _linear_loop(x, y, c1, c2, out)


@njit(error_model="numpy")
def _stock_loop(base, ms, n, ratio, rest, out):  # noqa: ANN001, ANN202
    for i in range(out.shape[0]):
        total = _ZERO  # Python's sum() starts at 0: 0 + m_0 + m_1 + ...
        for j in range(len(ms)):
            total = total + load(ms[j], i)
        store(out, i, ratio * (total / n) + rest * load(base, i))


@njit(nogil=True, cache=True, error_model="numpy")
def stock(base, ms, n, ratio, rest, out, bad):  # noqa: ANN001, ANN201
    """Model Stock: out = ratio·(Σ m_j / n) + rest·base (rest = 1 - ratio); bad[0] counts
    the base's non-finite elements, bad[1:] the models'."""
    _count_inputs(base, ms, bad)
    _stock_loop(base, ms, n, ratio, rest, out)


@njit(nogil=True, cache=True, error_model="numpy")
def count_bad(x, bad, j):  # noqa: ANN001, ANN201
    """Adds x's count of non-finite elements to bad[j]."""
    _count_bad((x,), bad[j : j + 1])
