"""Linear (weighted average) merge — "Model soups", Wortsman et al. 2022."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit_math.methods.base import (
    ELEMENTWISE,
    Example,
    MergeInputs,
    MergeMethod,
    Params,
    Problem,
    register,
)

if TYPE_CHECKING:
    import torch


class LinearShared(Params):
    normalize: bool = Field(True, description="Divide by the sum of the weights.")


class LinearModel(Params):
    weight: float = Field(description="Coefficient of this model.")


def check_weights(shared: LinearShared, params: list[LinearModel]) -> Problem | None:
    if shared.normalize and abs(sum(p.weight for p in params)) < 1e-8:
        return (
            None,
            "normalize",
            "the weights sum to zero, so they cannot be normalized; set normalize: false",
        )
    return None


def linear(inputs: MergeInputs[LinearShared, LinearModel]) -> torch.Tensor:
    """sum_i w_i * x_i, divided by sum_i w_i when ``normalize``."""
    import torch

    first = inputs.tensors[0]
    result = torch.zeros_like(first)
    for tensor, p in zip(inputs.tensors, inputs.params):
        result.add_(tensor, alpha=p.weight)
    if inputs.shared.normalize:
        weights = [p.weight for p in inputs.params]
        total = torch.tensor(weights, dtype=first.dtype).sum()
        if total.abs() < 1e-8:
            raise ValueError("linear: the weights sum to zero; set normalize: false")
        result.div_(total)
    return result


register(
    MergeMethod[LinearShared, LinearModel](
        name="linear",
        pretty_name="Linear",
        paper_url="https://arxiv.org/abs/2203.05482",
        merge=linear,
        check=check_weights,
        chunking=ELEMENTWISE,
        shared_params=LinearShared,
        model_params=LinearModel,
        examples=(
            Example(({"weight": 0.4}, {"weight": 0.6}), base=False),
            Example(({"weight": 0.7}, {"weight": -0.2}), {"normalize": False}, base=False),
        ),
        description="Weighted average of the models.",
    )
)
