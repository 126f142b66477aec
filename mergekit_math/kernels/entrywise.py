"""Fused chunk kernels of the methods that decide entry by entry: NearSwap (take the other
model's entry where it lies near the base's) and RAM / RAM+ (keep a delta changed by one
model, average those changed by several). Each runs the torch path's float32 steps in its
order (``methods/nearswap.py``, ``methods/ram.py``): products, sums and quotients rounded
one at a time, comparisons with the threshold in float32, NaN through ``clamp`` kept.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_math.kernels.elementwise import _count_inputs
from mergekit_math.kernels.scalar import load, store

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@njit(error_model="numpy")
def _nearswap_loop(base, other, floor, t, out):  # noqa: ANN001, ANN202
    for i in range(out.shape[0]):
        b = load(base, i)
        o = load(other, i)
        distance = abs(b - o)
        distance = floor if distance < floor else distance  # clamp(min=): NaN stays NaN
        w = (_ONE / distance) * t
        w = _ZERO if w < _ZERO else w
        w = _ONE if w > _ONE else w
        store(out, i, w * o + (_ONE - w) * b)


@njit(nogil=True, cache=True, error_model="numpy")
def nearswap(base, other, floor, t, out, bad):  # noqa: ANN001, ANN201
    """w = clamp(t / max(|base − other|, floor), 0, 1); out = w·other + (1 − w)·base."""
    _count_inputs(base, (other,), bad)
    _nearswap_loop(base, other, floor, t, out)


@njit(error_model="numpy")
def _ram_loop(base, ms, epsilon, scales, amplify, out):  # noqa: ANN001, ANN202
    k = len(ms)
    for i in range(out.shape[0]):
        b = load(base, i)
        count = 0
        for j in range(k):
            count += abs(load(ms[j], i) - b) > epsilon
        divisor = np.float32(max(count, 1))
        total = _ZERO  # torch's sum over the models starts at +0
        for j in range(k):
            delta = load(ms[j], i) - b
            # δ·[contributes] keeps δ's sign on the zeros (and NaN for an infinite δ)
            share = (delta * (_ONE if abs(delta) > epsilon else _ZERO)) / divisor
            if amplify and count == 1:
                share = share * scales[j]
            total = total + share
        store(out, i, b + total)


@njit(nogil=True, cache=True, error_model="numpy")
def ram(base, ms, epsilon, scales, amplify, out, bad):  # noqa: ANN001, ANN201
    """base + Σ_j [|δ_j| > ε]·δ_j / max(c, 1), c the contributors at the entry; with
    ``amplify`` (RAM+) an entry with one contributor is multiplied by its model's scale."""
    _count_inputs(base, ms, bad)
    _ram_loop(base, ms, epsilon, scales, amplify, out)


_COUNT_BLOCK = 1024


@njit(error_model="numpy")
def _count_block(base, ms, start, end, epsilon, contributors, overlapping, unique):  # noqa: ANN001, ANN202
    """:func:`ram_counts` of elements ``start .. end - 1``: the contributors per element
    into ``contributors`` (uint16), then per model its entries alone and with others, as
    vectorised sums (no branch per element)."""
    m = end - start
    for i in range(m):
        contributors[i] = 0
    for j in range(len(ms)):
        x = ms[j]
        for i in range(m):
            contributors[i] += np.uint16(abs(load(x, start + i) - load(base, start + i)) > epsilon)
    for j in range(len(ms)):
        x = ms[j]
        alone = np.int32(0)
        shared = np.int32(0)
        for i in range(m):
            hit = np.int32(abs(load(x, start + i) - load(base, start + i)) > epsilon)
            one = np.int32(contributors[i] == 1)
            alone += hit & one
            shared += hit & (one ^ 1)  # a contributor with others: more than one
        unique[j] += alone
        overlapping[j] += shared


@njit(nogil=True, cache=True, error_model="numpy")
def ram_counts(base, ms, epsilon, overlapping, unique):  # noqa: ANN001, ANN201
    """Per model j, adds the entries where it contributes together with others to
    ``overlapping[j]`` and where it alone contributes to ``unique[j]`` (by blocks of
    :data:`_COUNT_BLOCK`: 1.3 ns per element against 3.1 for the branches per element;
    the contributors per element are counted in 16 bits)."""
    n = base.shape[0]
    contributors = np.empty(_COUNT_BLOCK, np.uint16)
    for start in range(0, n, _COUNT_BLOCK):
        end = min(n, start + _COUNT_BLOCK)
        _count_block(base, ms, start, end, epsilon, contributors, overlapping, unique)
