"""Arcee Fusion's chunk kernel: ``out = base + (m − base)·[|m − base|·KL_row ≥ τ]`` over
chunks of whole rows, in the float32 steps of ``methods/arcee_fusion.py`` (the row's KL and
the threshold τ come from the preparation), and the preparation's importances
``|m − base|·KL_row`` with their histogram (:func:`importances`)."""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_math.kernels.elementwise import _count_inputs
from mergekit_math.kernels.scalar import _EXP32, _f32_to_bits, load, store
from mergekit_math.kernels.select_passes import add_bins
from mergekit_math.kernels.torch_log import MODE, call_ln
from mergekit_math.kernels.torch_order import row_sum
from mergekit_math.kernels.torch_softmax import exponentials, smoothed_ratio_at

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


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
def _importance_row(base, m, k, out, hist):  # noqa: ANN001, ANN202
    """One row's importances, then their top-16-bit bins added to ``hist`` while the row is
    in cache; bit 0 of the result: one of them is NaN or inf (exponent bits all set), bit 1:
    one has its sign bit set (a KL rounded below zero). The loop keeps only the largest bit
    pattern (0.15 ns per entry, against 0.35 with both flags per entry): it reaches the
    exponent's all-ones only where some importance is NaN, inf or signed, and only then are
    the flags counted (:func:`_flags`)."""
    top = np.uint32(0)
    for i in range(out.shape[0]):
        x = abs(load(m, i) - load(base, i)) * k
        out[i] = x
        top = max(top, _f32_to_bits(x))
    add_bins(out, hist)
    return _flags(out) if top >= _EXP32 else np.uint32(0)


@njit(error_model="numpy")
def _flags(values):  # noqa: ANN001, ANN202
    """Bit 0: some value is NaN or inf; bit 1: some value has its sign bit set."""
    flags = np.uint32(0)
    for i in range(values.shape[0]):
        bits = _f32_to_bits(values[i])
        flags |= np.uint32((bits & _EXP32) == _EXP32) | ((bits >> np.uint32(30)) & np.uint32(2))
    return flags


@njit(nogil=True, cache=True, error_model="numpy")
def importances(base, m, kl, row, out, hist):  # noqa: ANN001, ANN201
    """``out = |m − base|·KL_row`` (float32, torch's ``(m - b).abs_()`` times the row's KL)
    for a chunk of whole rows, their top-16-bit histogram added to ``hist`` (the quartile
    selection's first pass, :func:`~mergekit_math.kernels.select.kth_largest_bits_from`);
    returns bit 0 set where some importance is not finite (then base or model is not),
    bit 1 where some is negative (both: the histogram is not the selection's). One pass
    per row, where torch's subtract, abs, multiply and ``isfinite(...).all()`` took four
    (that check alone 4.2 ns per entry) and the histogram read the importances again."""
    flags = np.uint32(0)
    for r in range(out.shape[0] // row):
        cut = slice(r * row, (r + 1) * row)
        flags |= _importance_row(base[cut], m[cut], kl[r], out[cut], hist)
    return flags


@njit(nogil=True, cache=True, error_model="numpy")
def importance_bins(base, m, kl, row, hist):  # noqa: ANN001, ANN201
    """:func:`importances` without keeping them: each row's importances in a row-long
    buffer, their bins added to ``hist``; the same flags. The selection's second pass
    computes them again (``select_passes._block_bits`` of a ``(base, m, kl, row)`` source):
    a whole-tensor array of them, reused from tensor to tensor, still faulted in fresh pages
    once per buffer slot (the embedding's 262 MB: 0.8 CPU-s of a TinyLlama merge's 12)."""
    flags = np.uint32(0)
    out = np.empty(row, np.float32)
    for r in range(m.shape[0] // row):
        cut = slice(r * row, (r + 1) * row)
        flags |= _importance_row(base[cut], m[cut], kl[r], out, hist)
    return flags


@njit(nogil=True, cache=True, error_model="numpy")
def smoothed_ratio(p, q, eps):  # noqa: ANN001, ANN201
    """``p += ε`` and ``q = p / (q + ε)``, in place (float32 arrays of one length; ``eps``
    float32): torch's ``add_`` of the Python float (its float32 value, one rounding) and its
    ``div``, in one vectorised pass instead of three."""
    for i in range(p.shape[0]):
        pe = p[i] + eps
        p[i] = pe
        q[i] = pe / (q[i] + eps)


@njit(nogil=True, cache=True, error_model="numpy")
def kl_importance_bins(base, m, row, lanes, eps, ln, kl, hist):  # noqa: ANN001, ANN201
    """The whole of a range's preparation, one row at a time while it is in cache: the row's
    KL by the whole path's float32 steps — the two softmaxes (torch's,
    :mod:`~mergekit_math.kernels.torch_softmax`, ``lanes`` wide), ``p = softmax(m) + ε``,
    ``q = p / (softmax(base) + ε)``, torch's log of ``q`` (MKL's ``VMSLN_64_`` at address
    ``ln``, :mod:`~mergekit_math.kernels.torch_log`), ``q·p`` and torch's sum of the row
    (:func:`~mergekit_math.kernels.torch_order.row_sum`, rows of at most 32768) — into
    ``kl``, then the row's importances ``|m - b|·KL`` into ``hist`` with the flags of
    :func:`importance_bins`. Returns those flags, or -1 where some input is not finite
    (then nothing is complete: the caller takes torch's steps)."""
    p = np.empty(row, np.float32)
    q = np.empty(row, np.float32)
    acc = np.empty(16, np.float32)
    args = np.empty(2, np.int64)  # VMSLN_64_'s count and mode, by reference
    args[0] = row
    args[1] = MODE
    flags = np.int64(0)
    for r in range(kl.shape[0]):
        start = r * row
        rm = exponentials(m, start, row, lanes, p, 0, acc)
        rb = exponentials(base, start, row, lanes, q, 0, acc)
        if np.isnan(rm) or np.isnan(rb):
            return np.int64(-1)
        smoothed_ratio_at(p, q, 0, row, rm, rb, eps)
        call_ln(ln, args.ctypes.data, q.ctypes.data, q.ctypes.data, args.ctypes.data + 8)
        for i in range(row):
            q[i] = q[i] * p[i]
        k = row_sum(q)
        kl[r] = k
        cut = slice(start, start + row)
        flags |= np.int64(_importance_row(base[cut], m[cut], k, q, hist))
    return flags
