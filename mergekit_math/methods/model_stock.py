"""Model Stock: interpolate the average of fine-tunes towards the base by their angle."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit_math.methods.base import (
    Example,
    MergeInputs,
    MergeMethod,
    Params,
    reduce_norm,
    reduce_sum,
    register,
)

if TYPE_CHECKING:
    import torch


class ModelStockShared(Params):
    filter_wise: bool = Field(False, description="One ratio per row instead of per tensor.")


class ModelStockModel(Params):
    pass


def pairwise_cosine(offsets: list[torch.Tensor]) -> torch.Tensor:
    """Mean cosine between every pair of offsets (over the last dimension).

    Reductions do not depend on the thread count (see :func:`reduce_sum`)."""
    import torch

    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = reduce_norm(a, dim=-1) * reduce_norm(b, dim=-1)
            dots = reduce_sum(a * b, dim=-1)
            cosines.append((dots / norms.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def model_stock(inputs: MergeInputs[ModelStockShared, ModelStockModel]) -> torch.Tensor:
    """t = N·cosθ / (1 + (N−1)·cosθ); out = t·mean(models) + (1−t)·base."""
    import torch

    assert inputs.base is not None
    base, models = inputs.base, inputs.tensors
    shape = base.shape
    if inputs.shared.filter_wise:
        if base.dim() == 1:
            base = base.unsqueeze(0)
            models = [m.unsqueeze(0) for m in models]
    else:
        base = base.reshape(-1)
        models = [m.reshape(-1) for m in models]
    cos = pairwise_cosine([m - base for m in models])
    n = len(models)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    ratio = torch.where(
        singular,
        torch.zeros_like(cos),
        (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator),
    )
    average = sum(models) / n
    return (ratio * average + (1 - ratio) * base).reshape(shape)


register(
    MergeMethod[ModelStockShared, ModelStockModel](
        name="model_stock",
        pretty_name="Model Stock",
        paper_url="https://arxiv.org/abs/2403.19522",
        merge=model_stock,
        shared_params=ModelStockShared,
        model_params=ModelStockModel,
        examples=(Example(({}, {})), Example(({}, {}), {"filter_wise": True})),
        base="required",
        inputs=(2, None),
        description="Angle-based interpolation of the fine-tunes' average towards the base.",
    )
)
