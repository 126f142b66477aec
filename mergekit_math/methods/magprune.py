"""DELLA's MagPrune on chunks: each tensor's keep decisions (and its L1 rescale factor) are
computed once, from the inputs the engine holds, by compiled passes over ranges of whole
rows that start on mask blocks; the chunks then apply them.

The decisions are :func:`~mergekit_math.methods.sparsify.della_drop`'s: an entry's keep
probability comes from its rank in its row, its draw from the tensor's mask stream at its
flat index (``MaskStream.keep_with`` on a range that starts a block gives the whole
tensor's decisions there); :func:`~mergekit_math.kernels.ranks.della_decisions` makes them
and the range's L1 sums in one compiled call. The L1 norms before and after the drop are
float64 sums rounded once to float32 at every length, as the whole path's
(:func:`~mergekit_math.methods.sparsify.della_l1`), so nothing here needs torch: a DELLA
merge runs on numpy arrays (``Chunking.host``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergekit_math.methods.base import PrepareInputs
from mergekit_math.methods.masks import BLOCK
from mergekit_math.methods.sparsify import l1_factor

if TYPE_CHECKING:
    import numpy as np
    import torch

    from mergekit_math.methods.masks import MaskStream


def row_length(shape: tuple[int, ...]) -> int:
    """The length of the rows DELLA ranks in (the whole tensor for a vector)."""
    return math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)


def della_unit(shape: tuple[int, ...]) -> int:
    """Chunks of whole rows that start on a mask block: multiples of lcm(row, 65536)."""
    return math.lcm(max(row_length(shape), 1), BLOCK)


@dataclass(frozen=True)
class DellaKeep:
    """One input's keep decisions over a tensor, one bool array per range (by its start),
    and the L1 factor (float32) applied to the kept entries (None: none)."""

    masks: dict[int, Any]
    factor: np.float32 | None
    # per range start, the ``(inputs, count)`` uint8 array whose rows are every input's
    # decisions (ones for an input kept whole): the fused kernel's ``sel`` as it is
    rows: dict[int, Any] | None = None
    # every |model - base| summed finite, so the model and the base are finite throughout
    # (an inf or NaN input makes its difference, and so the sum, inf or NaN)
    finite: bool = False

    def apply(self, delta: torch.Tensor, start: int = 0) -> torch.Tensor:
        import torch

        mask = torch.from_numpy(self.masks[start]).reshape(delta.shape).to(delta.device)
        kept = delta * mask
        return kept if self.factor is None else kept * float(self.factor)


def _decisions(
    source: Any,
    start: int,
    count: int,
    row: int,
    low: Any,
    step: Any,
    stream: MaskStream,
    kept: Any = None,
) -> tuple[Any, tuple[float, float]]:
    """The keep decisions (bool array, into ``kept`` where given) of a range of whole rows
    starting a mask block, and its (Σ|x|, Σ|x·keep|) in float64."""
    import numpy as np

    from mergekit_math.kernels.ranks import della_decisions, della_probs
    from mergekit_math.kernels.stats import sum_abs_kept

    kept = np.empty(count, np.bool_) if kept is None else kept
    sums = np.zeros(2)
    primary, spare = stream.words(start, count)
    if della_decisions(source, row, low, step, primary, spare, kept, sums):
        return kept, (float(sums[0]), float(sums[1]))
    # a block's ties outgrew its spare words (odds below 1e-40): the stream's own overflow
    import torch

    probs = np.empty(count, np.float32)
    della_probs(source, row, low, step, probs)
    kept[:] = stream.keep_with(start, torch.from_numpy(probs), compiled=True).numpy()
    return kept, sum_abs_kept(source, kept.view(np.uint8))


def della_keeps(
    inputs: PrepareInputs[Any, Any],
    drops: dict[int, tuple[float, float, MaskStream]],
    l1: bool,
    row: int,
) -> dict[int, DellaKeep]:
    """The decisions of each input ``i`` in ``drops`` (``density`` ± ``epsilon`` by rank in
    rows of ``row``, its ``stream``), from the held ``(base, model)`` ranges: every input's
    ranges in one map, so the worker threads wait once per tensor."""
    import numpy as np

    for density, epsilon, _ in drops.values():
        if density - epsilon <= 0 or density + epsilon >= 1:
            raise ValueError(
                f"della needs density ± epsilon inside (0, 1), got {density} ± {epsilon}"
            )
    assert inputs.held is not None
    jobs = [(i, r) for i in drops for r in range(len(inputs.ranges))]
    rows = {}  # each range's decisions of every input, one array (see DellaKeep.rows)
    for (start, end), (_, models) in zip(inputs.ranges, inputs.held):
        rows[start] = np.empty((len(models), end - start), np.uint8)
        for i in set(range(len(models))) - set(drops):
            rows[start][i] = 1

    def one(job: tuple[int, int]) -> tuple[Any, Any]:
        i, r = job
        density, epsilon, stream = drops[i]
        low, step = np.float32(density - epsilon), np.float32(2 * epsilon)
        (start, end), (base, models) = inputs.ranges[r], inputs.held[r]
        kept = rows[start][i].view(np.bool_)
        return _decisions((base, models[i]), start, end - start, row, low, step, stream, kept)

    done = dict(zip(jobs, inputs.map(one, jobs)))
    keeps = {}
    for i in drops:
        parts = [done[i, r] for r in range(len(inputs.ranges))]
        masks = {start: mask for (start, _), (mask, _) in zip(inputs.ranges, parts)}
        factor = None
        if l1:  # float64 sums rounded once to float32 (to nearest even, as torch's ``.to``)
            before = np.float32(math.fsum(s[0] for _, s in parts))
            after = np.float32(math.fsum(s[1] for _, s in parts))
            factor = l1_factor(before, after)
        finite = all(math.isfinite(s[0]) for _, s in parts)
        keeps[i] = DellaKeep(masks, factor, rows, finite)
    return keeps
