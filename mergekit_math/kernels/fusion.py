"""Arcee Fusion's chunk kernel: ``out = base + (m − base)·[|m − base|·KL_row ≥ τ]`` over
chunks of whole rows, in the float32 steps of ``methods/arcee_fusion.py`` (the row's KL and
the threshold τ come from the preparation), and the preparation's importances
``|m − base|·KL_row`` (:func:`importances`)."""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_math.kernels.elementwise import _count_inputs
from mergekit_math.kernels.scalar import _f32_to_bits, load, store

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_EXP = np.uint32(0x7F800000)


@njit(error_model="numpy")
def _row(base, m, k, tau, out):  # noqa: ANN001, ANN202
    for i in range(out.shape[0]):
        b = load(base, i)
        d = load(m, i) - b
        keep = _ONE if abs(d) * k >= tau else _ZERO
        # a variable, not the expression: numba's IR inlining of ``store`` with a
        # conditional expression as its argument wrote nothing (numba 0.68)
        store(out, i, b + d * keep)


@njit(error_model="numpy")
def _loop(base, m, kl, row, tau, out):  # noqa: ANN001, ANN202
    # slices per row: the loop over a row runs from 0, which LLVM vectorises
    for r in range(out.shape[0] // row):
        cut = slice(r * row, (r + 1) * row)
        _row(base[cut], m[cut], kl[r], tau, out[cut])


@njit(nogil=True, cache=True, error_model="numpy")
def fusion(base, m, kl, row, tau, out, bad):  # noqa: ANN001, ANN201
    """The chunk's rows (``kl`` one float32 per row of ``row`` entries); bad[0] counts the
    base's non-finite elements, bad[1] the model's (None: both known finite)."""
    _count_inputs(base, (m,), bad)
    _loop(base, m, kl, row, tau, out)


@njit(error_model="numpy")
def _importance_row(base, m, k, out):  # noqa: ANN001, ANN202
    """One row's importances; whether one of them is NaN or inf (exponent bits all set)."""
    bad = np.uint32(0)
    for i in range(out.shape[0]):
        x = abs(load(m, i) - load(base, i)) * k
        out[i] = x
        bad |= np.uint32((_f32_to_bits(x) & _EXP) == _EXP)
    return bad


@njit(nogil=True, cache=True, error_model="numpy")
def importances(base, m, kl, row, out):  # noqa: ANN001, ANN201
    """``out = |m − base|·KL_row`` (float32, torch's ``(m - b).abs_()`` times the row's KL)
    for a chunk of whole rows; True when every importance is finite (then so are base and
    model). One vectorised pass, where torch's subtract, abs, multiply and
    ``isfinite(...).all()`` took four (that check alone 4.2 ns per entry)."""
    bad = np.uint32(0)
    for r in range(out.shape[0] // row):
        cut = slice(r * row, (r + 1) * row)
        bad |= _importance_row(base[cut], m[cut], kl[r], out[cut])
    return bad == 0
