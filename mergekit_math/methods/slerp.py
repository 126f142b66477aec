"""SLERP: spherical linear interpolation between the base and one other model."""

from __future__ import annotations

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

# Cosines beyond this (in absolute value) interpolate linearly; norms up to EPS count as 1.
DOT_THRESHOLD = 0.9995
EPS = 1e-8


class SlerpShared(Params):
    t: float = Field(ge=0.0, le=1.0, description="0 gives the base model, 1 the other model.")


class SlerpModel(Params):
    pass


def slerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    dot_threshold: float = DOT_THRESHOLD,
    eps: float = EPS,
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
    norm_a = _floor(reduce_norm(a), eps)
    norm_b = _floor(reduce_norm(b), eps)
    dot = reduce_sum((a / norm_a) * (b / norm_b)).clamp(-1, 1)
    coef_a, coef_b = coefficients(tt, dot, dot_threshold)
    return (coef_a * a + coef_b * b).reshape(v0.shape)


def _floor(norm: torch.Tensor, eps: float) -> torch.Tensor:
    """A norm of at most ``eps`` counts as 1 (the tensor is used as it is)."""
    import torch

    return torch.where(norm > eps, norm, 1)


def coefficients(
    tt: torch.Tensor, dot: torch.Tensor, dot_threshold: float = DOT_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of the two tensors for the cosine ``dot`` of their directions."""
    import torch

    if dot.abs() > dot_threshold:
        return 1 - tt, tt
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - tt) * theta) / sin_theta, torch.sin(tt * theta) / sin_theta


def slerp_merge(inputs: MergeInputs[SlerpShared, SlerpModel]) -> torch.Tensor:
    assert inputs.base is not None and len(inputs.tensors) == 1
    if inputs.states is None:
        return slerp(inputs.shared.t, inputs.base, inputs.tensors[0])
    coef_a, coef_b = inputs.states  # a chunk: the tensor's weights, from slerp_prepare
    return coef_a * inputs.base + coef_b * inputs.tensors[0]


def slerp_prepare(inputs: PrepareInputs[SlerpShared, SlerpModel]) -> list[Any]:
    """The two weights of the tensor (``slerp``'s, from its norms and angle)."""
    import torch

    from mergekit_math.methods import statistics

    tt = torch.tensor(inputs.shared.t, dtype=torch.float32)
    if not statistics.compiled_sums(inputs):  # short: torch sums, as the whole path
        a, b = statistics.whole(inputs, None), statistics.whole(inputs, 0)
        norm_a, norm_b = _floor(reduce_norm(a), EPS), _floor(reduce_norm(b), EPS)
        dot = reduce_sum((a / norm_a) * (b / norm_b)).clamp(-1, 1)
    else:
        norm_a = _floor(statistics.norm(inputs, None), EPS)
        norm_b = _floor(statistics.norm(inputs, 0), EPS)
        scales = (norm_a.item(), norm_b.item())
        dot = statistics.dot(inputs, (None, 0), scales=scales).clamp(-1, 1)
    return list(coefficients(tt, dot))


def slerp_fused(inputs: FusedInputs[SlerpShared, SlerpModel]) -> bool:
    """The chunk's ``coef_a * base + coef_b * model`` as one fused kernel."""
    import numpy as np

    from mergekit_math.kernels.interp import pair

    if inputs.states is None or inputs.base is None:
        return False
    coef_a, coef_b = (np.float32(c.item()) for c in inputs.states)
    pair(inputs.base, inputs.tensors[0], coef_a, coef_b, inputs.out, inputs.bad)
    return True


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
        chunking=Chunking(prepare=slerp_prepare, compiled=True),
        fused=slerp_fused,
        # equal tensors interpolate linearly: (1 - t)·x + t·x, which rounds away from x
        keeps_base=False,
        description="Spherical interpolation between base_model and one other model.",
    )
)
