"""DARE's keep decisions compiled: Philox-4x64-10 and the byte comparison of
:mod:`mergekit_math.methods.masks` (mask definition version 2) in one pass per block.

numpy's Philox gives about 9 ns per 64-bit word through ``random_raw`` (a call through a
function pointer per word), and the bytes then take a conversion and two comparisons in
numpy: 1.8 ns per element per model. Here a counter's 128-bit products are two ``i128``
multiplies, a block's words go into a buffer whose bytes a vectorised loop compares with the
threshold, and the tied bytes (one in 256) are found eight at a time: the same decisions,
bit for bit (``tests/test_masks.py``).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

import mergekit_math.kernels.target  # noqa: F401 (numba's target, before any kernel)

_MUL0 = np.uint64(0xD2E7470EE14C6C93)  # Philox-4x64 multipliers (Random123)
_MUL1 = np.uint64(0xCA5A826395121157)
_BUMP0 = np.uint64(0x9E3779B97F4A7C15)  # key schedule
_BUMP1 = np.uint64(0xBB67AE8584CAA73B)
_ZERO = np.uint64(0)
_ONES = np.uint64(0x0101010101010101)
_HIGHS = np.uint64(0x8080808080808080)
_LOW32 = np.uint64(0xFFFFFFFF)
_BLOCK_BITS = 16
_BLOCK = 1 << _BLOCK_BITS  # elements per block (masks.BLOCK)
_PRIMARY = _BLOCK // 32  # counters of a block's bytes
_PER_BLOCK = _PRIMARY + 64  # and of its spare words
_CAPACITY = 512  # spare 32-bit words per block


@intrinsic
def _mulhilo(typingctx, a, b):  # noqa: ANN001, ANN202 (numba's intrinsic signature)
    """(high, low) 64 bits of the 128-bit product of two uint64."""
    sig = types.UniTuple(types.uint64, 2)(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        wide, narrow = ir.IntType(128), ir.IntType(64)
        p = builder.mul(builder.zext(args[0], wide), builder.zext(args[1], wide))
        hi = builder.trunc(builder.lshr(p, ir.Constant(wide, 64)), narrow)
        return context.make_tuple(builder, signature.return_type, (hi, builder.trunc(p, narrow)))

    return sig, codegen


@njit(inline="always")
def philox(x0, x1, x2, x3, k0, k1):  # noqa: ANN001, ANN201
    """Philox-4x64-10 of the counter (x0, x1, x2, x3) under the key (k0, k1), all uint64."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(x0, _MUL0)
        hi1, lo1 = _mulhilo(x2, _MUL1)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
        k0 = k0 + _BUMP0
        k1 = k1 + _BUMP1
    return x0, x1, x2, x3


@njit(inline="always")
def _fill(words, counter, first, last, k0, k1):  # noqa: ANN001, ANN202
    """words[4c .. 4c+3] = the words of counter ``(counter + c, 0, 0, 0)`` for c in [first,
    last)."""
    counter = np.uint64(counter)
    for c in range(first, last):
        w0, w1, w2, w3 = philox(counter + np.uint64(c), _ZERO, _ZERO, _ZERO, k0, k1)
        words[4 * c] = w0
        words[4 * c + 1] = w1
        words[4 * c + 2] = w2
        words[4 * c + 3] = w3


@njit(inline="always")
def _spare(spare, q, r, k0, k1):  # noqa: ANN001, ANN202
    """Spare word ``r`` of block ``q`` (past the block's 512: Philox at (q, r, 1, 0))."""
    if r < _CAPACITY:
        w = spare[r >> 1]
        return (w >> np.uint64(32)) if r & 1 else (w & _LOW32)
    return philox(np.uint64(q), np.uint64(r), np.uint64(1), _ZERO, k0, k1)[0] & _LOW32


@njit(inline="always")
def _below(src, b, dst):  # noqa: ANN001, ANN202
    # slices indexed from 0: a loop from a run-time offset did not vectorise (kernels.scalar._at)
    for t in range(src.shape[0]):
        dst[t] = src[t] < b


@njit(nogil=True, cache=True, error_model="numpy")
def keep_into(k0, k1, start, tb, tl, out):  # noqa: ANN001, ANN201
    """out[i] = 1 if element ``start + i`` is kept, else 0 (uint8): its byte ``b`` below
    ``tb``, or equal to it and its spare word below ``tl`` (``T = tb·2**32 + tl``, the
    threshold of :func:`~mergekit_math.methods.masks.keep_threshold`, with ``0 < T <
    2**40``). ``k0``, ``k1``: the key's low and high 64 bits (uint64)."""
    n = out.shape[0]
    words = np.empty(4 * _PRIMARY, np.uint64)
    spare = np.empty(256, np.uint64)
    data = words.view(np.uint8)  # little endian: the block's bytes in element order
    b = np.uint8(tb)
    tl = np.uint64(tl)
    pattern = _ONES * np.uint64(tb)
    i = 0
    while i < n:
        e = start + i
        q = e >> _BLOCK_BITS
        lo = e & (_BLOCK - 1)
        m = min(n - i, _BLOCK - lo)
        # a tie's spare word is numbered by the ties before it in its block: from the
        # block's start where there are ties to decide and the range starts inside it
        first = 0 if tl and lo else lo >> 5
        counter = q * _PER_BLOCK
        _fill(words, counter, first, (lo + m + 31) >> 5, k0, k1)
        _below(data[lo : lo + m], b, out[i : i + m])
        if tl:
            _fill(spare, counter + _PRIMARY, 0, 64, k0, k1)
            rank = 0
            # words holding a byte equal to tb (a zero byte of word ^ pattern), eight at a time
            for w in range(first << 2, (lo + m + 7) >> 3):
                v = words[w] ^ pattern
                if ((v - _ONES) & ~v & _HIGHS) == _ZERO:
                    continue
                for j in range(8):
                    p = 8 * w + j
                    if data[p] != b:
                        continue
                    if lo <= p < lo + m:
                        out[i + p - lo] = _spare(spare, q, rank, k0, k1) < tl
                    rank += 1
        i += m


@njit(nogil=True, cache=True, error_model="numpy")
def raw_into(k0, k1, first, out):  # noqa: ANN001, ANN201
    """out[4c .. 4c+3] = the words of counter ``(first + c, 0, 0, 0)``: what
    :func:`~mergekit_math.methods.masks.raw_numpy` returns (0.3 against 1.1 ns per element
    of a mask block)."""
    _fill(out, first, 0, out.shape[0] // 4, k0, k1)
