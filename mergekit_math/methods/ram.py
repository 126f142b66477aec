"""RAM: Reinforced Agent Merging (https://arxiv.org/abs/2601.13572), and its tensor-local
RAM+ variant.

With task vectors ``δ_i = model_i - base`` (i = 1..n), an entry *contributes* where
``|δ_i| > ε``; ``c`` counts the contributors at each position.

- **ram**: a position with one contributor takes its delta unchanged; a position with
  several takes their mean; ``out = base + Σ_i [|δ_i| > ε]·δ_i / max(c, 1)``. Averaging
  only over the models that changed a weight keeps a skill that one model learned alone
  from being diluted by the others' zeros.
- **ramplus_tl**: as ram, but each model's unique entries are amplified by
  ``λ_i = 1 + r·clip(ρ_i, 0, α)``, where ``ρ_i = (#i's contributing entries at shared
  positions) / max(#i's unique entries, ε)`` is counted over the whole tensor: a model whose
  changes mostly overlap the others gets its few unique ones boosted.

As mergekit 0.1.5 ``ram`` and ``ramplus_tl``. ram is elementwise and runs on chunks;
ramplus_tl needs whole-tensor counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from mergekit_math.methods.base import (
    ELEMENTWISE,
    Chunking,
    Example,
    FusedInputs,
    MergeInputs,
    MergeMethod,
    Params,
    PrepareInputs,
    register,
)

if TYPE_CHECKING:
    import torch

_PAPER = "https://arxiv.org/abs/2601.13572"


class RamShared(Params):
    epsilon: float = Field(
        1e-5, ge=0.0, description="A delta entry contributes where its magnitude exceeds this."
    )


class RamPlusShared(Params):
    # > 0: it also floors the divisor of ρ, and 0 would give 0/0 for a model with no
    # contributing entries (NaN over the whole tensor)
    epsilon: float = Field(
        1e-5,
        gt=0.0,
        description="A delta entry contributes where its magnitude exceeds this; also the "
        "floor of the unique-entry count in ρ.",
    )
    r: float = Field(0.1, ge=0.0, description="Amplification rate of a model's unique entries.")
    alpha: float = Field(0.2, ge=0.0, description="Cap of the overlap ratio ρ.")


class RamModel(Params):
    pass


def contributions(
    deltas: list[torch.Tensor], epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flattened deltas with non-contributing entries zeroed, shape ``(n, numel)``; which
    entries contribute, bool, same shape; contributors per position, int64, ``(1, numel)``)."""
    import torch

    stacked = torch.stack(deltas).reshape(len(deltas), -1)
    contributes = stacked.abs() > epsilon
    # δ·0 keeps the sign of δ on the zeros, as mergekit's product with its mask does
    kept = stacked.mul_(contributes)
    return kept, contributes, contributes.sum(dim=0, keepdim=True)


