"""NuSLERP: spherical interpolation of two models (or of their task vectors) by weights.

mergekit's "new" SLERP. Two differences from :mod:`~mergekit_math.methods.slerp`:

* the interpolation position comes from two per-model weights, ``t = w_2 / (w_1 + w_2)``,
  rather than a recipe-level ``t`` measured from the base;
* with a ``base_model`` it interpolates the task vectors ``x_i - base`` and adds the result
  to the base ("task-vector SLERP"); without one it interpolates the two models themselves.

For unit directions ``u_i = v_i / max(|v_i|, 1e-7)`` with ``cos θ = u_1 · u_2``:

    slerp(t; v_1, v_2) = (sin((1 - t) θ) v_1 + sin(t θ) v_2) / sin θ

applied to the unnormalised vectors (so their lengths are interpolated too), or
``(1 - t) v_1 + t v_2`` where the directions are exactly (anti)parallel (``1 - cos² θ`` at
most ``1e-16``: in float32, ``cos θ`` rounded to exactly ±1; nearly parallel vectors take the
spherical formula, which is then nearly linear). The "vectors" are the whole tensor
(``nuslerp_flatten``, the default), its rows (the last dimension), or with
``nuslerp_row_wise`` its first dimension (the columns of a matrix).

As mergekit, bit for bit, except that sums over more than 32768 elements (a flattened
tensor, long rows) accumulate in float64 so the result does not depend on the thread count.
"""

from __future__ import annotations

import math
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

# Floors used by mergekit: the norm a direction is divided by, and the colinearity test.
NORM_FLOOR = 1e-7
COLINEAR_EPS = 1e-8
# Weights summing to less than this (in absolute value) put t in the middle.
ZERO_TOTAL = 1e-6


class NuslerpShared(Params):
    nuslerp_flatten: bool = Field(
        True,
        description="Interpolate each tensor as one flat vector; false: vector by vector.",
    )
    nuslerp_row_wise: bool = Field(
        False,
        description=(
            "With nuslerp_flatten false: take the vectors along the first dimension "
            "(columns of a matrix) instead of the last (rows)."
        ),
    )


class NuslerpModel(Params):
    weight: float = Field(
        description="Relative weight of this model: t = weight_2 / (weight_1 + weight_2)."
    )


def interpolation_position(w0: float, w1: float) -> float:
    """``t = w1 / (w0 + w1)``: 0 gives the first input, 1 the second; 0.5 when the weights
    cancel out (a zero sum has no direction to prefer)."""
    total = w0 + w1
    return 0.5 if abs(total) < ZERO_TOTAL else w1 / total


def _directions(x: torch.Tensor) -> torch.Tensor:
    """Each vector along the last dimension divided by its length (at least ``1e-7``, so a
    zero vector stays zero)."""
    length = reduce_norm(x, dim=-1).unsqueeze(-1)
    return x / length.clamp(min=NORM_FLOOR)


def nuslerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    flatten: bool = True,
    row_wise: bool = False,
) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (t = 0) to ``v1`` (t = 1), vector by vector.

    The vectors are the whole tensor (``flatten``), else the slices along the last dimension,
    or along the first with ``row_wise``. Exactly (anti)parallel pairs, where ``sin θ`` is 0,
    are interpolated linearly; a zero vector has direction 0, so against any other vector
    ``θ = π/2``. The result has ``v0``'s shape.
    """
    import torch

    shape = v0.shape
    transposed = not flatten and row_wise
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif transposed:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1

    cos = _cosine(a, b)
    colinear, sin_first, sin_second, sin_theta = angle_terms(t, cos)
    # The spherical branch is computed everywhere (finite where the pair is colinear, see
    # angle_terms); torch.where keeps the linear value there.
    spherical = (sin_first * a + sin_second * b) / sin_theta
    result = torch.where(colinear, (1 - t) * a + t * b, spherical)

    if transposed:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def angle_terms(
    t: float, cos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the cosines of the pairs: where they are colinear, and ``sin((1 - t) θ)``,
    ``sin(t θ)`` and ``sin θ``. Colinear pairs get cos = 0 (θ = π/2, sin θ = 1), so their
    spherical value stays finite."""
    import torch

    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    return colinear, torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return reduce_sum(_directions(a) * _directions(b), dim=-1).unsqueeze(-1).clamp(-1, 1)


