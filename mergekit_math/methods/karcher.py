"""Karcher mean: the Riemannian centre of mass of the models' directions on the unit sphere.

Each input tensor x_i (flattened) is split into a length r_i = ‖x_i‖ and a direction
u_i = x_i / r_i on the unit hypersphere. The Karcher (Fréchet) mean of the directions is the
point m of the sphere that minimises Σ_i α_i · d(m, u_i)², d the great-circle distance. It is
found by Riemannian gradient descent from the normalised linear mean:

    θ_i = arccos⟨m, u_i⟩                                   (angle to each direction)
    v   = Σ_i α_i · θ_i / sin θ_i · (u_i − ⟨m, u_i⟩ m)      (log map: mean tangent vector)
    m  ← cos‖v‖ · m + sin‖v‖ · v / ‖v‖                     (exp map: step along the sphere)

until ‖v‖ < tol or ``max_iter`` steps. The result is m rescaled to the mean length Σ_i α_i r_i,
so unlike a linear average it does not shrink when the models point apart.

As mergekit 0.1.5 (https://arxiv.org/abs/2603.04972), the weights are equal (α_i = 1/N over
every input, base_model included when the recipe names one), an input whose norm is at most
``tol`` takes no part in the direction (its length still counts in the scale; all of them that
small give zeros), and every branch is decided on the same scalars mergekit decides it on, so
the steps are the same ones. Dot products over more than 4096 elements are summed with
``reduce_sum`` instead of torch.dot (MKL's splits across threads), and norms with
``reduce_norm``, so that the result does not depend on the thread count; tensors of up to 4096
elements get mergekit's reductions, and its bits.

On float32 tensors of more than 32768 elements the norms and the first check of the descent
(the start's length, the cosines, the first tangent's length) come from the inputs' Gram
matrix (exact products summed in float64: one read of the inputs) by :func:`first_step`, each
scalar rounded once; where the descent stops there (the inputs close together: the normalised
linear mean is their Karcher mean to within ``tol``), the result is the start computed per
element in mergekit's float32 steps, and no iterate is held. Otherwise the descent runs as
described, on float32 elementwise terms.

Where the fused kernels run, :func:`karcher_prepare` runs the same descent as compiled passes
over the inputs the engine holds (bit-identical to :func:`karcher_mean`) and the chunks are
its result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from mergekit_math.methods import statistics
from mergekit_math.methods.base import (
    SINGLE_THREAD_REDUCTION,
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


class KarcherShared(Params):
    max_iter: int = Field(10, ge=0, description="Most gradient steps on the sphere.")
    tol: float = Field(
        1e-5,
        ge=0.0,
        allow_inf_nan=False,
        description="Stop when the mean tangent is shorter; also the smallest usable norm.",
    )


class KarcherModel(Params):
    pass


# MKL's float32 dot product splits the work across threads from 8192 elements on (measured
# with torch 2.13's MKL): up to half of that torch.dot runs as one sequential reduction, as in
# mergekit; longer dot products are summed by reduce_sum.
DOT_SINGLE_THREAD = 4096


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> of two flat tensors, as a 0-dim tensor of their dtype, thread-count independent.

    Beyond 4096 elements: one tensor of products (float32 for 16-bit inputs, whose products
    would otherwise round to 8 or 11 bits), summed by :func:`reduce_sum`."""
    import torch

    if a.numel() <= DOT_SINGLE_THREAD:
        return torch.dot(a, b)
    if a.dtype in (torch.bfloat16, torch.float16):
        return reduce_sum(a.float() * b.float()).to(a.dtype)
    return reduce_sum(a * b)


def _norm(x: torch.Tensor, accumulate: torch.dtype) -> torch.Tensor:
    """‖x‖ in the accumulation dtype (float32, or float64 for float64 tensors)."""
    return reduce_norm(x.to(accumulate))