def shared_mean(kept: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Each entry's share: itself where it is alone, divided by ``c`` where ``c`` models
    contribute (an exact identity for ``c = 1``; positions without contributors hold zeros)."""
    return kept / count.clamp(min=1)


def ram_merge(inputs: MergeInputs[RamShared, RamModel]) -> torch.Tensor:
    """``base + Σ_i [|δ_i| > ε]·δ_i / max(c, 1)``."""
    base = inputs.base
    assert base is not None
    if not inputs.tensors:
        return base
    kept, _, count = contributions(inputs.tensors, inputs.shared.epsilon)
    return base + shared_mean(kept, count).sum(dim=0).reshape(base.shape)


def amplification(
    contributes: torch.Tensor, count: torch.Tensor, shared: RamPlusShared
) -> torch.Tensor:
    """``λ_i = 1 + r·clip(ρ_i, 0, α)`` per model (shape ``(n, 1)``), with
    ``ρ_i = #(i contributes, c > 1) / max(#(i contributes, c = 1), ε)``.

    The counts are integers summed over the whole tensor (exact, thread-independent); the
    ratio is then taken in float32, as in mergekit.
    """
    import torch

    overlapping = (contributes & (count > 1)).sum(dim=1).cpu().numpy()
    unique = (contributes & (count == 1)).sum(dim=1).cpu().numpy()
    return torch.from_numpy(scales_of(overlapping, unique, shared)).to(contributes.device)


def scales_of(overlapping: np.ndarray, unique: np.ndarray, shared: RamPlusShared) -> np.ndarray:
    """λ (float32, shape ``(n, 1)``) from each model's counts of overlapping and unique
    entries (int64, shape ``(n,)``), by mergekit's torch steps, ``overlapping /
    unique.clamp(min=ε)``, clipped to [0, α], times r, plus 1: each a float32 operation
    (the counts and the scalars rounded to float32 first, as torch's type promotion does),
    which numpy rounds as torch does; in numpy so that RAM+ merges without torch
    (``tests/test_method_ram.py`` compares them with torch's)."""
    f32 = np.float32
    rho = overlapping.astype(f32) / np.maximum(unique.astype(f32), f32(shared.epsilon))
    rho = np.minimum(np.maximum(rho, f32(0.0)), f32(shared.alpha))
    return (f32(1.0) + f32(shared.r) * rho).reshape(-1, 1)


def ramplus_tl_merge(inputs: MergeInputs[RamPlusShared, RamModel]) -> torch.Tensor:
    """``base + Σ_i [|δ_i| > ε]·δ_i · (λ_i if c = 1 else 1/c)``."""
    import torch

    base = inputs.base
    assert base is not None
    if not inputs.tensors:
        return base
    kept, contributes, count = contributions(inputs.tensors, inputs.shared.epsilon)
    if inputs.states is None:
        scale = amplification(contributes, count, inputs.shared)
    else:  # a chunk: ramplus_prepare's λ for the tensor (numpy)
        scale = torch.as_tensor(inputs.states[0]).to(kept.device)
    share = shared_mean(kept, count)
    share = torch.where(count == 1, share * scale, share)
    return base + share.sum(dim=0).reshape(base.shape)


def ramplus_prepare(inputs: PrepareInputs[RamPlusShared, RamModel]) -> list[Any]:
    """The tensor's λ per model (numpy), from counts over the inputs the engine holds."""
    from mergekit_math.kernels.entrywise import ram_counts

    assert inputs.held is not None
    k = len(inputs.params)
    epsilon = np.float32(inputs.shared.epsilon)

    def counts(held: tuple[Any, list[Any]]) -> tuple[Any, Any]:
        base, models = held
        overlapping, unique = np.zeros(k, np.int64), np.zeros(k, np.int64)
        if k:
            ram_counts(base, tuple(models), epsilon, overlapping, unique)
        return overlapping, unique

    parts = list(inputs.map(counts, inputs.held))
    overlapping = sum((o for o, _ in parts), np.zeros(k, np.int64))
    unique = sum((u for _, u in parts), np.zeros(k, np.int64))
    return [scales_of(overlapping, unique, inputs.shared)]


def ram_fused(inputs: FusedInputs[Any, RamModel]) -> bool:
    """RAM (no states) or a chunk of RAM+ (its λ) as one fused kernel."""
    from mergekit_math.kernels.entrywise import ram

    if inputs.base is None or not inputs.tensors:
        return False
    amplify = isinstance(inputs.shared, RamPlusShared)
    if amplify and inputs.states is None:
        return False
    k = len(inputs.tensors)
    scales = np.ones(k, np.float32)
    if amplify:
        scales = np.asarray(inputs.states[0], np.float32).reshape(-1)
    epsilon = np.float32(inputs.shared.epsilon)
    ram(inputs.base, tuple(inputs.tensors), epsilon, scales, amplify, inputs.out, inputs.bad)
    return True


register(
    MergeMethod[RamShared, RamModel](
        name="ram",
        pretty_name="Reinforced Agent Merging",
        paper_url=_PAPER,
        merge=ram_merge,
        shared_params=RamShared,
        model_params=RamModel,
        examples=(
            Example(({}, {})),
            Example(({}, {}, {}), {"epsilon": 0.02}),
        ),
        kind="delta",
        base="required",
        inputs=(1, None),
        chunking=ELEMENTWISE,
        fused=ram_fused,
        description="Keep deltas changed by one model, average those changed by several.",
    )
)

register(
    MergeMethod[RamPlusShared, RamModel](
        name="ramplus_tl",
        pretty_name="Reinforced Agent Merging Plus (Tensor-Local)",
        paper_url=_PAPER,
        merge=ramplus_tl_merge,
        shared_params=RamPlusShared,
        model_params=RamModel,
        examples=(
            Example(({}, {})),
            Example(({}, {}, {}), {"epsilon": 0.02, "r": 0.5, "alpha": 1.0}),
        ),
        kind="delta",
        base="required",
        inputs=(1, None),
        # λ from compiled counts and numpy: a merge without torch (merge.host)
        chunking=Chunking(prepare=ramplus_prepare, compiled=True, host=True),
        fused=ram_fused,
        description="RAM with each model's unique deltas amplified by its overlap ratio.",
    )
)
