"""The fused chunk kernels: linear and the task-arithmetic family (sum or TIES consensus of
weighted deltas, each trimmed by a magnitude threshold or dropped by a random keep mask).

Each computes, per element and in float32, exactly the steps of the torch path in
``methods/linear.py`` and ``methods/task_arithmetic.py``, in the same order (products and
sums rounded one at a time, no fused multiply-add), and writes the output dtype. The inputs
of one kernel call (``xs``/``ms``) are a tuple of arrays of one stored dtype, so numba
unrolls the loop over them and vectorises the loop over elements. The finite check counts
come from a read-only pass per input first (``bad[j]``).

TIES trims keep the entries above the chunk's threshold and, where the chunk keeps some of
the entries equal to it but not all, the ones chosen in index order (``MagnitudeTrim``'s
rules), marked in a selection array by :func:`mark_ties`. Breadcrumbs windows keep the
entries strictly between two thresholds and the marked ones (``RankWindow``), zeroing the
rest as ``torch.where`` does (NaN and -0.0 become +0.0).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from mergekit_math.kernels.scalar import (
    any_nonfinite,
    fma,
    load,
    nonfinite,
    sign_bit_one,
    step,
    store,
)

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@njit(error_model="numpy")
def _count_bad(xs, bad):  # noqa: ANN001, ANN202
    """Adds input j's count of NaN and inf to ``bad[j]`` (None: the inputs are known
    finite, nothing is read; numba prunes the branch); only an input where
    :func:`~mergekit_math.kernels.scalar.any_nonfinite` finds some is counted."""
    if bad is None:
        return
    for j in range(len(xs)):
        x = xs[j]
        if not any_nonfinite(x):
            continue
        count = 0
        for i in range(x.shape[0]):
            count += nonfinite(x, i)
        bad[j] += count


@njit(error_model="numpy")
def _count_inputs(base, ms, bad):  # noqa: ANN001, ANN202
    """:func:`_count_bad` of a base (``bad[0]``) and its models (``bad[1:]``)."""
    if bad is not None:
        _count_bad((base,), bad[:1])
        _count_bad(ms, bad[1:])


@njit(error_model="numpy")
def _linear_loop(xs, ws, div, out):  # noqa: ANN001, ANN202
    for i in range(out.shape[0]):
        acc = _ZERO
        for j in range(len(xs)):
            acc = fma(load(xs[j], i), ws[j], acc)
        store(out, i, acc / div)


@njit(nogil=True, cache=True, error_model="numpy")
def linear(xs, ws, div, out, bad):  # noqa: ANN001, ANN201
    """out = (Σ_j x_j·w_j) / div (div 1 without normalize), each product added with one
    rounding: torch's vectorised ``add_(x, alpha=w)`` (and mergekit's ``addcmul_``) fuse
    it, their scalar loop for the last few elements of a tensor does not, so the torch path
    can differ from this in those by one float32 ulp."""
    _count_bad(xs, bad)
    _linear_loop(xs, ws, div, out)


def kept(ms, j, i, b, thr, hi, sel, scale):  # noqa: ANN001, ANN201
    """Input j's delta at element i after its trim, window or keep mask (numba only), chosen
    by the argument types, so that each variant compiles to a loop without branches:

    - ``hi``, ``sel`` and ``scale`` None: trim, kept if its magnitude is above ``thr[j]``
      (-inf keeps everything);
    - ``hi`` and ``scale`` None: trim, also kept where ``sel[j, i]`` marks one of the ties
      chosen;
    - ``hi`` and ``sel`` arrays: window, kept if its magnitude lies strictly between
      ``thr[j]`` and ``hi[j]`` or ``sel[j, i]`` marks it, else +0.0 (``sel`` None: nothing
      marked);
    - ``sel`` and ``scale`` arrays: keep mask ``sel[j, i]``, the kept entry divided by
      ``scale[j]`` (DARE);
    - ``sel`` an array and ``scale`` a 1-tuple of an array: keep mask ``sel[j, i]``, the
      kept entry multiplied by ``scale[0][j]`` (DELLA's L1 factor).
    """
    raise NotImplementedError


@overload(kept, inline="always")
def _kept(ms, j, i, b, thr, hi, sel, scale):  # noqa: ANN001, ANN202
    if not isinstance(hi, types.NoneType) and isinstance(sel, types.NoneType):

        def window_only(ms, j, i, b, thr, hi, sel, scale):  # noqa: ANN001, ANN202
            d = load(ms[j], i) - b
            m = abs(d)
            return d if (m > thr[j]) & (m < hi[j]) else _ZERO

        return window_only
    if not isinstance(hi, types.NoneType):

        def window(ms, j, i, b, thr, hi, sel, scale):  # noqa: ANN001, ANN202
            d = load(ms[j], i) - b
            m = abs(d)
            return d if ((m > thr[j]) & (m < hi[j])) | (sel[j, i] != 0) else _ZERO

        return window
    if isinstance(scale, types.NoneType) and isinstance(sel, types.NoneType):

        def trim(ms, j, i, b, thr, hi, sel, scale):  # noqa: ANN001, ANN202
            d = load(ms[j], i) - b
            return d * (_ONE if abs(d) > thr[j] else _ZERO)

        return trim
    if isinstance(scale, types.NoneType):

        def trim_ties(ms, j, i, b, thr, hi, sel, scale):  # noqa: ANN001, ANN202
            d = load(ms[j], i) - b
            return d * (_ONE if (abs(d) > thr[j]) | (sel[j, i] != 0) else _ZERO)

        return trim_ties

    if isinstance(scale, types.BaseTuple):

        def mask_times(ms, j, i, b, thr, hi, sel, scale):  # noqa: ANN001, ANN202
            d = load(ms[j], i) - b
            return (d * np.float32(sel[j, i])) * scale[0][j]

        return mask_times

    def mask(ms, j, i, b, thr, hi, sel, scale):  # noqa: ANN001, ANN202
        d = load(ms[j], i) - b
        return (d * np.float32(sel[j, i])) / scale[j]

    return mask


@njit(error_model="numpy")
def _sum_loop(base, ms, thr, hi, sel, scale, ws, div, lam, out):  # noqa: ANN001, ANN202
    for i in range(out.shape[0]):
        b = load(base, i)
        acc = _ZERO
        for j in range(len(ms)):
            acc = acc + kept(ms, j, i, b, thr, hi, sel, scale) * ws[j]
        store(out, i, b + (acc / div) * lam)


@njit(error_model="numpy")
def _ties_loop(base, ms, thr, hi, sel, scale, ws, normalize, lam, out):  # noqa: ANN001, ANN202
    for i in range(out.shape[0]):
        b = load(base, i)
        total = _ZERO
        for j in range(len(ms)):
            total = total + kept(ms, j, i, b, thr, hi, sel, scale) * ws[j]
        elected = sign_bit_one(total)
        mixed = _ZERO
        weight = _ZERO
        for j in range(len(ms)):
            s = kept(ms, j, i, b, thr, hi, sel, scale) * ws[j]
            agree = step(s * elected)
            mixed = mixed + s * agree
            weight = weight + ws[j] * agree
        if normalize:
            mixed = mixed / (weight + (_ZERO if abs(weight) > 0 else _ONE))  # zero_to_one
        store(out, i, b + mixed * lam)


# The loops are functions of their own, and the variants of ``kept`` differ by argument
# types, not by flags: written inside the entry points, or with run-time branches in the
# loop, LLVM did not vectorise them (20-60 ns per element instead of 0.4-1).


@njit(nogil=True, cache=True, error_model="numpy")
def widen_into(src, out):  # noqa: ANN001, ANN201
    """out = a stored array (bfloat16 bits or float32) as float32: exact, vectorised (0.15
    against torch's 0.54 ns per element for bfloat16 on one thread)."""
    for i in range(out.shape[0]):
        out[i] = load(src, i)


@njit(nogil=True, cache=True, error_model="numpy")
def delta_into(base, m, out):  # noqa: ANN001, ANN201
    """out = m - base in float32 (a whole delta assembled for a TIES threshold)."""
    for i in range(out.shape[0]):
        out[i] = load(m, i) - load(base, i)


@njit(nogil=True, cache=True, error_model="numpy")
def magnitude_into(base, m, out):  # noqa: ANN001, ANN201
    """out = |m - base| in float32 (a whole magnitude for a TIES or Breadcrumbs threshold).
    The radix selection's first histogram is a pass of its own: counted here as well, the
    loop no longer vectorised and cost more than the two (1.05 ns per element vs 0.3 + 0.6)."""
    for i in range(out.shape[0]):
        out[i] = abs(load(m, i) - load(base, i))


_BLOCK = 512


@njit(error_model="numpy")
def _count_ties(base, m, value):  # noqa: ANN001, ANN202
    count = 0
    for i in range(m.shape[0]):
        count += abs(load(m, i) - load(base, i)) == value
    return count


@njit(error_model="numpy")
def _mark_all(base, m, value, sel):  # noqa: ANN001, ANN202
    for i in range(m.shape[0]):
        sel[i] |= abs(load(m, i) - load(base, i)) == value


@njit(nogil=True, cache=True, error_model="numpy")
def mark_ties(base, m, value, skip, take, sel):  # noqa: ANN001, ANN201
    """Mark in ``sel`` (uint8) the entries whose magnitude |m - base| equals ``value``,
    numbered ``skip .. skip + take - 1`` in index order among those equal to it.

    By blocks: a block's ties are counted (or all marked) in a vectorised loop, and only
    the blocks where the run begins or ends go element by element (a running count per
    element is a chain through the whole loop: 2-2.7 ns per element instead of about 0.3).
    The block loops get slices: indexed from a run-time start, LLVM did not vectorise them."""
    stop = skip + take
    seen = 0
    n = sel.shape[0]
    for start in range(0, n, _BLOCK):
        if seen >= stop:
            break
        end = min(n, start + _BLOCK)
        b, x, marks = base[start:end], m[start:end], sel[start:end]
        count = _count_ties(b, x, value)
        if seen + count <= skip:
            seen += count
        elif seen >= skip and seen + count <= stop:
            _mark_all(b, x, value, marks)
            seen += count
        else:
            for i in range(end - start):
                tied = abs(load(x, i) - load(b, i)) == value
                marks[i] |= tied & (seen >= skip) & (seen < stop)
                seen += tied


@njit(nogil=True, cache=True, error_model="numpy")
def delta_sum(base, ms, thr, hi, sel, scale, ws, div, lam, out, bad):  # noqa: ANN001, ANN201
    """out = base + ((Σ_j kept_j·w_j) / div)·λ (see :func:`_kept`); ``bad``: base first,
    then the models (None: the inputs are known finite, nothing counted)."""
    _count_inputs(base, ms, bad)
    _sum_loop(base, ms, thr, hi, sel, scale, ws, div, lam, out)


@njit(nogil=True, cache=True, error_model="numpy")
def delta_ties(base, ms, thr, hi, sel, scale, ws, normalize, lam, out, bad):  # noqa: ANN001, ANN201
    """TIES: the elected sign of Σ kept_j·w_j, the agreeing entries summed (divided by their
    weights' sum with ``normalize``), times λ, plus the base (``bad``: see
    :func:`delta_sum`)."""
    _count_inputs(base, ms, bad)
    _ties_loop(base, ms, thr, hi, sel, scale, ws, normalize, lam, out)
