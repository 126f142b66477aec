"""Drawing denoisers and data sources, and the domain-upsampling phase schedule.

Every random choice of example ``i`` comes from a generator seeded with ``(seed, stream, i)``,
so the examples of a step do not depend on what happened before it: a resumed run draws the
same denoisers and sources as an uninterrupted one without saving any sampler state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Independent generator streams per purpose.
TRAIN_STREAM = 0
EVAL_STREAM = 1


def example_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator for example ``index`` of ``stream``."""
    return np.random.default_rng([seed, stream, index])


class MixtureSampler:
    """Draws an index with probability proportional to ``weights`` (inverse CDF)."""

    def __init__(self, weights: Sequence[float]):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or (w < 0).any() or not w.sum() > 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
        self.weights = w / w.sum()
        self._cdf = np.cumsum(self.weights)
        self._cdf[-1] = 1.0

    def draw(self, rng: np.random.Generator) -> int:
        """One index."""
        return int(np.searchsorted(self._cdf, rng.random(), side="right"))


def final_phase_start(steps: int, final_fraction: float) -> int:
    """First step (0-based) of the final phase: the last ``round(steps·f)`` steps, at least one
    step in each phase when ``steps >= 2``."""
    final = min(max(round(steps * final_fraction), 1), max(steps - 1, 1))
    return steps - final


class SourceSchedule:
    """Which data source each example uses: base weights, then final weights from
    :func:`final_phase_start` on. One source and no upsampling: always source 0."""

    def __init__(
        self,
        weights: Sequence[float],
        final_weights: Sequence[float] | None = None,
        steps: int = 1,
        final_fraction: float | None = None,
    ):
        self.base = MixtureSampler(weights)
        self.final = MixtureSampler(final_weights) if final_weights is not None else None
        self.switch = (
            final_phase_start(steps, final_fraction)
            if self.final is not None and final_fraction is not None
            else math.inf
        )

    def phase(self, step: int) -> str:
        """``base`` or ``final``."""
        return "final" if step >= self.switch else "base"

    def sampler(self, step: int) -> MixtureSampler:
        """The sampler used at ``step``."""
        return self.final if self.final is not None and step >= self.switch else self.base
