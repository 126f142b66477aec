"""Sparsification kernels any method may import: magnitude (TIES trim), random (DARE),
magnitude with outliers (Model Breadcrumbs) and DELLA's MagPrune, plus the exact k-th
largest selection they rest on.

Pure functions of tensors (no IO, no global RNG); randomness comes from the
:class:`~mergekit_math.methods.masks.MaskStream` passed in.
"""

from __future__ import annotations

import builtins
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mergekit_math import kernels
from mergekit_math.methods.base import reduce_sum

if TYPE_CHECKING:
    import torch

    from mergekit_math.methods.base import ChunkMap
    from mergekit_math.methods.masks import MaskStream

Rescale = Literal["paper", "l1"]


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``kept`` so its L1 norm equals that of ``delta`` (mergekit's ``rescale``)."""
    before = reduce_sum(delta.abs())
    after = reduce_sum(kept.abs())
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


# Tensors up to this many elements get their threshold from one kthvalue; larger ones from a
# sample-bracketed selection (exact, and about 10x cheaper on embedding-sized tensors).
_DIRECT_SELECT = 1 << 20
_SELECT_CHUNK = 1 << 18
_SAMPLE = 1 << 16


@dataclass(frozen=True)
class Selection:
    threshold: float  # the k-th largest value
    above: int  # how many values are larger
    ties: torch.Tensor  # ascending positions of the values equal to the threshold


def _starts(n: int) -> range:
    return range(0, n, _SELECT_CHUNK)


def _select_directly(values: torch.Tensor, k: int, map: ChunkMap = builtins.map) -> Selection:
    import torch

    n = values.numel()
    threshold = float(torch.kthvalue(values, n - k + 1).values)

    def scan(start: int) -> tuple[int, torch.Tensor]:
        part = values[start : start + _SELECT_CHUNK]
        above = int(torch.count_nonzero(part > threshold))
        return above, (part == threshold).nonzero().flatten() + start

    found = list(map(scan, _starts(n)))
    return Selection(threshold, sum(a for a, _ in found), torch.cat([t for _, t in found]))


def kth_select(
    values: torch.Tensor, k: int, map: ChunkMap = builtins.map, compiled: bool | None = None
) -> Selection:
    """The exact ``k``-th largest element of a flat float tensor (``1 <= k <= n``), with how
    many elements exceed it and where the elements equal to it are.

    For large float32 magnitudes on the CPU, where the compiled kernels run (``compiled``:
    the caller's decision for the whole merge; None: by this tensor's size, see
    :func:`mergekit_math.kernels.enabled`), a radix selection on their bits
    (:mod:`mergekit_math.kernels.select`). Otherwise, for large tensors a strided sample
    brackets the answer; one chunked pass counts the elements above the bracket and
    collects those inside it (about 2 %, with positions), and a kthvalue over those
    finishes. Should the bracket miss (the counts say so), it falls back to a kthvalue over
    everything, so the result is always exact. ``map`` runs the chunked passes (the engine
    hands over its worker threads: single-threaded ops on each, rather than this thread's
    OpenMP fan-out, which a busy machine makes 5-10x slower).
    """
    import torch

    n = values.numel()
    if n <= _DIRECT_SELECT:
        return _select_directly(values, k, map)
    if compiled is None:  # on its own: the kernels pay for loading them on large tensors
        compiled = kernels.enabled(values.device.type, n)
    if compiled and values.dtype == torch.float32 and values.device.type == "cpu":
        from mergekit_math.kernels.select import kth_largest_bits

        found = kth_largest_bits(values, k, map)  # magnitudes only: None for negatives
        if found is not None:
            return Selection(*found)
    stride = n // _SAMPLE
    sample = values[::stride][:_SAMPLE].contiguous()
    size = sample.numel()
    below = (n - k) / n  # fraction of elements below the answer
    margin = 8 * math.sqrt(size * below * (1 - below)) + 16
    lo_rank, hi_rank = int(size * below - margin), int(size * below + margin) + 1
    lo = float(torch.kthvalue(sample, lo_rank).values) if lo_rank >= 1 else -math.inf
    hi = float(torch.kthvalue(sample, hi_rank).values) if hi_rank <= size else math.inf

    def scan(start: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        part = values[start : start + _SELECT_CHUNK]
        not_above = part <= hi
        above = part.numel() - int(torch.count_nonzero(not_above))
        where = (not_above & (part >= lo)).nonzero().flatten()
        return above, part[where], where + start

    found = list(map(scan, _starts(n)))
    above = sum(a for a, _, _ in found)
    candidates = torch.cat([c for _, c, _ in found])
    if not (above < k <= above + candidates.numel()):
        return _select_directly(values, k, map)
    rank = k - above  # rank from the top among the candidates
    threshold = float(torch.kthvalue(candidates, candidates.numel() - rank + 1).values)
    above += int(torch.count_nonzero(candidates > threshold))
    positions = torch.cat([p for _, _, p in found])
    return Selection(threshold, above, positions[candidates == threshold])


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The exact ``k``-th largest element of a flat float tensor (``1 <= k <= n``)."""
    return kth_select(values, k).threshold


class MagnitudeTrim:
    """TIES trim of one tensor's delta: keep its ``k`` largest magnitudes.

    Entries equal to the threshold fill the remaining places in index order, so exactly ``k``
    are kept and the choice depends neither on the selection algorithm nor on the thread
    count. ``ranges`` are the chunks :meth:`apply` will get (any order, any thread); each
    chunk's share of the tied entries is fixed here.
    """

    def __init__(
        self,
        magnitude: torch.Tensor,
        density: float,
        ranges: list[tuple[int, int]] | None = None,
        map: ChunkMap = builtins.map,
        compiled: bool | None = None,
    ):
        n = magnitude.numel()
        k = max(1, int(density * n))
        selection = kth_select(magnitude, k, map, compiled)
        self.threshold = selection.threshold
        self.ties = _split(selection.ties[: k - selection.above], ranges or [(0, n)])

    def apply(self, delta: torch.Tensor, start: int = 0) -> torch.Tensor:
        flat = delta.reshape(-1)
        magnitude = flat.abs()
        # 1.0 above the threshold, else 0.0: sign(|d| - t) ∈ {-1, 0, 1} -> {0, 0, 1}
        keep = (magnitude - self.threshold).sign_().add_(1).mul_(0.5).floor_()
        ties = self.ties[start]
        if ties.numel():
            keep[ties] = 1.0
        return (flat * keep).reshape(delta.shape)


def magnitude_prune(delta: torch.Tensor, density: float, rescale: Rescale | None) -> torch.Tensor:
    """Keep the ``max(1, int(density·n))`` entries of largest magnitude (TIES trim)."""
    if density >= 1:
        return delta
    kept = MagnitudeTrim(delta.reshape(-1).abs(), density).apply(delta)
    return rescale_l1(delta, kept) if rescale == "l1" else kept


class RankWindow:
    """Keep the elements whose rank in a stable ascending sort of the magnitudes (equal values
    in index order) lies in ``[first, first + count)``, without sorting: the values at the
    window's two ends come from :func:`kth_select`, every element strictly between them is
    inside, and of the elements equal to an end the window takes a run of consecutive ones in
    index order, as the stable sort would. ``ranges`` are the chunks :meth:`keep` will get (any
    order, any thread), as for :class:`MagnitudeTrim`."""

    def __init__(
        self,
        magnitude: torch.Tensor,
        first: int,
        count: int,
        ranges: list[tuple[int, int]] | None = None,
        map: ChunkMap = builtins.map,
        compiled: bool | None = None,
    ):
        import torch

        n = magnitude.numel()
        self.low, self.high = math.inf, -math.inf  # an empty window keeps nothing
        kept = magnitude.new_empty(0, dtype=torch.int64)
        if count > 0:
            last = first + count - 1  # the r-th smallest is the (n-r)-th largest
            low = kth_select(magnitude, n - first, map, compiled)
            high = kth_select(magnitude, n - last, map, compiled)
            self.low, self.high = low.threshold, high.threshold
            below_low = n - low.above - low.ties.numel()  # elements smaller than the low end
            below_high = n - high.above - high.ties.numel()
            if low.threshold == high.threshold:
                kept = low.ties[first - below_low : last - below_low + 1]
            else:
                ends = [low.ties[first - below_low :], high.ties[: last - below_high + 1]]
                kept = torch.cat(ends).sort().values  # each ascending; _split needs all
        self.ties = _split(kept, ranges or [(0, n)])

    def keep(self, magnitude: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Boolean keep mask of the flat magnitudes of the chunk starting at ``start``."""
        import torch

        mask = torch.gt(magnitude, self.low)
        mask &= magnitude < self.high
        ties = self.ties[start]
        if ties.numel():
            mask[ties] = True
        return mask

    def apply(self, delta: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The chunk ``delta`` (starting at flat ``start``) with the dropped entries zeroed."""
        import torch

        flat = delta.reshape(-1)
        zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
        return torch.where(self.keep(flat.abs(), start), flat, zero).reshape(delta.shape)


def _split(positions: torch.Tensor, ranges: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
    """Ascending flat ``positions`` per range, relative to the range's start."""
    import torch

    out: dict[int, torch.Tensor] = {}
    for start, end in ranges:
        bounds = torch.tensor([start, end], device=positions.device)
        lo, hi = torch.searchsorted(positions, bounds).tolist()
        out[start] = positions[lo:hi] - start
    return out


def rank_window(values: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Boolean mask of the elements of a flat tensor of stable ascending rank in ``[first,
    first + count)`` (see :class:`RankWindow`)."""
    return RankWindow(values, first, count).keep(values)


def breadcrumbs_window(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Ascending magnitude ranks Breadcrumbs keeps of ``n``: ``(first, count)``."""
    target = int(density * n)
    n_top = int(gamma * n)
    return max(0, n - target - n_top), target


def magnitude_outliers_prune(
    delta: torch.Tensor, density: float, gamma: float, rescale: Rescale | None
) -> torch.Tensor:
    """Drop the ``gamma`` fraction of largest entries, then the smallest, keeping ``density``
    (whole tensor, as mergekit 0.1.5): the entries of ascending magnitude rank ``n_bottom ..
    n_bottom + int(density·n) - 1``, equal magnitudes ranked in index order."""
    if density >= 1:
        return delta
    first, count = breadcrumbs_window(delta.numel(), density, gamma)
    kept = RankWindow(delta.reshape(-1).abs(), first, count).apply(delta)
    return rescale_l1(delta, kept) if rescale == "l1" else kept


_SAME_SIZE_INT = {8: "int64", 4: "int32", 2: "int16"}


def row_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Each element's rank (int64, from 0) in a stable ascending sort of its row of
    non-negative floats: one stable argsort, of the bit patterns as signed integers (ordered
    as the values are, without the float comparator's NaN handling), then the inverse
    permutation by a scatter (not a second argsort)."""
    import torch

    keys = rows
    if rows.is_floating_point() and rows.element_size() in _SAME_SIZE_INT:
        keys = rows.view(getattr(torch, _SAME_SIZE_INT[rows.element_size()]))
    order = keys.argsort(dim=1, stable=True)
    positions = torch.arange(rows.shape[1], dtype=torch.int64, device=rows.device)
    return torch.empty_like(order).scatter_(1, order, positions.expand_as(order))


@dataclass(frozen=True)
class KeepMask:
    """DARE's keep decisions for one input of one tensor, for the chunks the engine hands
    over in any order and on any thread: each element's decision depends on its flat index
    only (see :mod:`mergekit_math.methods.masks`), so there is nothing to draw in order."""

    stream: MaskStream
    density: float

    def take(self, start: int, end: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean keep mask of the flat range ``[start, end)``."""
        return self.stream.keep(start, end - start, self.density, device)


def apply_keep(
    delta: torch.Tensor, mask: torch.Tensor, density: float, rescale: Rescale | None
) -> torch.Tensor:
    kept = delta * mask.to(delta.device).reshape(delta.shape)
    if rescale == "paper":
        return kept.div_(density)
    if rescale == "l1":
        return rescale_l1(delta, kept)
    return kept


def random_drop(
    delta: torch.Tensor, density: float, rescale: Rescale | None, stream: MaskStream
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (Bernoulli), zero the rest; the
    draws are ``stream``'s uniforms of elements ``0 .. numel-1`` (row-major).

    ``paper`` divides the kept entries by ``density`` so the expected delta is unchanged.
    """
    if density >= 1:
        return delta
    mask = stream.keep(0, delta.numel(), density, delta.device)
    return apply_keep(delta, mask, density, rescale)


def della_drop(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: Rescale | None,
    stream: MaskStream,
) -> torch.Tensor:
    """DELLA MagPrune: per row, keep probability rises linearly with magnitude rank from
    ``density - epsilon`` to ``density + epsilon``; entry ``e`` (row-major) is kept when
    ``stream``'s uniform of element ``e`` is below its probability."""
    import torch

    if density >= 1:
        return delta
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise ValueError(f"della needs density ± epsilon inside (0, 1), got {density} ± {epsilon}")
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    # stable: equal magnitudes rank in index order, the same on every device
    ranks = row_ranks(rows.abs()).to(torch.float32)
    span = (rows.shape[1] - 1) or 1
    probs = (density - epsilon) + (ranks / span) * (2 * epsilon)
    mask = stream.keep_with(0, probs).reshape(rows.shape)
    kept = (rows * mask).reshape(delta.shape)
    if rescale == "paper":
        return kept.div_(probs.reshape(delta.shape).to(kept.dtype))
    if rescale == "l1":
        return rescale_l1(delta, kept)
    return kept
