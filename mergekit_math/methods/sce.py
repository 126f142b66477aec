"""SCE: Select, Calculate, Erase (FuseChat-2.0, Wan et al. 2024, https://arxiv.org/abs/2408.07990).

With task vectors ``δ_i = model_i - base`` (i = 1..n) of one tensor:

1. **Select**: keep the positions where the models disagree most — the ``select_topk``
   fraction of the positions with nonzero variance ``Var_i(δ_i)`` (population variance over
   the models), largest first — and zero every ``δ_i`` elsewhere;
2. **Calculate**: each model's coefficient is the mean of its (selected) squared entries,
   normalised to sum to 1: ``w_i = mean(δ_i²) / Σ_j mean(δ_j²)`` (uniform ``1/n`` when that
   sum is below 1e-6);
3. **Erase**: per position, elect the sign of ``Σ_i δ_i`` (TIES) and drop the entries of the
   other sign;
4. ``out = base + Σ_i w_i·m_i·δ_i / max(Σ_i w_i·m_i, 1e-6)`` with ``m_i`` the agreement mask.

As mergekit 0.1.5 ``sce``, with one deliberate difference: positions whose variance ties with
the k-th largest are kept in index order (mergekit's ``topk`` picks among ties in an
unspecified order), so the result depends neither on the device nor on the thread count.

Where the fused kernels run, a tensor merges in chunks: :func:`sce_prepare` computes its mask
and coefficients from the inputs the engine holds (compiled passes, bit-identical to the
whole path) and :func:`sce_fused` merges each chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field

from mergekit_math.kernels import torch_sums_known
from mergekit_math.methods.base import (
    Chunking,
    Example,
    FusedInputs,
    MergeInputs,
    MergeMethod,
    Params,
    PrepareInputs,
    reduce_sum,
    register,
)
from mergekit_math.methods.consensus import agreement_mask, elect_sign
from mergekit_math.methods.selection import Selection, first_ties, kth_select, tie_rules

if TYPE_CHECKING:
    import torch


class SceShared(Params):
    select_topk: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of the positions with nonzero variance across the models that is "
        "kept (largest variance first); 1 keeps every position, 0 gives the base back.",
    )
    int8_mask: bool = Field(False, description="Accepted for mergekit compatibility; no effect.")


class SceModel(Params):
    pass


# Below this sum of mean squares the coefficients fall back to uniform (as mergekit).
_WEIGHT_FLOOR = 1e-6
# Floor of the summed coefficients that divide each position (as mergekit).
_DIVISOR_FLOOR = 1e-6


def variance_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """0/1 mask (shape of one delta) of the ``k`` positions of largest variance over the
    models, ``k = int(count_nonzero(variance) · fraction)``; None when every position is kept.

    Only positions of nonzero variance count towards ``k``, so a position where all models
    agree is never selected. Positions tied with the k-th largest variance fill the remaining
    places in index order.
    """
    import torch

    if fraction >= 1:
        return None
    variance = torch.var(deltas, dim=0, unbiased=False)
    mask = torch.zeros_like(variance)
    if fraction <= 0:
        return mask
    # mergekit multiplies the int64 count by the Python float in torch, i.e. in float32:
    # k = int(90 · 0.7) is 63 there, not 62 as in float64, and the same k keeps the same positions
    k = int(torch.count_nonzero(variance) * fraction)
    if k == 0:
        return mask
    flat = variance.reshape(-1)
    selection = kth_select(flat, k)
    # 1.0 above the threshold, else 0.0: sign(v - t) ∈ {-1, 0, 1} -> {0, 0, 1}
    keep = (flat - selection.threshold).sign_().add_(1).mul_(0.5).floor_()
    ties = first_ties(flat, selection, k - selection.above)
    if ties.numel():
        keep[ties] = 1.0
    return keep.reshape(variance.shape)


def magnitude_weights(deltas: torch.Tensor) -> torch.Tensor:
    """``mean(δ_i²) / Σ_j mean(δ_j²)`` per model (shape ``(n,)``), uniform ``1/n`` when the
    denominator is below 1e-6 (all deltas about zero)."""
    n = deltas.shape[0]
    squares = deltas.square().reshape(n, -1)
    # torch's mean is the sum divided by the count; reduce_sum keeps long rows thread-free
    return _normalised(reduce_sum(squares, dim=1), squares.shape[1])


def _normalised(sums: torch.Tensor, count: int) -> torch.Tensor:
    """The coefficients from each model's float32 sum of kept squares over ``count``
    positions."""
    import torch

    n = sums.shape[0]
    means = sums / count
    total = float(torch.sum(means))
    if abs(total) < _WEIGHT_FLOOR:
        return torch.ones_like(means) / n
    return means / total


def _coefficients(sums: Any, count: int) -> Any:
    """:func:`_normalised` of numpy float32 sums, in its float32 steps (the means' sum in
    torch's order, :func:`_torch_sum`)."""
    import numpy as np

    n = sums.shape[0]
    means = sums / np.float32(count)
    total = float(_torch_sum(means))
    if abs(total) < _WEIGHT_FLOOR:
        return np.ones(n, np.float32) / np.float32(n)
    return means / np.float32(total)


def _torch_sum(row: Any) -> Any:
    """torch's float32 sum of a contiguous float32 row of up to 32768 elements: in torch's
    order by :func:`~mergekit_math.kernels.torch_order.row_sum` where that is known to be
    torch's here, else by torch."""
    if torch_sums_known():
        from mergekit_math.kernels.torch_order import row_sum

        return row_sum(row)
    import torch

    return torch.from_numpy(row).sum().numpy()


def sce_merge(inputs: MergeInputs[SceShared, SceModel]) -> torch.Tensor:
    """``base + Σ_i w_i·m_i·δ_i / max(Σ_i w_i·m_i, 1e-6)`` over the selected positions."""
    import torch

    base = inputs.base
    assert base is not None
    if not inputs.tensors:
        return base
    deltas = torch.stack(inputs.tensors)
    if inputs.states is not None:  # a chunk: sce_prepare's mask and coefficients
        (state,) = inputs.states
        keep = state.keep(inputs.offset, base.shape)
    else:
        keep = variance_mask(deltas, inputs.shared.select_topk)
    if keep is not None:
        deltas.mul_(keep)
    # the sign is elected from the raw (selected) deltas, before the coefficients apply
    agree = agreement_mask(deltas, elect_sign(deltas))
    if inputs.states is None:
        coefficients = magnitude_weights(deltas)
    else:
        coefficients = torch.as_tensor(state.weights)
    weights = coefficients.reshape((-1,) + (1,) * base.dim())
    erased = agree.mul_(weights)
    merged = (deltas * erased).sum(dim=0)
    divisor = erased.sum(dim=0).clamp_(min=_DIVISOR_FLOOR)
    return base + merged / divisor


@dataclass(frozen=True)
class SceState:
    """A tensor's selection, one uint8 keep mask per range (by its start; None: every
    position kept), and the models' coefficients (float32, shape ``(n,)``: a numpy array,
    or a tensor where torch's steps made them)."""

    masks: dict[int, Any] | None
    weights: Any
    # every input known finite (the compiled variances or sums of squares were): the
    # merge need not count non-finite values
    finite: bool = False

    def keep(self, start: int, shape: tuple[int, ...]) -> torch.Tensor | None:
        import torch

        if self.masks is None:
            return None
        return torch.from_numpy(self.masks[start]).reshape(shape).float()


def sce_prepare(inputs: PrepareInputs[SceShared, SceModel]) -> list[Any]:
    """The tensor's :class:`SceState`, by compiled passes over the held inputs: the
    variances, the exact selection of the ``k`` largest (ties in index order, per range by
    :func:`~mergekit_math.methods.selection.tie_rules`) and the sums of kept squares (torch
    on the whole tensor, as the whole path, for tensors with non-finite variances; tensors
    of up to 32768 elements by :func:`_short_state`). No torch unless a whole path runs."""
    import numpy as np

    from mergekit_math.kernels import sce as kernels
    from mergekit_math.kernels.select import BINS
    from mergekit_math.methods import statistics

    assert inputs.held is not None
    if not inputs.params:
        return [None]
    if not statistics.compiled_sums(inputs):
        return [_short_state(inputs)]
    masks, parts = None, None
    if inputs.shared.select_topk < 1:
        # each variance's top-16-bit bin: what the selection and the masks compare
        keys = inputs.buffer("sce.variance", inputs.numel, np.uint16)

        def one(job: tuple[tuple[int, int], tuple[Any, list[Any]]]) -> tuple[int, int, Any]:
            (start, end), (base, models) = job
            hist = np.zeros(BINS, np.int32)  # the selection's first pass, as they are made
            nonzero, bad = kernels.variance_into(base, tuple(models), keys[start:end], hist)
            return nonzero, bad, hist

        counts = list(inputs.map(one, zip(inputs.ranges, inputs.held)))
        if sum(bad for _, bad, _ in counts):
            return [_whole_state(inputs)]
        nonzero = sum(nonzero for nonzero, _, _ in counts)
        masks, parts = _masks(inputs, keys, nonzero, [hist for _, _, hist in counts])
        del keys

    def squares(job: tuple[tuple[int, int], tuple[Any, list[Any]]]) -> Any:
        (start, _), (base, models) = job
        out = np.zeros(len(models))
        keep = None if masks is None else masks[start]
        kernels.kept_squares(base, tuple(models), keep, out)
        return out

    if parts is None:
        parts = list(inputs.map(squares, zip(inputs.ranges, inputs.held)))
    # each float64 sum rounded once to float32, as reduce_sum rounds it
    sums = np.array([math.fsum(p[j] for p in parts) for j in range(len(parts[0]))], np.float32)
    # with masks the variances were all finite (else the whole path ran); without, the
    # squares summed every entry of every delta
    finite = masks is not None or bool(np.isfinite(sums).all())
    return [SceState(masks, _coefficients(sums, inputs.numel), finite)]


# The k-th largest variance's bin holding at most 1 in _FEW of the values, the selection's
# second pass, the masks and the sums of kept squares run as one pass (squares_above_bin)
_FEW = 20


def _masks(
    inputs: PrepareInputs[SceShared, SceModel], keys: Any, nonzero: int, hists: list[Any]
) -> tuple[dict[int, Any], list[Any] | None]:
    """Per range, the keep mask of the ``k`` largest variances (``variance_mask``'s), the
    selection's first pass done (``keys``, the variances' bins, and ``hists``, per range:
    :func:`kernels.sce.variance_into`); and per range the sums of the kept squares where
    they were made on the way (else None)."""
    import numpy as np

    from mergekit_math.kernels.select import pick

    k = _top_count(nonzero, inputs.shared.select_topk)
    if k == 0:
        return {start: np.zeros(end - start, np.uint8) for start, end in inputs.ranges}, None
    high = np.sum(hists, axis=0, dtype=np.int64)
    bin_, above = pick(high, k)
    if high[bin_] * _FEW <= high.sum():
        return _masks_and_squares(inputs, keys, hists, k, bin_, above)
    return _masks_by_rules(inputs, hists, k), None


def _masks_and_squares(
    inputs: PrepareInputs[SceShared, SceModel],
    keys: Any,
    hists: list[Any],
    k: int,
    bin_: int,
    above: int,
) -> tuple[dict[int, Any], list[Any]]:
    """:func:`_masks` where the ``k``-th largest variance lies in bin ``bin_`` (``above``
    variances in higher bins), which holds few: per range one pass makes the mask of the
    higher bins, the sums of their squares and the positions in the bin; the bin's values
    then give the threshold (their exact variances computed again), and the positions it
    keeps (ties in index order) are marked and their squares added."""
    import numpy as np

    from mergekit_math.kernels import sce as kernels
    from mergekit_math.kernels.select import kth_in_bin

    def one(job: tuple[int, tuple[tuple[int, int], tuple[Any, list[Any]]]]) -> Any:
        r, ((start, end), (base, models)) = job
        keep = np.empty(end - start, np.uint8)
        where = np.empty(int(hists[r][bin_]), np.int64)
        out = np.zeros(len(models))
        got = kernels.squares_above_bin(
            base, tuple(models), keys[start:end], np.uint16(bin_), keep, out, where
        )
        if got != where.shape[0]:
            raise RuntimeError("SCE: the variances changed between passes")
        found = np.empty(where.shape[0], np.uint32)
        kernels.variance_bits_at(base, tuple(models), where, found)
        return keep, out, where, found

    done = list(inputs.map(one, enumerate(zip(inputs.ranges, inputs.held))))
    bits, above = kth_in_bin([found for *_, found in done], k, above)
    ties = k - above  # the variances equal to the threshold kept, in index order
    parts = []
    for (keep, out, where, found), (base, models) in zip(done, inputs.held):
        tied = where[found == bits][:ties]
        ties -= tied.shape[0]
        kept = np.concatenate((where[found > bits], tied))
        keep[kept] = 1
        kernels.add_squares_at(base, tuple(models), kept, out)
        parts.append(out)
    return {start: keep for (start, _), (keep, *_) in zip(inputs.ranges, done)}, parts


def _masks_by_rules(
    inputs: PrepareInputs[SceShared, SceModel], hists: list[Any], k: int
) -> dict[int, Any]:
    """:func:`_masks` by the selection's own second pass and tie rules, over the variances
    made again as float32 values."""
    import numpy as np

    from mergekit_math.kernels import sce as kernels
    from mergekit_math.kernels.select import BINS, kth_largest_bits_from

    variance = np.empty(inputs.numel, np.float32)

    def again(job: tuple[tuple[int, int], tuple[Any, list[Any]]]) -> None:
        (start, end), (base, models) = job
        scratch = np.zeros(BINS, np.int32)  # the bins are known
        kernels.variance_into(base, tuple(models), variance[start:end], scratch)

    list(inputs.map(again, zip(inputs.ranges, inputs.held)))

    parts = [(r, variance[start:end]) for r, (start, end) in enumerate(inputs.ranges)]
    (found,) = kth_largest_bits_from(parts, hists, [k], inputs.map, len(parts))
    selection = Selection(*found)
    rules = tie_rules(inputs.ranges, selection, None, 0, k - selection.above)

    def one(span: tuple[int, int]) -> Any:
        start, end = span
        rule, part = rules[start], variance[start:end]
        mask = np.empty(end - start, np.uint8)
        kernels.keep_between(part, np.float32(rule.low), np.float32(rule.high), mask)
        for value, skip, take in rule.runs:  # the chunk keeps some of its ties, not all
            mask[np.flatnonzero(part == np.float32(value))[skip : skip + take]] = 1
        return mask

    return dict(zip((s for s, _ in inputs.ranges), inputs.map(one, inputs.ranges)))


def _top_count(nonzero: int, fraction: float) -> int:
    """``k``, as variance_mask forms it: the int64 count times the float in torch, i.e. in
    float32 (0 where the fraction is)."""
    import numpy as np

    return int(np.float32(nonzero) * np.float32(fraction)) if fraction > 0 else 0


def _short_state(inputs: PrepareInputs[SceShared, SceModel]) -> SceState:
    """The state of a tensor of up to 32768 elements (whose sums torch makes on one thread)
    by :func:`_whole_state`'s steps on numpy arrays: the compiled variances, the ``k``
    largest (ties in index order), the kept squares summed in torch's order. By torch's own
    steps where that order is not known here or some delta is not finite."""
    import numpy as np

    from mergekit_math.kernels import sce as kernels
    from mergekit_math.kernels.elementwise import delta_into
    from mergekit_math.kernels.select import BINS

    assert inputs.held is not None
    if not torch_sums_known():
        return _whole_state(inputs)
    deltas = np.empty((len(inputs.params), inputs.numel), np.float32)
    for (start, end), (base, models) in zip(inputs.ranges, inputs.held):
        for j, model in enumerate(models):
            delta_into(base, model, deltas[j, start:end])
    if not np.isfinite(deltas).all():
        return _whole_state(inputs)
    keep = None
    if inputs.shared.select_topk < 1:
        variance = np.empty(inputs.numel, np.float32)
        hist = np.zeros(BINS, np.int32)  # not used: the selection below is numpy's
        nonzero = 0
        for (start, end), (base, models) in zip(inputs.ranges, inputs.held):
            nonzero += kernels.variance_into(base, tuple(models), variance[start:end], hist)[0]
        keep = _top_variances(variance, _top_count(nonzero, inputs.shared.select_topk))
        deltas *= keep
    squares = deltas * deltas
    sums = np.array([_torch_sum(row) for row in squares], np.float32)
    if keep is None:
        return SceState(None, _coefficients(sums, inputs.numel))
    flat = keep.astype(np.uint8)
    return SceState({s: flat[s:e] for s, e in inputs.ranges}, _coefficients(sums, inputs.numel))


def _top_variances(variance: Any, k: int) -> Any:
    """variance_mask's float32 0/1 mask of the ``k`` largest of finite variances, those
    equal to the ``k``-th largest kept in index order."""
    import numpy as np

    mask = np.zeros_like(variance)
    if k == 0:
        return mask
    n = variance.shape[0]
    threshold = np.partition(variance, n - k)[n - k]
    above = variance > threshold
    mask[above] = 1
    mask[np.flatnonzero(variance == threshold)[: k - int(above.sum())]] = 1
    return mask


def _whole_state(inputs: PrepareInputs[SceShared, SceModel]) -> SceState:
    """The state by the whole-tensor torch path's own steps."""
    import torch

    from mergekit_math.methods import statistics

    base = statistics.whole(inputs, None)
    deltas = torch.stack([statistics.whole(inputs, j) - base for j in range(len(inputs.params))])
    keep = variance_mask(deltas, inputs.shared.select_topk)
    if keep is None:
        return SceState(None, magnitude_weights(deltas))
    deltas.mul_(keep)
    flat = keep.to(torch.uint8).numpy()
    return SceState({s: flat[s:e] for s, e in inputs.ranges}, magnitude_weights(deltas))


def sce_fused(inputs: FusedInputs[SceShared, SceModel]) -> bool:
    """A chunk with its tensor's mask and coefficients as one fused kernel."""
    import numpy as np

    from mergekit_math.kernels import sce as kernels

    if inputs.base is None or not inputs.tensors or inputs.states is None:
        return False
    (state,) = inputs.states
    keep = None if state.masks is None else state.masks[inputs.offset]
    weights = np.asarray(state.weights, np.float32)
    bad = None if state.finite else inputs.bad
    kernels.merge(inputs.base, tuple(inputs.tensors), keep, weights, inputs.out, bad)
    return True


def _buffers(shared: SceShared, params: list[SceModel]) -> int:
    # the variances' bins (2 bytes each) and the masks (a byte each); a tensor whose k-th
    # largest variance's bin holds many (_masks_by_rules) makes float32 values besides
    return 2 if shared.select_topk < 1 else 0


register(
    MergeMethod[SceShared, SceModel](
        name="sce",
        pretty_name="SCE",
        paper_url="https://arxiv.org/abs/2408.07990",
        merge=sce_merge,
        shared_params=SceShared,
        model_params=SceModel,
        examples=(
            Example(({}, {})),
            Example(({}, {}, {}), {"select_topk": 0.3}),
            Example(({},), {"select_topk": 0.5}),
        ),
        kind="delta",
        base="required",
        inputs=(1, None),
        # no torch where the short tensors' sums in torch's order are known (_short_state)
        chunking=Chunking(
            prepare=sce_prepare, buffers=_buffers, compiled=True, host=torch_sums_known
        ),
        fused=sce_fused,
        description="Keep high-variance positions, weight by mean squared delta, sign consensus.",
        ignored=("int8_mask",),
    )
)