def nuslerp_merge(inputs: MergeInputs[NuslerpShared, NuslerpModel]) -> torch.Tensor:
    """SLERP of the two models, or with a base ``base + slerp(x_1 - base, x_2 - base)``."""
    if len(inputs.tensors) != 2:
        raise ValueError(f"nuslerp takes exactly 2 models, got {len(inputs.tensors)}")
    first, second = inputs.tensors
    t = interpolation_position(inputs.params[0].weight, inputs.params[1].weight)
    options = {
        "flatten": inputs.shared.nuslerp_flatten,
        "row_wise": inputs.shared.nuslerp_row_wise,
    }
    base = inputs.base
    if inputs.states is not None:  # a chunk of a flattened tensor: nuslerp_prepare's terms
        return _chunk(t, inputs.states, first, second, base)
    if base is None:
        return nuslerp(t, first, second, **options)
    return base + nuslerp(t, first - base, second - base, **options)


def _chunk(
    t: float,
    states: list[Any],
    first: torch.Tensor,
    second: torch.Tensor,
    base: torch.Tensor | None,
) -> torch.Tensor:
    colinear, sin_first, sin_second, sin_theta = states[:4]
    if base is not None:
        first, second = first - base, second - base
    if colinear.item():
        result = (1 - t) * first + t * second
    else:
        result = (sin_first * first + sin_second * second) / sin_theta
    return result if base is None else base + result


def _flattened(shared: NuslerpShared, params: list[NuslerpModel]) -> bool:
    return shared.nuslerp_flatten


def nuslerp_prepare(inputs: PrepareInputs[NuslerpShared, NuslerpModel]) -> list[Any]:
    """The flattened tensor's angle terms (:func:`angle_terms`) and whether both inputs
    are known finite (their norms were: the merge then counts no non-finite values)."""
    from mergekit_math.methods import statistics

    t = interpolation_position(inputs.params[0].weight, inputs.params[1].weight)
    delta = inputs.held is not None and inputs.held[0][0] is not None
    if not statistics.compiled_sums(inputs):  # short: torch sums, as the whole path
        first, second = statistics.whole(inputs, 0), statistics.whole(inputs, 1)
        if delta:
            base = statistics.whole(inputs, None)
            first, second = first - base, second - base
        return [*angle_terms(t, _cosine(first, second)), False]
    norms = [statistics.norm(inputs, j, delta) for j in (0, 1)]
    lengths = [n.clamp(min=NORM_FLOOR) for n in norms]
    scales = (lengths[0].item(), lengths[1].item())
    cos = statistics.dot(inputs, (0, 1), delta, scales).unsqueeze(-1).clamp(-1, 1)
    return [*angle_terms(t, cos), all(math.isfinite(n.item()) for n in norms)]


def nuslerp_fused(inputs: FusedInputs[NuslerpShared, NuslerpModel]) -> bool:
    """A chunk of a flattened tensor as one fused kernel."""
    import numpy as np

    from mergekit_math.kernels.interp import count_bad, two_way

    if inputs.states is None:
        return False
    colinear, sin_first, sin_second, sin_theta = (s.item() for s in inputs.states[:4])
    t = interpolation_position(inputs.params[0].weight, inputs.params[1].weight)
    first, second = inputs.tensors
    if inputs.base is not None:
        first, second = (inputs.base, first), (inputs.base, second)
    if not inputs.states[4]:  # else the norms said every input is finite
        arrays = ([] if inputs.base is None else [inputs.base]) + inputs.tensors
        for j, array in enumerate(arrays):
            count_bad(array, inputs.bad, j)
    if colinear:  # torch rounds a Python float factor to float32
        c1, c2, div = np.float32(1 - t), np.float32(t), np.float32(1)
    else:
        c1, c2, div = np.float32(sin_first), np.float32(sin_second), np.float32(sin_theta)
    two_way(first, second, c1, c2, div, not colinear, inputs.out)
    return True


register(
    MergeMethod[NuslerpShared, NuslerpModel](
        name="nuslerp",
        pretty_name="NuSLERP",
        paper_url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        merge=nuslerp_merge,
        shared_params=NuslerpShared,
        model_params=NuslerpModel,
        examples=(
            Example(({"weight": 0.3}, {"weight": 0.7}), base=True),
            Example(({"weight": 1.0}, {"weight": 2.0}), {"nuslerp_flatten": False}, base=False),
            Example(
                ({"weight": 0.6}, {"weight": 0.4}),
                {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                base=True,
            ),
        ),
        base="optional",
        inputs=(2, 2),
        chunking=Chunking(applies=_flattened, prepare=nuslerp_prepare, compiled=True),
        fused=nuslerp_fused,
        description=("SLERP of two models by weight; with base_model, of their task vectors."),
    )
)
