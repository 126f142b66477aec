"""Arcee Fusion: take a fine-tune's changes only where they stand out from the rest.

For a base tensor ``B`` and one other model's tensor ``M`` (mergekit 0.1.5's
``arcee_fusion``), with softmax and the sum over the last dimension (a 1-D tensor is one
row):

    p = softmax(M) + ε,   q = softmax(B) + ε,   ε = 1e-8
    KL_row = Σ_last p · log(p / q)                  (one value per row)
    s = |M − B| · KL_row                            (importance of each entry)
    τ = Q₂(s) + 1.5 · (Q₃(s) − Q₁(s))               (median + 1.5 · IQR: Tukey's outlier fence)
    out = B + (M − B) · [s ≥ τ]

The quantiles use mergekit's rule without interpolation: ``Q(q) = sorted(s)[⌊q · (n − 1)⌋]``
over all ``n`` entries. mergekit applies that rule to the whole tensor only up to 1,000,000
entries; above that it sorts a sample of 1,000,000 entries drawn with the global RNG
(``torch.randint``), so its result on large tensors is random. Here the rule is applied to
the whole tensor at every size, exactly and deterministically, with an exact k-th selection
instead of a sort (:func:`~mergekit_math.methods.selection.kth_largest`). Up to 1,000,000
entries the output is mergekit's, bit for bit, when rows have at most 32768 entries; longer
rows are summed in float64 (see :func:`row_kl`), so their KL may differ from mergekit's in the
last bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergekit_math.methods.base import (
    Example,
    MergeInputs,
    MergeMethod,
    Params,
    reduce_sum,
    register,
)
from mergekit_math.methods.selection import kth_largest

if TYPE_CHECKING:
    import torch

# Added to both softmaxes so the log ratio stays finite where a probability underflows to 0.
EPS = 1e-8
# The fence: entries with importance at least median + FENCE · IQR are taken from the model.
FENCE = 1.5
# (numerator, denominator) of the quartiles: Q₁, the median, Q₃.
QUARTILES = ((1, 4), (1, 2), (3, 4))


class ArceeFusionShared(Params):
    pass


class ArceeFusionModel(Params):
    pass


def row_kl(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(model) ‖ softmax(base)) over the last dimension, ε-smoothed, keeping that
    dimension (size 1) so it broadcasts over the row.

    The operations are mergekit's, in its order, so rows match it bit for bit; rows longer
    than 32768 are summed with :func:`reduce_sum` (thread-count independent)."""
    import torch

    p = torch.softmax(model, dim=-1).add_(EPS)
    q = torch.softmax(base, dim=-1).add_(EPS)
    terms = torch.div(p, q, out=q).log_().mul_(p)  # p · log(p / q), reusing q's storage
    del p
    return reduce_sum(terms, dim=-1).unsqueeze(-1)


def quartile_indices(n: int) -> list[int]:
    """0-based positions in the ascending order of ``n`` values that mergekit reads as Q₁,
    the median and Q₃: ``⌊q · (n − 1)⌋``, without interpolation.

    mergekit computes ``q · (n − 1)`` in float32 and truncates; below 2²² (and for its
    1,000,000-entry sample) that product is exact, so it equals this integer floor."""
    return [num * (n - 1) // den for num, den in QUARTILES]


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """τ = median + 1.5 · (Q₃ − Q₁) of all entries, as a 0-d tensor of their dtype.

    The i-th smallest of n values (0-based) is the (n − i)-th largest, found exactly without
    sorting; the fence is then computed in the tensor's dtype, as mergekit does."""
    import torch

    flat = importance.reshape(-1)
    n = flat.numel()
    q1, median, q3 = torch.tensor(
        [kth_largest(flat, n - i) for i in quartile_indices(n)],
        dtype=importance.dtype,
        device=importance.device,
    )
    return median + FENCE * (q3 - q1)


def arcee_fusion(inputs: MergeInputs[ArceeFusionShared, ArceeFusionModel]) -> torch.Tensor:
    """out = base + (model − base) · [importance ≥ τ] (see the module docstring)."""
    assert inputs.base is not None and len(inputs.tensors) == 1
    base, model = inputs.base, inputs.tensors[0]
    if base.numel() == 0:
        return base.clone()
    shape = base.shape
    if base.dim() == 0:  # a scalar is a row of one entry
        base, model = base.reshape(1), model.reshape(1)
    kl = row_kl(model, base)
    delta = model - base
    importance = delta.abs().mul_(kl)
    keep = importance >= fusion_threshold(importance)
    del importance
    return (base + delta.mul_(keep.to(delta.dtype))).reshape(shape)


register(
    MergeMethod[ArceeFusionShared, ArceeFusionModel](
        name="arcee_fusion",
        pretty_name="Arcee Fusion",
        paper_url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        merge=arcee_fusion,
        shared_params=ArceeFusionShared,
        model_params=ArceeFusionModel,
        examples=(Example(({},)),),
        base="required",
        inputs=(1, 1),
        description="Take one model's changes to base_model where their KL-weighted size is "
        "an outlier (above median + 1.5 IQR).",
    )
)