def _weighted_sum(units: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ weights_i · units_i in the units' dtype, in order (the start before normalising)."""
    import torch

    mean = torch.zeros_like(units[0])  # summed from +0 so that -0 entries come out as +0
    for weight, unit in zip(weights, units):
        mean += weight * unit
    return mean


def _linear_start(
    units: list[torch.Tensor], weights: list[float], tol: float, accumulate: torch.dtype
) -> torch.Tensor:
    """The normalised weighted mean of the directions; the first one if they cancel out."""
    mean = _weighted_sum(units, weights)
    length = _norm(mean, accumulate)
    if length.item() < tol:
        return units[0].clone()
    return mean / length


def _tangent(
    mean: torch.Tensor, units: list[torch.Tensor], weights: list[float], tol: float
) -> torch.Tensor:
    """Σ_i α_i · θ_i / sin θ_i · (u_i − cos θ_i · m): the weighted log maps of the directions
    at ``mean`` (directions closer than ``tol`` radians contribute nothing)."""
    import torch

    flat_mean = mean.reshape(-1)
    tangent = torch.zeros_like(mean)
    for weight, unit in zip(weights, units):
        cos = _dot(flat_mean, unit.reshape(-1)).clamp(-1.0, 1.0)
        theta = torch.arccos(cos)
        if theta.item() < tol:
            continue
        tangent += weight * (theta / torch.sin(theta)) * (unit - cos * mean)
    return tangent


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    import torch

    return torch.float64 if x.dtype == torch.float64 else torch.float32


def karcher_mean(
    tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """Weighted Karcher mean of the tensors' directions, scaled to Σ_i α_i ‖x_i‖.

    ``alphas`` weigh the directions after renormalising over the usable inputs (norm above
    ``tol``) and the lengths as given. One input is returned as is.
    """
    import torch

    if len(tensors) == 1:
        return tensors[0]
    accumulate = _accumulation_dtype(tensors[0])
    gram = None
    if tensors[0].numel() > SINGLE_THREAD_REDUCTION and tensors[0].dtype == torch.float32:
        gram = statistics.tensor_gram(tensors)
        norms = statistics.gram_norms(gram)
    else:
        norms = [_norm(t, accumulate) for t in tensors]
    usable, weights = _directions(norms, alphas, tol)
    if not usable:
        # Σ x_i · 0 rather than zeros: NaN inputs stay NaN, as in mergekit.
        zeros = torch.zeros_like(tensors[0])
        for t in tensors:
            zeros += t * 0
        return zeros
    units = [tensors[i] / norms[i] for i in usable]
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))

    div = None if gram is None else first_step(gram, norms, usable, weights, max_iter, tol)
    if div is not None:  # the descent stops at its first check: the normalised start
        return scale * (_weighted_sum(units, weights) / div)
    mean = _linear_start(units, weights, tol, accumulate)
    for _ in range(max_iter):
        tangent = _tangent(mean, units, weights, tol)
        step = _norm(tangent, accumulate)
        if step.item() < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        # back onto the sphere (rounding drifts it off)
        length = _norm(mean, accumulate)
        if length.item() > tol:
            mean = mean / length
    return scale * mean


def _directions(
    norms: list[torch.Tensor], alphas: list[float], tol: float
) -> tuple[list[int], list[float]]:
    """The inputs that take part in the direction (norm above ``tol``) and their weights:
    ``alphas`` renormalised over them."""
    usable = [i for i, r in enumerate(norms) if r.item() > tol]
    total = sum(alphas[i] for i in usable)
    return usable, [alphas[i] / total for i in usable]


def first_step(
    gram: list[list[float]],
    norms: list[torch.Tensor],
    usable: list[int],
    weights: list[float],
    max_iter: int,
    tol: float,
) -> torch.Tensor | None:
    """The start's float32 length where the descent of a long tensor stops at its first
    check (no step, or a first tangent shorter than ``tol``), else None (the descent runs).

    From the inputs' Gram matrix ``G``, with ``r_j`` the float32 norms and ``w_j`` the float32
    weights: the start ``M = Σ c_j x_j`` (``c_j = w_j / r_j``) has ``|M|² = Σ c_j c_l G_jl``;
    ``cos_j = Σ_l c_l G_jl / (r_j |M|)`` (float32, clamped), ``θ_j`` and the factors ``f_j =
    w_j θ_j / sin θ_j`` in torch's float32 steps, as :func:`_tangent`; the tangent ``T =
    Σ_active f_j (u_j − cos_j M/|M|) = Σ_l d_l x_l`` has ``|T|² = Σ d_j d_l G_jl``. Exact
    sums, each rounded once, where the elementwise path sums float32 terms."""
    import torch

    if not usable:
        return None
    g = [[gram[a][b] for b in usable] for a in usable]
    r = [float(norms[a].item()) for a in usable]
    w = [float(np.float32(x)) for x in weights]
    k = len(usable)
    c = [w[a] / r[a] for a in range(k)]
    div = statistics.root([statistics.form(g, c)])
    length = float(div.item())
    if not length >= tol:  # the start is the first direction: the descent decides
        return None
    if max_iter == 0:
        return div
    cos = [
        statistics.rounded(math.fsum(c[b] * g[a][b] for b in range(k)) / r[a] / length)
        for a in range(k)
    ]
    cos = [x.clamp(-1.0, 1.0) for x in cos]
    thetas = [torch.arccos(x) for x in cos]
    f = [
        0.0 if t.item() < tol else float((weights[a] * (t / torch.sin(t))).item())
        for a, t in enumerate(thetas)
    ]
    pull = math.fsum(f[a] * float(cos[a].item()) for a in range(k))
    d = [f[b] / r[b] - pull * c[b] / length for b in range(k)]
    step = statistics.root([statistics.form(g, d)])
    return div if step.item() < tol else None


