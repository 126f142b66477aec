"""Consensus kernels any method may import: TIES sign election and the agreement mask.

Written with float arithmetic only: on the CPU, comparisons, ``where`` and bool-to-float
casts cost several times more per element than multiplying, so the masks are 0/1 floats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """TIES: the sign (±1) of the summed weighted deltas, +1 where the sum is +0.

    (A sum of -0 only arises when every entry is ±0, which agrees with no sign.)
    """
    import torch

    total = weighted.sum(dim=0)
    return torch.copysign(torch.ones_like(total), total)


def agreement_mask(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """1.0 for entries whose sign equals the elected sign, else 0.0 (zeros never agree)."""
    # sign(w·s) ∈ {-1, 0, 1} -> (x + 1) / 2 rounded down ∈ {0, 0, 1}, always +0 for no
    return (weighted * sign).sign_().add_(1).mul_(0.5).floor_()


def zero_to_one(divisor: torch.Tensor) -> torch.Tensor:
    """``divisor`` with its zeros replaced by 1 (in place): d + (1 - sign|d|)."""
    return divisor.add_(divisor.abs().sign_().neg_().add_(1))
