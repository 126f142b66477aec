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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit_math.methods.base import (
    Example,
    MergeInputs,
    MergeMethod,
    Params,
    reduce_sum,
    register,
)
from mergekit_math.methods.consensus import agreement_mask, elect_sign
from mergekit_math.methods.selection import first_ties, kth_select

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
    import torch

    n = deltas.shape[0]
    squares = deltas.square().reshape(n, -1)
    # torch's mean is the sum divided by the count; reduce_sum keeps long rows thread-free
    means = reduce_sum(squares, dim=1) / squares.shape[1]
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
    keep = variance_mask(deltas, inputs.shared.select_topk)
    if keep is not None:
        deltas.mul_(keep)
    # the sign is elected from the raw (selected) deltas, before the coefficients apply
    agree = agreement_mask(deltas, elect_sign(deltas))
    weights = magnitude_weights(deltas).reshape((-1,) + (1,) * base.dim())
    erased = agree.mul_(weights)
    merged = (deltas * erased).sum(dim=0)
    divisor = erased.sum(dim=0).clamp_(min=_DIVISOR_FLOOR)
    return base + merged / divisor


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
        description="Keep high-variance positions, weight by mean squared delta, sign consensus.",
        ignored=("int8_mask",),
    )
)