def karcher(inputs: MergeInputs[KarcherShared, KarcherModel]) -> torch.Tensor:
    """Equal-weight Karcher mean of every input (α_i = 1/N)."""
    import torch

    tensors = inputs.tensors
    n = len(tensors)
    if n == 1:
        return tensors[0]
    if inputs.states is not None:  # a chunk of karcher_prepare's result
        (state,) = inputs.states
        if state.mean is None:  # the normalised start, from the chunk's inputs
            units = [tensors[i] / torch.tensor(r) for i, r in zip(state.usable, state.norms)]
            mean = _weighted_sum(units, [float(w) for w in state.weights])
            return state.scale * (mean / state.div)
        start, size = inputs.offset, tensors[0].numel()
        mean = torch.from_numpy(state.mean[start : start + size]).view(tensors[0].shape)
        return state.scale * (mean / state.div)
    shared = inputs.shared
    return karcher_mean(tensors, [1.0 / n] * n, max_iter=shared.max_iter, tol=shared.tol)


@dataclass(frozen=True)
class KarcherState:
    """A tensor's result as ``scale · (mean / div)``: ``mean`` flat float32 (numpy), or None
    where the descent stopped at the start (computed per chunk from the inputs); ``div`` and
    ``scale`` float32 0-d tensors (the last step's normalisation and the mean length)."""

    mean: Any
    div: torch.Tensor
    scale: torch.Tensor
    finite: bool = False  # every input known finite (their norms were): nothing to count
    # mean None: the normalised start Σ weights·(x_i / norms) over the usable inputs i
    usable: tuple[int, ...] = ()
    norms: Any = None  # float32 (numpy), one per usable input
    weights: Any = None  # float32 (numpy)


def karcher_prepare(inputs: PrepareInputs[KarcherShared, KarcherModel]) -> list[Any]:
    """The tensor's :class:`KarcherState`: the gradient descent by compiled passes over the
    held inputs (:mod:`mergekit_math.kernels.karcher`), deciding each branch on the same
    scalars as :func:`karcher_mean`; tensors of up to 32768 elements (torch's float32
    reductions) and inputs too short to use go through :func:`karcher_mean` itself."""
    import torch

    n = len(inputs.params)
    if n == 1:
        return [None]
    one = torch.tensor(1.0)
    shared = inputs.shared
    norms = gram = None
    if statistics.compiled_sums(inputs):
        gram = statistics.gram(inputs)
        norms = statistics.gram_norms(gram)
    if gram is None or norms is None or not any(r.item() > shared.tol for r in norms):
        tensors = [statistics.whole(inputs, j) for j in range(n)]
        mean = karcher_mean(tensors, [1.0 / n] * n, shared.max_iter, shared.tol)
        return [KarcherState(mean.numpy(), one, one, _finite(norms))]
    alphas = [1.0 / n] * n
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    usable, weights = _directions(norms, alphas, shared.tol)
    div = first_step(gram, norms, usable, weights, shared.max_iter, shared.tol)
    r = np.array([norms[i].item() for i in usable], np.float32)
    if div is not None:
        w = np.array(weights, np.float32)
        return [KarcherState(None, div, scale, _finite(norms), tuple(usable), r, w)]
    mean, div = _descend(inputs, usable, r, weights)
    return [KarcherState(mean, div, scale, _finite(norms))]


def _finite(norms: list[torch.Tensor] | None) -> bool:
    """Whether every input is finite, from their norms (an input with NaN or inf has a
    non-finite norm; so may a finite one too large for float32, then counted anyway)."""
    return norms is not None and all(math.isfinite(r.item()) for r in norms)


@dataclass
class _Descent:
    """The compiled descent's arrays: the usable inputs per range, their float32 norms and
    weights, the iterate and the tangent (flat float32)."""

    jobs: list[tuple[tuple[int, int], tuple[Any, ...]]]
    norms: Any
    weights: Any
    mean: Any
    tangent: Any

    def start(self, job: Any) -> float:
        (a, b), xs = job
        return _compiled().start_into(xs, self.norms, self.weights, self.mean[a:b])

    def first(self, job: Any) -> None:
        (a, b), xs = job
        _compiled().first_into(xs[0], self.norms[0], self.mean[a:b])

    def dots(self, job: Any, div: Any) -> Any:
        (a, b), xs = job
        out = np.zeros(len(xs))
        _compiled().dots(xs, self.norms, self.mean[a:b], div, out)
        return out

    def tangents(self, job: Any, cos: Any, f: Any, active: Any) -> float:
        (a, b), xs = job
        m, t = self.mean[a:b], self.tangent[a:b]
        return _compiled().tangent(xs, self.norms, m, cos, f, active, t)

    def step(self, job: Any, c: Any, s: Any, by: Any) -> float:
        (a, b), _ = job
        return _compiled().step(self.mean[a:b], self.tangent[a:b], c, s, by)


