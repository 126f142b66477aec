"""Model Stock: interpolate the average of fine-tunes towards the base by their angle."""

from __future__ import annotations

from collections.abc import Callable
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
    return mean_cosine(
        lambda i: reduce_norm(offsets[i], dim=-1),
        lambda i, j: reduce_sum(offsets[i] * offsets[j], dim=-1),
        len(offsets),
    )


def mean_cosine(
    norm: Callable[[int], torch.Tensor], dot: Callable[[int, int], torch.Tensor], n: int
) -> torch.Tensor:
    """The mean over pairs i < j of ``dot(i, j) / (norm(i) · norm(j))``, clamped to [-1, 1]."""
    import torch

    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = norm(i) * norm(j)
            cosines.append((dot(i, j) / norms.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def stock_ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    """t = N·cosθ / (1 + (N−1)·cosθ), 0 where the denominator vanishes."""
    import torch

    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(
        singular,
        torch.zeros_like(cos),
        (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator),
    )


def model_stock(inputs: MergeInputs[ModelStockShared, ModelStockModel]) -> torch.Tensor:
    """t = N·cosθ / (1 + (N−1)·cosθ); out = t·mean(models) + (1−t)·base."""
    assert inputs.base is not None
    base, models = inputs.base, inputs.tensors
    n = len(models)
    if inputs.states is not None:  # a chunk: model_stock_prepare's ratio for the tensor
        (ratio,) = inputs.states
        return ratio * (sum(models) / n) + (1 - ratio) * base
    shape = base.shape
    if inputs.shared.filter_wise:
        if base.dim() == 1:
            base = base.unsqueeze(0)
            models = [m.unsqueeze(0) for m in models]
    else:
        base = base.reshape(-1)
        models = [m.reshape(-1) for m in models]
    ratio = stock_ratio(pairwise_cosine([m - base for m in models]), n)
    average = sum(models) / n
    return (ratio * average + (1 - ratio) * base).reshape(shape)


def _per_tensor(shared: ModelStockShared, params: list[ModelStockModel]) -> bool:
    return not shared.filter_wise


def model_stock_prepare(inputs: PrepareInputs[ModelStockShared, ModelStockModel]) -> list[Any]:
    """The tensor's interpolation ratio (one, ``filter_wise: false``)."""
    import functools

    from mergekit_math.methods import statistics

    n = len(inputs.params)
    if not statistics.compiled_sums(inputs):  # short: torch sums, as the whole path
        base = statistics.whole(inputs, None)
        offsets = [statistics.whole(inputs, j) - base for j in range(n)]
        return [stock_ratio(pairwise_cosine(offsets), n)]

    @functools.cache
    def norm(i: int) -> torch.Tensor:
        return statistics.norm(inputs, i, delta=True)

    def dot(i: int, j: int) -> torch.Tensor:
        return statistics.dot(inputs, (i, j), delta=True)

    return [stock_ratio(mean_cosine(norm, dot, n), n)]


def model_stock_fused(inputs: FusedInputs[ModelStockShared, ModelStockModel]) -> bool:
    """A chunk's ``ratio · mean(models) + (1 - ratio) · base`` as one fused kernel."""
    import numpy as np

    from mergekit_math.kernels.interp import stock

    if inputs.states is None or inputs.base is None:
        return False
    (ratio,) = inputs.states
    n = len(inputs.tensors)
    rest = np.float32((1 - ratio).item())
    models = tuple(inputs.tensors)
    stock(
        inputs.base, models, np.float32(n), np.float32(ratio.item()), rest, inputs.out, inputs.bad
    )
    return True


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
        chunking=Chunking(applies=_per_tensor, prepare=model_stock_prepare, compiled=True),
        fused=model_stock_fused,
        description="Angle-based interpolation of the fine-tunes' average towards the base.",
    )
)
