"""NearSwap: take the other model's value where it is already close to the base's.

For base b and other model x, entry by entry:

    w   = clamp(t / max(|b − x|, 1e-6), 0, 1)
    out = w · x + (1 − w) · b

Entries that differ by at most ``t`` are swapped to the other model outright (w = 1); farther
apart the other model's share falls as t / |b − x|, so large disagreements keep the base. t = 0
gives the base. Introduced with QuartetAnemoi-70B
(https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001); the arithmetic is mergekit
0.1.5's, down to the order of operations (torch evaluates ``t / d`` as ``d⁻¹ · t``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit_math.methods.base import (
    ELEMENTWISE,
    Example,
    FusedInputs,
    MergeInputs,
    MergeMethod,
    Params,
    register,
)

if TYPE_CHECKING:
    import torch


class NearswapShared(Params):
    t: float = Field(
        ge=0.0,
        allow_inf_nan=False,
        description="Distance below which the other model's value is taken outright.",
    )


class NearswapModel(Params):
    pass


# Distances are floored here so that equal entries give w = 1 (for t > 0) instead of t / 0.
MIN_DISTANCE = 1e-6


def nearswap_weight(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """w = clamp(t / max(|base − other|, 1e-6), 0, 1), the other model's share per entry."""
    distance = (base - other).abs().clamp(min=MIN_DISTANCE)
    # reciprocal then product: what torch runs for a scalar divided by a tensor (same bits as
    # mergekit, which writes the division)
    return (distance.reciprocal() * t).clamp(min=0, max=1)


def nearswap(inputs: MergeInputs[NearswapShared, NearswapModel]) -> torch.Tensor:
    """w · other + (1 − w) · base, entry by entry."""
    base = inputs.base
    if base is None or len(inputs.tensors) != 1:
        raise ValueError("nearswap takes a base and exactly one other model")
    other = inputs.tensors[0]
    weight = nearswap_weight(base, other, inputs.shared.t)
    return weight * other + (1 - weight) * base


def nearswap_fused(inputs: FusedInputs[NearswapShared, NearswapModel]) -> bool:
    """:func:`nearswap` as one fused kernel."""
    import numpy as np

    from mergekit_math.kernels import entrywise

    if inputs.base is None or len(inputs.tensors) != 1:
        return False
    floor, t = np.float32(MIN_DISTANCE), np.float32(inputs.shared.t)
    entrywise.nearswap(inputs.base, inputs.tensors[0], floor, t, inputs.out, inputs.bad)
    return True


register(
    MergeMethod[NearswapShared, NearswapModel](
        name="nearswap",
        pretty_name="NearSwap",
        paper_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        merge=nearswap,
        shared_params=NearswapShared,
        model_params=NearswapModel,
        examples=(Example(({},), {"t": 0.05}), Example(({},), {"t": 0.0001})),
        kind="tensors",
        base="required",
        inputs=(1, 1),
        chunking=ELEMENTWISE,
        fused=nearswap_fused,
        description="Take the other model's entries where they lie within t of the base's.",
        # For t < 1e-6, w·b + (1 − w)·b rounds away from b in some entries.
        keeps_base=False,
    )
)
