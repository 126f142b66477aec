"""torch's float32 softmax over the last dimension on the CPU, compiled, bit for bit: what
Arcee Fusion's preparation needs for mergekit's KLs without torch's passes over memory.

torch 2.13 (aten/src/ATen/native/cpu/SoftMaxKernel.cpp, ``_vec_softmax_lastdim``) computes
each row as: the row's maximum ``m``; ``e = exp(x - m)`` per element; their sum ``S`` by
``vec::reduce_all`` (the first vector of ``L`` lanes, each later whole vector added lane by
lane, the tail's elements added into the first lanes, then the lanes folded in halves:
lane ``i`` plus lane ``i ^ L/2``, then ``i ^ L/4``, ... down to ``i ^ 1``; a row shorter
than ``L`` is summed left to right); ``r = 1 / S``; the output ``e·r``. ``L`` is 16 where
torch dispatches its AVX-512 kernels, 8 with AVX2.

The exponential is SLEEF's ``expf`` (u10, the FMA variant torch calls for ``Vectorized<
float>::exp``; SLEEF is Boost-licensed): ``q = rint(d·log2(e))``, ``s = d - q·ln2`` in
two FMA steps (ln2's upper and lower parts), a degree-5 polynomial by FMA, ``1 + (s²·u +
s)``, scaled by ``2^(q>>1)`` then ``2^(q - (q>>1))`` (two rounded multiplications, which
matters for subnormal results), 0 below -104.

:func:`mergekit_math.kernels.softmax_lanes` says where this is torch's softmax (an x86-64
CPU whose capability torch would pick, a checked torch version); elsewhere the callers use
torch. tests/test_torch_softmax.py holds both lane counts to torch's bits (the AVX2 one with
``ATEN_CPU_CAPABILITY=avx2``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_math.kernels.scalar import _at, _bits_to_f32, _f32_to_bits, fma, load, nonfinite

_R_LN2 = np.float32(1.442695040888963407359924681001892137426645954152985934135449406931)
_L2U = np.float32(0.693145751953125)
_L2L = np.float32(1.428606765330187045e-06)
_C0 = np.float32(0.000198527617612853646278381)
_C1 = np.float32(0.00139304355252534151077271)
_C2 = np.float32(0.00833336077630519866943359)
_C3 = np.float32(0.0416664853692054748535156)
_C4 = np.float32(0.166666671633720397949219)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_ROUND = np.float32(12582912.0)  # 1.5·2²³: x + it - it rounds |x| < 2²² to even
_FLOOR = np.float32(-110.0)  # below -104 the result is 0: q stays in int32's range


@njit(inline="always")
def _pow2(q):  # noqa: ANN001, ANN202
    """2^q as float32 for an int32 ``q`` in the normal range."""
    return _bits_to_f32(np.uint32((q + np.int32(0x7F)) << np.int32(23)))


@njit(inline="always")
def expf(d):  # noqa: ANN001, ANN201
    """SLEEF's u10 ``expf`` with FMA for float32 ``d`` (finite, at most 100)."""
    dc = max(d, _FLOOR)
    qf = (dc * _R_LN2 + _ROUND) - _ROUND
    q = np.int32(qf)
    s = fma(qf, -_L2U, dc)
    s = fma(qf, -_L2L, s)
    u = fma(_C0, s, _C1)
    u = fma(u, s, _C2)
    u = fma(u, s, _C3)
    u = fma(u, s, _C4)
    u = fma(u, s, _HALF)
    u = _ONE + fma(s * s, u, s)
    half = q >> np.int32(1)
    u = (u * _pow2(half)) * _pow2(q - half)
    return _ZERO if d < np.float32(-104.0) else u


@njit(inline="always")
def _add_vector8(e, at, a0, a1, a2, a3, a4, a5, a6, a7):  # noqa: ANN001, ANN202
    return (
        a0 + e[_at(at)],
        a1 + e[_at(at + 1)],
        a2 + e[_at(at + 2)],
        a3 + e[_at(at + 3)],
        a4 + e[_at(at + 4)],
        a5 + e[_at(at + 5)],
        a6 + e[_at(at + 6)],
        a7 + e[_at(at + 7)],
    )


@njit(error_model="numpy")
def _lanes(e, n, lanes, acc):  # noqa: ANN001, ANN202
    """The ``lanes`` accumulators of ``e[:n]`` (n >= lanes) into ``acc``: the first vector,
    each later whole vector added lane by lane, then the tail into the first lanes. The
    accumulators are scalars (registers; an array's lanes in memory cost 6 times more)."""
    a0, a1, a2, a3, a4, a5, a6, a7 = e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]
    whole = n - n % lanes
    if lanes == 8:
        for at in range(8, whole, 8):
            a0, a1, a2, a3, a4, a5, a6, a7 = _add_vector8(e, at, a0, a1, a2, a3, a4, a5, a6, a7)
        acc[0], acc[1], acc[2], acc[3] = a0, a1, a2, a3
        acc[4], acc[5], acc[6], acc[7] = a4, a5, a6, a7
    else:
        b0, b1, b2, b3, b4, b5, b6, b7 = e[8], e[9], e[10], e[11], e[12], e[13], e[14], e[15]
        for at in range(16, whole, 16):
            a0, a1, a2, a3, a4, a5, a6, a7 = _add_vector8(e, at, a0, a1, a2, a3, a4, a5, a6, a7)
            b0, b1, b2, b3, b4, b5, b6, b7 = _add_vector8(e, at + 8, b0, b1, b2, b3, b4, b5, b6, b7)
        acc[0], acc[1], acc[2], acc[3] = a0, a1, a2, a3
        acc[4], acc[5], acc[6], acc[7] = a4, a5, a6, a7
        acc[8], acc[9], acc[10], acc[11] = b0, b1, b2, b3
        acc[12], acc[13], acc[14], acc[15] = b4, b5, b6, b7
    for lane in range(n - whole):
        acc[lane] = acc[lane] + e[_at(whole + lane)]


