"""Whole-tensor sums for the preparation of chunked SLERP-family methods and Model Stock,
from the inputs the engine holds (:attr:`PrepareInputs.held`).

A long reduction (more than :data:`SINGLE_THREAD_REDUCTION` elements) is a float64 sum
rounded once to float32 as :func:`reduce_sum` computes it, here by the compiled passes of
:mod:`mergekit_math.kernels.stats` (per range, on the engine's worker threads, the ranges'
sums added exactly). Shorter tensors are summed by torch in float32, as the whole-tensor
path and mergekit sum them: :func:`whole` gives them as one float32 tensor.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any

from mergekit_math.methods.base import SINGLE_THREAD_REDUCTION, PrepareInputs

if TYPE_CHECKING:
    import torch


def compiled_sums(inputs: PrepareInputs[Any, Any]) -> bool:
    """Whether this tensor's reductions are long ones (summed by the compiled passes)."""
    return inputs.numel > SINGLE_THREAD_REDUCTION


def _held(inputs: PrepareInputs[Any, Any]) -> list[tuple[Any, list[Any]]]:
    if inputs.held is None:
        raise RuntimeError("compiled statistics need the inputs the engine holds")
    return inputs.held


def as_float32(array: Any) -> torch.Tensor:
    """A held array (bfloat16 bits as uint16, or float32) as a float32 tensor (a copy)."""
    import numpy as np
    import torch

    from mergekit_math.kernels.elementwise import widen_into

    out = np.empty(array.shape[0], np.float32)
    widen_into(array, out)
    return torch.from_numpy(out)


_local = threading.local()


def thread_float32(count: int, numel: int) -> list[Any]:
    """``count`` float32 numpy arrays of ``numel`` elements, this thread's, reused from call
    to call (grown when too short; kept while the thread lives): a preparation's per-range
    temporaries. Fresh ones fault in zeroed pages on every range: Arcee Fusion's widened
    inputs and softmaxes had the kernel's page clearing at 10.2% of its merge's CPU samples
    (5.9% with these). The caller must be done with them before its thread asks again."""
    import numpy as np

    buf = getattr(_local, "float32", None)
    if buf is None or buf.shape[0] < count or buf.shape[1] < numel:
        rows, cols = (0, 0) if buf is None else buf.shape
        _local.float32 = buf = np.empty((max(count, rows), max(numel, cols)), np.float32)
    return [buf[i, :numel] for i in range(count)]


def whole(inputs: PrepareInputs[Any, Any], j: int | None) -> torch.Tensor:
    """Input ``j`` (None: the base) over the whole tensor, flat, as float32."""
    import torch

    parts = [as_float32(base if j is None else others[j]) for base, others in _held(inputs)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _source(held_range: tuple[Any, list[Any]], j: int | None, delta: bool) -> Any:
    base, others = held_range
    if j is None:
        return base
    return (base, others[j]) if delta else others[j]


def rounded(total: float) -> torch.Tensor:
    """A float64 sum rounded to a float32 0-d tensor, as ``reduce_sum`` rounds it."""
    import torch

    return torch.tensor(total, dtype=torch.float64).to(torch.float32)


def root(sums: Any) -> torch.Tensor:
    """The square root of ranges' float64 sums of squares, rounded to a float32 0-d tensor
    as ``reduce_norm`` rounds it."""
    import torch

    return torch.tensor(math.sqrt(math.fsum(sums)), dtype=torch.float64).to(torch.float32)


def norm(inputs: PrepareInputs[Any, Any], j: int | None, delta: bool = False) -> torch.Tensor:
    """``reduce_norm`` of input ``j`` (of ``j - base`` with ``delta``) over the tensor."""
    from mergekit_math.kernels.stats import sum_squares

    return root(inputs.map(lambda h: sum_squares(_source(h, j, delta)), _held(inputs)))


def dot(
    inputs: PrepareInputs[Any, Any],
    pair: tuple[int | None, int | None],
    delta: bool = False,
    scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """``reduce_sum((x / sx) * (y / sy))`` of the inputs ``pair`` (None: the base; with
    ``delta`` each minus the base), each step rounded to float32 as torch rounds it."""
    import numpy as np

    from mergekit_math.kernels.stats import sum_products

    j, k = pair
    sx, sy = np.float32(scales[0]), np.float32(scales[1])

    def one(h: tuple[Any, list[Any]]) -> float:
        return sum_products(_source(h, j, delta), _source(h, k, delta), sx, sy)

    return rounded(math.fsum(inputs.map(one, _held(inputs))))


def gram(inputs: PrepareInputs[Any, Any], delta: bool = False) -> list[list[float]]:
    """``Σ x_j·x_l`` over the tensor for every pair of inputs (with ``delta`` each minus the
    base), in one compiled read of them: each product exact in float64, summed in float64."""
    import numpy as np

    from mergekit_math.kernels.stats import gram as kernel

    k = len(inputs.params)

    def one(h: tuple[Any, list[Any]]) -> Any:
        out = np.zeros((k, k))
        kernel(tuple(_source(h, j, delta) for j in range(k)), out)
        return out

    parts = inputs.map(one, _held(inputs))
    return [[math.fsum(p[j, m] for p in parts) for m in range(k)] for j in range(k)]


def gram_norms(gram: list[list[float]]) -> list[torch.Tensor]:
    """The float32 lengths of the vectors whose Gram matrix ``gram`` is (its diagonal holds
    their float64 sums of squares), rounded as :func:`norm` rounds them."""
    return [root([gram[j][j]]) for j in range(len(gram))]


def form(gram: list[list[float]], x: list[float], y: list[float] | None = None) -> float:
    """``Σ_jl x_j·y_l·G_jl`` (``y``: ``x``) over a Gram matrix ``G``, an exact sum of the
    float64 products: ⟨Σ x_j v_j, Σ y_l v_l⟩ of the vectors whose Gram matrix it is. A
    squared length (``y`` None) that rounding leaves below zero is 0."""
    k = len(gram)
    other = x if y is None else y
    total = math.fsum(x[j] * other[m] * gram[j][m] for j in range(k) for m in range(k))
    return 0.0 if y is None and total < 0 else total


def tensor_gram(rows: list[torch.Tensor]) -> list[list[float]]:
    """``Σ x_j·x_l`` of float32 tensors (each product exact in float64, summed in float64 by
    torch): :func:`gram`'s matrix on the whole-tensor path."""
    k = len(rows)
    out = [[0.0] * k for _ in range(k)]
    for j in range(k):
        wide = rows[j].reshape(-1).double()
        for m in range(j, k):
            out[j][m] = out[m][j] = float((wide * rows[m].reshape(-1).double()).sum().item())
    return out
