"""Linear (weighted average) merge — "Model soups", Wortsman et al. 2022."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from mergekit_math.methods.base import MergeInputs, MergeMethod, Params, Problem, register

if TYPE_CHECKING:
    import torch


class LinearShared(Params):
    normalize: bool = Field(True, description="Divide by the sum of the weights.")


class LinearModel(Params):
    weight: float = Field(description="Coefficient of this model.")


def check_weights(shared: BaseModel, params: list[BaseModel]) -> Problem | None:
    if shared.normalize and abs(sum(p.weight for p in params)) < 1e-8:  # type: ignore[attr-defined]
        return (
            None,
            "normalize",
            "the weights sum to zero, so they cannot be normalized; set normalize: false",
        )
    return None


def linear(inputs: MergeInputs) -> torch.Tensor:
    """sum_i w_i * x_i, divided by sum_i w_i when ``normalize``."""
    import torch

    first = inputs.tensors[0]
    result = torch.zeros_like(first)
    for tensor, p in zip(inputs.tensors, inputs.params):
        result.add_(tensor, alpha=p.weight)  # type: ignore[attr-defined]
    if inputs.shared.normalize:  # type: ignore[attr-defined]
        weights = [p.weight for p in inputs.params]  # type: ignore[attr-defined]
        total = torch.tensor(weights, dtype=first.dtype).sum()
        if total.abs() < 1e-8:
            raise ValueError("linear: the weights sum to zero; set normalize: false")
        result.div_(total)
    return result


register(
    MergeMethod(
        name="linear",
        pretty_name="Linear",
        paper_url="https://arxiv.org/abs/2203.05482",
        merge=linear,
        check=check_weights,
        chunkable=lambda shared, params: True,
        shared_params=LinearShared,
        model_params=LinearModel,
        description="Weighted average of the models.",
    )
)
