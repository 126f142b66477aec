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

As mergekit, bit for bit, on tensors of up to 32768 elements, except that inputs all equal
to the base give the base where mergekit raises (three or more inputs). On longer tensors the
whole-tensor scalars (the lengths, the mean's length, each direction's component along the
mean, the tangent's length) come from the inputs' Gram matrix ``G_jl = Σ v_j·v_l`` (exact
products summed in float64: one read of the inputs) and are rounded once to float32, where
mergekit sums float32 elementwise terms in float32 (and the result then depends on torch's
thread count); each element of the result is then computed in mergekit's float32 steps. In
exact arithmetic the tangent ``τ`` is zero (``Σ w_i (u_i·m) = |Σ w_i u_i|``): its length here
is what the rounded scalars leave of it, not the elements' rounding noise mergekit sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field

from mergekit_math.methods.base import (
    SINGLE_THREAD_REDUCTION,
    Chunking,
    Example,
    FusedInputs,
    MergeInputs,
    MergeMethod,
    Params,
    PrepareInputs,
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
    weights = _weights(inputs, flat.dtype)
    if inputs.states is not None:  # a chunk: multislerp_prepare's terms for the tensor
        (terms,) = inputs.states
    else:
        terms = sphere_terms(flat, weights, eps)
    if terms is None:
        return _linear(stacked, weights, base)
    result = _spherical(flat, weights, eps, terms).view(shape)
    return result if base is None else result + base


def _weights(inputs: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weights (divided by their sum with ``normalize_weights``), in ``dtype``
    (float32 by default)."""
    import torch

    weights = torch.tensor([p.weight for p in inputs.params], dtype=dtype or torch.float32)
    if inputs.shared.normalize_weights:
        weights = weights / weights.sum()
    return weights


@dataclass(frozen=True)
class Sphere:
    """A tensor's whole-tensor terms: the inputs' lengths ``(n, 1)``, the weighted mean
    direction's length, each direction's component along it ``(n, 1)``, and the angle."""

    lengths: torch.Tensor
    mean_length: torch.Tensor
    along: torch.Tensor
    angle: torch.Tensor
    finite: bool = False  # every input known finite (their lengths were): nothing to count


def sphere_terms(flat: torch.Tensor, weights: torch.Tensor, eps: float) -> Sphere | None:
    """The terms of the flattened inputs ``(n, numel)``; None where the mean direction
    vanishes and the inputs are combined linearly (a ValueError where they cancel out).
    Long float32 tensors: from their Gram matrix (:func:`gram_terms`)."""
    import torch

    from mergekit_math.methods import statistics

    if flat.shape[-1] > SINGLE_THREAD_REDUCTION and flat.dtype != torch.float64:
        return gram_terms(statistics.tensor_gram(list(flat)), weights, eps)
    column = weights.view(-1, 1)
    lengths = reduce_norm(flat, dim=-1).unsqueeze(-1)
    units = flat / (lengths + eps)
    mean = (units * column).sum(0)  # a sum over the inputs: few terms, no thread split
    mean_length = reduce_norm(mean)
    if _vanishes(mean_length, lengths, eps):
        return None
    mean = mean / mean_length
    # Log map at the mean (first order): each direction minus its component along the mean.
    along = reduce_sum(units * mean, dim=-1).unsqueeze(-1)
    tangent = ((units - along * mean) * column).sum(0)
    return Sphere(lengths, mean_length, along, reduce_norm(tangent) + eps)


def gram_terms(gram: Any, weights: torch.Tensor, eps: float) -> Sphere | None:
    """A long tensor's terms from its inputs' Gram matrix ``gram[j][l] = Σ v_j·v_l``
    (float64): with ``c_j = w_j / (|v_j| + eps)``, the mean ``m = Σ c_j v_j`` has
    ``|m|² = Σ c_j c_l G_jl``, direction ``j`` the component ``a_j = Σ_l c_l G_jl /
    ((|v_j| + eps)·|m|)`` along it, and the tangent ``Σ w_j (u_j − a_j m̂) = m (1 − Σ w_j a_j
    / |m|)``; each scalar is rounded to float32 where the whole path rounds its sum, and the
    next one computed from the rounded values (the float32 |m| and a_j the chunks use)."""
    import math

    import torch

    from mergekit_math.methods import statistics

    k = len(gram)
    lengths = torch.stack(statistics.gram_norms(gram)).unsqueeze(-1)
    den = [float(d) for d in (lengths + eps).reshape(-1).tolist()]
    w = [float(x) for x in weights.tolist()]
    c = [w[j] / den[j] for j in range(k)]
    squares = statistics.form(gram, c)
    mean_length = statistics.root([squares])
    if _vanishes(mean_length, lengths, eps):
        return None
    length = float(mean_length.item())
    along = torch.stack(
        [
            statistics.rounded(math.fsum(c[m] * gram[j][m] for m in range(k)) / den[j] / length)
            for j in range(k)
        ]
    ).unsqueeze(-1)
    left = 1.0 - math.fsum(w[j] * float(along[j].item()) for j in range(k)) / length
    tangent = statistics.rounded(math.sqrt(squares) * abs(left))
    finite = bool(torch.isfinite(lengths).all())
    return Sphere(lengths, mean_length, along, tangent + eps, finite)


def _vanishes(mean_length: torch.Tensor, lengths: torch.Tensor, eps: float) -> bool:
    if mean_length >= eps:
        return False
    if lengths.shape[0] == 2 or not lengths.any():
        return True
    raise ValueError(
        "multislerp: the weighted directions cancel out (antipodal inputs with "
        "balancing weights, e.g. a and -a equally weighted); change the weights"
    )


def _spherical(
    flat: torch.Tensor, weights: torch.Tensor, eps: float, terms: Sphere
) -> torch.Tensor:
    """The exponential map back onto the sphere at the mean, scaled to the mean length."""
    import torch

    column = weights.view(-1, 1)
    units = flat / (terms.lengths + eps)
    mean = (units * column).sum(0) / terms.mean_length
    tangent = ((units - terms.along * mean) * column).sum(0)
    angle = terms.angle
    result = mean * torch.cos(angle) + tangent * (torch.sin(angle) / angle)
    return result * (terms.lengths.squeeze(-1) * weights).sum()


def multislerp_prepare(inputs: PrepareInputs[MultislerpShared, MultislerpModel]) -> list[Any]:
    """The tensor's :class:`Sphere` (None: linear): from the Gram matrix of the held inputs
    (one compiled pass, :func:`gram_terms`), or torch's float32 sums as the whole path for
    tensors of up to 32768 elements."""
    import torch

    from mergekit_math.methods import statistics

    k, eps = len(inputs.params), inputs.shared.eps
    delta = inputs.held is not None and inputs.held[0][0] is not None
    if k == 1:
        return [None]
    weights = _weights(inputs)
    if not statistics.compiled_sums(inputs):
        flat = torch.stack([statistics.whole(inputs, j) for j in range(k)])
        if delta:
            flat -= statistics.whole(inputs, None)
        return [sphere_terms(flat, weights, eps)]
    return [gram_terms(statistics.gram(inputs, delta), weights, eps)]


def multislerp_fused(inputs: FusedInputs[MultislerpShared, MultislerpModel]) -> bool:
    """A chunk with its tensor's terms as one fused kernel."""
    import numpy as np
    import torch

    from mergekit_math.kernels import spherical
    from mergekit_math.kernels.interp import count_bad

    if inputs.states is None or len(inputs.tensors) < 2:
        return False
    (terms,) = inputs.states
    base, models = inputs.base, inputs.tensors
    xs = tuple(models) if base is None else tuple((base, m) for m in models)
    if terms is None or not terms.finite:
        for j, array in enumerate(([] if base is None else [base]) + models):
            count_bad(array, inputs.bad, j)
    weights = _weights(inputs)
    ws = weights.numpy()
    if terms is None:
        spherical.weighted(xs, ws, inputs.out)
        return True
    eps = inputs.shared.eps
    den = (terms.lengths + eps).reshape(-1).numpy()
    along = terms.along.reshape(-1).numpy()
    angle = terms.angle
    cos = np.float32(torch.cos(angle).item())
    sinc = np.float32((torch.sin(angle) / angle).item())
    scale = np.float32((terms.lengths.squeeze(-1) * weights).sum().item())
    length = np.float32(terms.mean_length.item())
    spherical.chunk(xs, den, ws, length, along, cos, sinc, scale, inputs.out)
    return True


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
        chunking=Chunking(prepare=multislerp_prepare, compiled=True),
        fused=multislerp_fused,
        description=(
            "Weighted spherical average of any number of models; with base_model, of "
            "their task vectors."
        ),
    )
)
