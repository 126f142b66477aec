"""Multi-SLERP: a weighted spherical average of any number of models (or task vectors).

Charles Goddard's barycentric interpolation on the hypersphere
(https://goddard.blog/posts/multislerp-wow-what-a-cool-idea). Each input ``v_i`` (the
model, or ``model - base`` with a ``base_model``) is flattened; with weights ``w_i``
(divided by their sum unless ``normalize_weights: false``):

    u_i = v_i / (|v_i| + eps)                      directions on the unit sphere
    m   = Σ w_i u_i / |Σ w_i u_i|                  their normalised weighted mean
    τ   = Σ w_i (u_i - (u_i · m) m)                weighted mean in the tangent plane at m
    out = (m cos|τ| + τ sin|τ| / |τ|) · Σ w_i |v_i|   back to the sphere (exponential map),
                                                    scaled to the weighted mean length

with ``|τ|`` meaning ``|τ| + eps``; the base is added back to ``out``. One input is returned
as it is.

As mergekit, bit for bit, except that sums over more than 32768 elements accumulate in
float64 (the result does not depend on the thread count), and that inputs all equal to the
base give the base where mergekit raises (three or more inputs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit_math.methods.base import (
    Example,
    MergeInputs,
    MergeMethod,
    Params,
    Problem,
    reduce_norm,
    reduce_sum,
    register,
)

if TYPE_CHECKING:
    import torch

# The weights may not sum to (nearly) zero when they are normalised.
ZERO_TOTAL = 1e-8


class MultislerpShared(Params):
    normalize_weights: bool = Field(True, description="Divide the weights by their sum.")
    eps: float = Field(
        1e-8, gt=0.0, description="Added to the lengths divided by (numerical safety)."
    )


class MultislerpModel(Params):
    weight: float = Field(description="Weight of this model in the spherical average.")


def check_weights(shared: MultislerpShared, params: list[MultislerpModel]) -> Problem | None:
    """Refuse, before any tensor is read, weights that leave no mean direction."""
    if len(params) < 2:
        return None  # one input is returned as it is: its weight plays no part
    weights = [p.weight for p in params]
    if shared.normalize_weights and abs(sum(weights)) < ZERO_TOTAL:
        return (
            None,
            "normalize_weights",
            "the weights sum to zero, so they cannot be normalized; "
            "set normalize_weights: false or change the weights",
        )
    if len(params) > 2 and all(w == 0 for w in weights):
        return (0, "weight", "every weight is zero: the weighted mean has no direction")
    return None


def _linear(deltas: torch.Tensor, weights: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """``Σ w_i v_i`` (+ base): the fallback where the mean direction vanishes."""
    result = deltas[0] * weights[0]
    for delta, w in zip(deltas[1:], weights[1:]):
        result = result + delta * w
    return result if base is None else result + base


def multislerp(inputs: MergeInputs[MultislerpShared, MultislerpModel]) -> torch.Tensor:
    """The spherical weighted average of the inputs (of ``input - base`` with a base).

    Where the weighted mean of the directions is shorter than ``eps``: all inputs zero
    (every model equal to the base) gives the base (mergekit raises for three or more);
    two inputs fall back to the linear combination (as mergekit); otherwise antipodal
    inputs cancel out and a ValueError names the problem (as mergekit).
    """
    import torch

    tensors, base, eps = inputs.tensors, inputs.base, inputs.shared.eps
    if len(tensors) == 1:
        return tensors[0]

    shape = tensors[0].shape
    stacked = torch.stack(tensors)
    if base is not None:
        stacked -= base
    flat = stacked.reshape(len(tensors), -1)
    weights = torch.tensor([p.weight for p in inputs.params], dtype=flat.dtype)
    if inputs.shared.normalize_weights:
        weights = weights / weights.sum()
    column = weights.view(-1, 1)

    lengths = reduce_norm(flat, dim=-1).unsqueeze(-1)
    units = flat / (lengths + eps)
    mean = (units * column).sum(0)  # a sum over the inputs: few terms, no thread split
    mean_length = reduce_norm(mean)
    if mean_length < eps:
        if len(tensors) == 2 or not lengths.any():
            return _linear(stacked, weights, base)
        raise ValueError(
            "multislerp: the weighted directions cancel out (antipodal inputs with "
            "balancing weights, e.g. a and -a equally weighted); change the weights"
        )
    mean = mean / mean_length

    # Log map at the mean (first order): each direction minus its component along the mean.
    along = reduce_sum(units * mean, dim=-1).unsqueeze(-1)
    tangent = ((units - along * mean) * column).sum(0)
    # Exponential map back onto the sphere, then to the weighted mean length.
    angle = reduce_norm(tangent) + eps
    result = mean * torch.cos(angle) + tangent * (torch.sin(angle) / angle)
    result = result * (lengths.squeeze(-1) * weights).sum()
    result = result.view(shape)
    return result if base is None else result + base


register(
    MergeMethod[MultislerpShared, MultislerpModel](
        name="multislerp",
        pretty_name="Multi-SLERP",
        paper_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        merge=multislerp,
        check=check_weights,
        shared_params=MultislerpShared,
        model_params=MultislerpModel,
        examples=(
            Example(({"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}), base=True),
            Example(({"weight": 1.0}, {"weight": 2.0}), base=False),
            Example(
                ({"weight": 0.7}, {"weight": 0.6}),
                {"normalize_weights": False, "eps": 1e-6},
                base=True,
            ),
        ),
        base="optional",
        inputs=(1, None),
        description=(
            "Weighted spherical average of any number of models; with base_model, of "
            "their task vectors."
        ),
    )
)
