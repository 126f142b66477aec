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
    coefficients = magnitude_weights(deltas) if inputs.states is None else state.weights
    weights = coefficients.reshape((-1,) + (1,) * base.dim())
    erased = agree.mul_(weights)
    merged = (deltas * erased).sum(dim=0)
    divisor = erased.sum(dim=0).clamp_(min=_DIVISOR_FLOOR)
    return base + merged / divisor


@dataclass(frozen=True)
class SceState:
    """A tensor's selection, one uint8 keep mask per range (by its start; None: every
    position kept), and the models' coefficients (float32, shape ``(n,)``)."""

    masks: dict[int, Any] | None
    weights: torch.Tensor
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
    on the whole tensor, as the whole path, for tensors of up to 32768 elements or with
    non-finite variances)."""
    import numpy as np
    import torch

    from mergekit_math.kernels import sce as kernels
    from mergekit_math.kernels.select import BINS
    from mergekit_math.methods import statistics

    assert inputs.held is not None
    if not inputs.params:
        return [None]
    if not statistics.compiled_sums(inputs):
        return [_whole_state(inputs)]
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
    sums = [statistics.rounded(math.fsum(p[j] for p in parts)) for j in range(len(parts[0]))]
    # with masks the variances were all finite (else the whole path ran); without, the
    # squares summed every entry of every delta
    finite = masks is not None or all(math.isfinite(s.item()) for s in sums)
    return [SceState(masks, _normalised(torch.stack(sums), inputs.numel), finite)]


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
    import torch

    from mergekit_math.kernels.select import pick

    fraction = inputs.shared.select_topk
    # as variance_mask: the int64 count times the float, in torch (float32)
    k = int(torch.tensor(nonzero) * fraction) if fraction > 0 else 0
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
    from mergekit_math.kernels import sce as kernels

    if inputs.base is None or not inputs.tensors or inputs.states is None:
        return False
    (state,) = inputs.states
    keep = None if state.masks is None else state.masks[inputs.offset]
    weights = state.weights.numpy()
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
        chunking=Chunking(prepare=sce_prepare, buffers=_buffers, compiled=True),
        fused=sce_fused,
        description="Keep high-variance positions, weight by mean squared delta, sign consensus.",
        ignored=("int8_mask",),
    )
)
