"""Scalar building blocks the kernels inline: reading stored elements as float32, writing
the output dtype, and the float32 steps of the torch ops the kernels replace.

Stored dtypes are told apart by the array's numba type: ``uint16`` arrays hold bfloat16
bits, ``float32`` arrays floats. Rounding to bfloat16 is round-to-nearest-even as torch's
(NaN becomes a quiet NaN).
"""

from __future__ import annotations

import warnings

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import intrinsic, overload

import mergekit_math.kernels.target  # noqa: F401 (numba's target, before any kernel)

# numba's own pedantic check of its inliner ("variable ... is not in scope") fires on the
# selects of inlined helpers; the compiled code is right (tests/test_kernels.py), so users
# are not shown it the one time a kernel compiles.
warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning)

_EXP32 = np.uint32(0x7F800000)
_EXP16 = np.uint16(0x7F80)
_MAGNITUDE16 = np.uint16(0x7FFF)
_MAGNITUDE32 = np.uint32(0x7FFFFFFF)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@intrinsic
def _bits_to_f32(typingctx, x):  # noqa: ANN001, ANN202 (numba's intrinsic signature)
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_bits(typingctx, x):  # noqa: ANN001, ANN202
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def fma(typingctx, a, b, c):  # noqa: ANN001, ANN201
    """a·b + c rounded once (llvm.fma: one instruction where the CPU has FMA)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        f32 = ir.FloatType()
        fnty = ir.FunctionType(f32, [f32, f32, f32])
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], fnty)
        return builder.call(fn, args)

    return sig, codegen


@njit(inline="always")
def _at(i):  # noqa: ANN001, ANN202
    """An element index as unsigned: numba wraps a signed index that may be negative
    (``a[-1]``), a select per access that keeps LLVM from vectorising any loop whose index
    it cannot prove non-negative (one starting at a block's offset): 1.2 against 0.1 ns per
    bfloat16 load. The kernels' indices are never negative."""
    return np.uint64(i)


def load(a, i):  # noqa: ANN001, ANN201
    """Element ``i`` of a stored array as float32 (numba only)."""
    raise NotImplementedError


def nonfinite(a, i):  # noqa: ANN001, ANN201
    """1 if element ``i`` of a stored array is NaN or inf, else 0 (numba only)."""
    raise NotImplementedError


def any_nonfinite(a):  # noqa: ANN001, ANN201
    """Whether some element of a stored array is NaN or inf (numba only): one pass keeping
    the largest bits without the sign, in the array's own width (0.03 ns per bfloat16
    element in cache, against 0.11 for a count of them, whose 64-bit sums widen every
    lane)."""
    raise NotImplementedError


def store(out, i, x):  # noqa: ANN001, ANN201
    """Write float32 ``x`` into element ``i`` of the output array, rounded to its dtype."""
    raise NotImplementedError


@overload(load, inline="always")
def _load(a, i):  # noqa: ANN001, ANN202
    if a.dtype == types.uint16:
        return lambda a, i: _bits_to_f32(np.uint32(a[_at(i)]) << np.uint32(16))
    if a.dtype == types.float32:
        return lambda a, i: a[_at(i)]
    return None


@overload(nonfinite, inline="always")
def _nonfinite(a, i):  # noqa: ANN001, ANN202
    if a.dtype == types.uint16:
        return lambda a, i: np.int64((a[_at(i)] & _EXP16) == _EXP16)
    if a.dtype == types.float32:
        return lambda a, i: np.int64((_f32_to_bits(a[_at(i)]) & _EXP32) == _EXP32)
    return None


@overload(any_nonfinite, inline="always")
def _any_nonfinite(a):  # noqa: ANN001, ANN202
    if a.dtype == types.uint16:

        def top16(a):  # noqa: ANN001, ANN202
            top = np.uint16(0)
            for i in range(a.shape[0]):
                top = max(top, np.uint16(a[_at(i)] & _MAGNITUDE16))
            return top >= _EXP16

        return top16
    if a.dtype == types.float32:

        def top32(a):  # noqa: ANN001, ANN202
            top = np.uint32(0)
            for i in range(a.shape[0]):
                top = max(top, _f32_to_bits(a[_at(i)]) & _MAGNITUDE32)
            return top >= _EXP32

        return top32
    return None


@njit(inline="always")
def to_bf16(x):  # noqa: ANN001, ANN201
    u = _f32_to_bits(x)
    rounded = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> 16)
    return np.uint16(0x7FC0) if x != x else rounded


@overload(store, inline="always")
def _store(out, i, x):  # noqa: ANN001, ANN202
    if out.dtype == types.uint16:

        def write_bf16(out, i, x):  # noqa: ANN001, ANN202
            out[_at(i)] = to_bf16(x)

        return write_bf16
    if out.dtype == types.float32:

        def write_f32(out, i, x):  # noqa: ANN001, ANN202
            out[_at(i)] = x

        return write_f32
    return None


@njit(inline="always")
def step(x):  # noqa: ANN001, ANN201
    """floor((sign(x) + 1) * 0.5) as consensus.py computes it: 1 where x > 0, +0 where
    x <= 0, NaN for NaN."""
    r = _ONE if x > 0 else _ZERO
    return r if x == x else x


@njit(inline="always")
def sign_bit_one(x):  # noqa: ANN001, ANN201
    """copysign(1, x): -1 where x's sign bit is set (-0 included), else 1."""
    return -_ONE if _f32_to_bits(x) >> np.uint32(31) else _ONE
