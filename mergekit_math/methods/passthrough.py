"""Passthrough: copy one input tensor (optionally scaled) — used for layer stacking."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit_math.methods.base import (
    ELEMENTWISE,
    Example,
    MergeInputs,
    MergeMethod,
    Params,
    register,
)

if TYPE_CHECKING:
    import torch


class PassthroughShared(Params):
    pass


class PassthroughModel(Params):
    scale: float | None = Field(None, description="Multiply the copied tensor by this.")


def passthrough(inputs: MergeInputs[PassthroughShared, PassthroughModel]) -> torch.Tensor:
    """The single input, times ``scale`` when given."""
    if len(inputs.tensors) != 1:
        raise ValueError(f"passthrough takes exactly one input, got {len(inputs.tensors)}")
    scale = inputs.params[0].scale
    tensor = inputs.tensors[0]
    return tensor if scale is None else tensor * scale


register(
    MergeMethod[PassthroughShared, PassthroughModel](
        name="passthrough",
        pretty_name="Passthrough",
        paper_url="https://github.com/arcee-ai/mergekit#passthrough",
        merge=passthrough,
        chunking=ELEMENTWISE,
        shared_params=PassthroughShared,
        model_params=PassthroughModel,
        examples=(Example(({},), base=False), Example(({"scale": 0.5},), base=False)),
        inputs=(1, 1),
        description="Copy tensors from one model per slice (layer stacking / frankenmerges).",
    )
)