@njit(error_model="numpy")
def lane_sum(e, n, lanes, acc):  # noqa: ANN001, ANN201
    """torch's ``vec::reduce_all`` sum of ``e[:n]`` with vectors of ``lanes`` (8 or 16)
    floats (``acc``: a float32 scratch array of at least ``lanes``)."""
    if n < lanes:
        total = e[0]
        for i in range(1, n):
            total = total + e[i]
        return total
    _lanes(e, n, lanes, acc)
    step = lanes // 2
    while step >= 1:  # lane i plus lane i ^ step; only the lower half goes on to lane 0
        for lane in range(step):
            acc[lane] = acc[lane] + acc[lane + step]
        step //= 2
    return acc[0]


@njit(inline="always")
def _order_key(x):  # noqa: ANN001, ANN202
    """An int32 that orders finite floats as the floats (-0 just below +0): the bits, the
    lower 31 flipped where the sign is set."""
    bits = np.int32(_f32_to_bits(x))
    return bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF))


@njit(inline="always")
def _from_order_key(key):  # noqa: ANN001, ANN202
    return _bits_to_f32(np.uint32(key ^ ((key >> np.int32(31)) & np.int32(0x7FFFFFFF))))


@njit(error_model="numpy")
def exponentials(src, start, n, lanes, out, at, acc):  # noqa: ANN001, ANN201
    """Row ``start .. start+n`` of a stored array: ``exp(x - max)`` into ``out[at:at+n]``;
    returns ``1 / Σ`` (the softmax is ``out·r``), NaN where some input is not finite
    (nothing else is then meaningful). ``acc``: float32 scratch of at least ``lanes``."""
    bad = 0
    top = np.int32(-0x7FFFFFFF - 1)  # the largest value's order key (below: a float's max
    for i in range(n):  # is no vectorised reduction, 1 ns per element; an integer's is)
        x = load(src, _at(start + i))
        bad |= nonfinite(src, _at(start + i))
        out[_at(at + i)] = x
        top = max(top, _order_key(x))
    if bad:
        return np.float32(np.nan)
    peak = _from_order_key(top)
    for i in range(n):
        out[_at(at + i)] = expf(out[_at(at + i)] - peak)
    return _ONE / lane_sum(out[at : at + n], n, lanes, acc)


@njit(nogil=True, cache=True, error_model="numpy")
def softmax_rows(src, row, lanes, out):  # noqa: ANN001, ANN201
    """``torch.softmax(x.view(-1, row), dim=-1)`` of a stored array (bfloat16 bits or
    float32) into the float32 array ``out``; False where some input is not finite."""
    acc = np.empty(max(lanes, 1), np.float32)
    for start in range(0, out.shape[0], row):
        r = exponentials(src, start, row, lanes, out, start, acc)
        if np.isnan(r):
            return False
        for i in range(row):
            out[_at(start + i)] = out[_at(start + i)] * r
    return True


@njit(nogil=True, cache=True, error_model="numpy")
def smoothed_softmax_ratio(base, m, row, lanes, eps, p, q):  # noqa: ANN001, ANN201
    """Arcee Fusion's ``p = softmax(m) + ε`` into ``p`` and ``(softmax(m) + ε) /
    (softmax(base) + ε)`` into ``q`` (float32 arrays), row by row while each row is in
    cache: torch's softmaxes, then its ``add_`` and ``div``, each step rounded to float32
    as torch rounds it. False where some input is not finite."""
    acc = np.empty(max(lanes, 1), np.float32)
    for start in range(0, p.shape[0], row):
        rm = exponentials(m, start, row, lanes, p, start, acc)
        rb = exponentials(base, start, row, lanes, q, start, acc)
        if np.isnan(rm) or np.isnan(rb):
            return False
        smoothed_ratio_at(p, q, start, row, rm, rb, eps)
    return True


@njit(inline="always")
def smoothed_ratio_at(p, q, at, n, rm, rb, eps):  # noqa: ANN001, ANN201
    """From the exponentials in ``p[at:at+n]`` (the model's) and ``q`` (the base's) and
    their ``1/Σ``: ``p = softmax(m) + ε`` and ``q = p / (softmax(base) + ε)``, each step
    rounded to float32 as torch's softmax, ``add_`` and ``div`` round it."""
    for i in range(n):
        pe = p[_at(at + i)] * rm + eps
        p[_at(at + i)] = pe
        q[_at(at + i)] = pe / (q[_at(at + i)] * rb + eps)
