"""SLERP: spherical linear interpolation between the base and one other model."""

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


class SlerpShared(Params):
    t: float = Field(ge=0.0, le=1.0, description="0 gives the base model, 1 the other model.")


class SlerpModel(Params):
    pass


def slerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Interpolate along the great circle between the flattened tensors.

    Directions come from the normalised tensors; nearly (anti)parallel pairs
    (|cos| > ``dot_threshold``) fall back to linear interpolation.
    """
    import torch

    a = v0.reshape(-1)
    b = v1.reshape(-1)
    # t in the tensors' dtype, so 1 - t and the angles round as mergekit rounds them
    tt = torch.tensor(t, dtype=a.dtype, device=a.device)
    if a.numel() == 0:
        return ((1 - tt) * v0 + tt * v1).reshape(v0.shape)
    norm_a = reduce_norm(a)
    norm_b = reduce_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = reduce_sum((a / norm_a) * (b / norm_b)).clamp(-1, 1)
    if dot.abs() > dot_threshold:
        coef_a, coef_b = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - tt) * theta) / sin_theta
        coef_b = torch.sin(tt * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(v0.shape)


def slerp_merge(inputs: MergeInputs[SlerpShared, SlerpModel]) -> torch.Tensor:
    assert inputs.base is not None and len(inputs.tensors) == 1
    return slerp(inputs.shared.t, inputs.base, inputs.tensors[0])


register(
    MergeMethod[SlerpShared, SlerpModel](
        name="slerp",
        pretty_name="SLERP",
        paper_url="https://en.wikipedia.org/wiki/Slerp",
        merge=slerp_merge,
        shared_params=SlerpShared,
        model_params=SlerpModel,
        examples=(Example(({},), {"t": 0.3}), Example(({},), {"t": 1.0})),
        base="required",
        inputs=(1, 1),
        # equal tensors interpolate linearly: (1 - t)·x + t·x, which rounds away from x
        keeps_base=False,
        description="Spherical interpolation between base_model and one other model.",
    )
)