def _compiled() -> Any:
    """The compiled passes (numba loads only when a merge runs them)."""
    from mergekit_math.kernels import karcher as compiled

    return compiled


def _descend(
    inputs: PrepareInputs[KarcherShared, KarcherModel],
    usable: list[int],
    norms: Any,
    weights: list[float],
) -> tuple[Any, torch.Tensor]:
    """:func:`karcher_mean`'s iterate (flat float32, and the division still owed to it), from
    the usable inputs, their float32 norms (numpy) and their weights."""
    import torch

    tol, held, run = inputs.shared.tol, inputs.held, inputs.map
    assert held is not None
    d = _Descent(
        jobs=list(zip(inputs.ranges, [tuple(h[1][i] for i in usable) for h in held])),
        norms=norms,
        weights=np.array(weights, np.float32),
        mean=inputs.buffer("karcher.mean", inputs.numel, np.float32),
        tangent=inputs.buffer("karcher.tangent", inputs.numel, np.float32),
    )
    # the unnormalised start and its length in one pass; the first dots pass divides by it
    # (the same float32 quotient as _linear_start's mean / length)
    div = statistics.root(run(d.start, d.jobs))
    if div.item() < tol:
        list(run(d.first, d.jobs))
        div = torch.tensor(1.0)
    for _ in range(inputs.shared.max_iter):
        parts = list(run(partial(d.dots, div=np.float32(div.item())), d.jobs))
        div = torch.tensor(1.0)  # applied to the iterate by that pass
        cos = [statistics.rounded(math.fsum(p[j] for p in parts)) for j in range(len(usable))]
        cos = [c.clamp(-1.0, 1.0) for c in cos]
        thetas = [torch.arccos(c) for c in cos]
        active = np.array([not t.item() < tol for t in thetas], np.uint8)
        f = np.array([(w * (t / torch.sin(t))).item() for w, t in zip(weights, thetas)])
        c32 = np.array([c.item() for c in cos], np.float32)
        tangents = partial(d.tangents, cos=c32, f=f.astype(np.float32), active=active)
        step = statistics.root(run(tangents, d.jobs))
        if step.item() < tol:
            break
        c, s, by = (np.float32(v.item()) for v in (torch.cos(step), torch.sin(step), step))
        norm = statistics.root(run(partial(d.step, c=c, s=s, by=by), d.jobs))
        if norm.item() > tol:
            div = norm
    return d.mean, div


def karcher_fused(inputs: FusedInputs[KarcherShared, KarcherModel]) -> bool:
    """A chunk of the prepared result, rounded to the output dtype."""
    import numpy as np

    from mergekit_math.kernels.karcher import result, start

    if inputs.states is None or inputs.states[0] is None:
        return False
    (state,) = inputs.states
    size = inputs.out.shape[0]
    div, scale = np.float32(state.div.item()), np.float32(state.scale.item())
    bad = None if state.finite else inputs.bad
    if state.mean is None:
        xs = tuple(inputs.tensors[i] for i in state.usable)
        start(xs, state.norms, state.weights, div, scale, tuple(inputs.tensors), inputs.out, bad)
        return True
    mean = state.mean[inputs.offset : inputs.offset + size]
    result(tuple(inputs.tensors), mean, div, scale, inputs.out, bad)
    return True


register(
    MergeMethod[KarcherShared, KarcherModel](
        name="karcher",
        pretty_name="Karcher Mean",
        paper_url="https://arxiv.org/abs/2603.04972",
        merge=karcher,
        shared_params=KarcherShared,
        model_params=KarcherModel,
        examples=(
            Example(({}, {}), base=False),
            Example(({}, {}, {}), {"max_iter": 3, "tol": 1e-4}, base=False),
        ),
        kind="tensors",
        base="none",
        inputs=(1, None),
        # the iterate and the tangent held as float32 while the passes run
        chunking=Chunking(prepare=karcher_prepare, buffers=lambda s, p: 2, compiled=True),
        fused=karcher_fused,
        description="Mean direction on the unit sphere (Riemannian), rescaled to the mean norm.",
        # N equal inputs come back within a few ulps, not bit for bit (1/N weights round).
        keeps_base=False,
    )
)
