"""Linear (weighted average) merge — "Model soups", Wortsman et al. 2022."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from mergekit_math.methods.base import (
    ELEMENTWISE,
    Example,
    FusedInputs,
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
        result.add_(tensor, alpha=p.weight)  # fused multiply-add (vectorised), as mergekit
    if inputs.shared.normalize:
        result.div_(_total(inputs.params, first.dtype))
    return result


_ZERO_SUM = "linear: the weights sum to zero; set normalize: false"


def _total(params: list[LinearModel], dtype: torch.dtype) -> torch.Tensor:
    import torch

    total = torch.tensor([p.weight for p in params], dtype=dtype).sum()
    if total.abs() < 1e-8:
        raise ValueError(_ZERO_SUM)
    return total


def _total32(params: list[LinearModel]) -> Any:
    """:func:`_total` in float32 as a numpy scalar; without torch for up to four weights,
    which torch's float32 sum adds in order (tests/test_host.py checks it)."""
    import numpy as np

    if len(params) > 4:
        import torch

        return np.float32(_total(params, torch.float32).item())
    total = np.float32(params[0].weight)
    for p in params[1:]:
        total = np.float32(total + np.float32(p.weight))
    if abs(total) < np.float32(1e-8):
        raise ValueError(_ZERO_SUM)
    return total


def linear_fused(inputs: FusedInputs[LinearShared, LinearModel]) -> bool:
    """:func:`linear` as one fused kernel (float32)."""
    import numpy as np

    from mergekit_math.kernels.elementwise import linear as kernel

    if inputs.base is not None:
        return False
    weights = tuple(np.float32(p.weight) for p in inputs.params)
    div = np.float32(1.0)
    if inputs.shared.normalize:
        div = _total32(inputs.params)
    kernel(tuple(inputs.tensors), weights, div, inputs.out, inputs.bad)
    return True


register(
    MergeMethod[LinearShared, LinearModel](
        name="linear",
        pretty_name="Linear",
        paper_url="https://arxiv.org/abs/2203.05482",
        merge=linear,
        fused=linear_fused,
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
