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

from mergekit_math.methods.base import reduce_sum
from mergekit_math.methods.selection import (
    Selection,
    StoredMagnitude,
    TieRule,
    kth_select,
    kth_selects,
    tie_rules,
)

if TYPE_CHECKING:
    import torch

    from mergekit_math.methods.base import ChunkMap
    from mergekit_math.methods.masks import MaskStream

Rescale = Literal["paper", "l1"]


def l1_factor(before: torch.Tensor, after: torch.Tensor, eps: float = 1e-7) -> torch.Tensor | None:
    """The factor that gives kept entries of L1 norm ``after`` the norm ``before`` (None
    where either is below ``eps``: the kept entries are left as they are)."""
    if before < eps or after < eps:
        return None
    return before / after


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``kept`` so its L1 norm equals that of ``delta`` (mergekit's ``rescale``)."""
    factor = l1_factor(reduce_sum(delta.abs()), reduce_sum(kept.abs()), eps)
    return kept if factor is None else kept * factor


def della_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """DELLA's L1 rescale: :func:`rescale_l1` with both norms summed in float64 and rounded
    once at every length (``reduce_sum`` sums up to 32768 elements in float32, as mergekit,
    whose DELLA masks are random anyway): the sums the compiled decisions give
    (:mod:`mergekit_math.methods.magprune`), so a DELLA merge needs no torch and no
    float32 summation order (torch's is compiled per CPU capability)."""
    import torch

    before = delta.abs().sum(dtype=torch.float64).to(delta.dtype)
    after = kept.abs().sum(dtype=torch.float64).to(kept.dtype)
    factor = l1_factor(before, after, eps)
    return kept if factor is None else kept * factor


def _double(magnitude: torch.Tensor | StoredMagnitude) -> bool:
    """Whether the magnitudes compare as float64 (else float32: see :class:`TieRule`)."""
    if isinstance(magnitude, StoredMagnitude):  # no torch: a merge on numpy arrays
        return False
    import torch

    return isinstance(magnitude, torch.Tensor) and magnitude.dtype == torch.float64


class MagnitudeTrim:
    """TIES trim of one tensor's delta: keep its ``k`` largest magnitudes.

    Entries equal to the threshold fill the remaining places in index order, so exactly ``k``
    are kept and the choice depends neither on the selection algorithm nor on the thread
    count. ``ranges`` are the chunks :meth:`apply` will get (any order, any thread); each
    chunk's share of the tied entries is fixed here (``rules``, see :class:`TieRule`).
    """

    def __init__(
        self,
        magnitude: torch.Tensor | StoredMagnitude,
        density: float,
        ranges: list[tuple[int, int]] | None = None,
        map: ChunkMap = builtins.map,
        compiled: bool | None = None,
        selection: Selection | None = None,
    ):
        n = magnitude.numel()
        (k,) = self.ks(n, density)
        ranges = ranges or [(0, n)]
        if selection is None:  # else computed for it (kth_selects_of, with other inputs')
            selection = kth_select(magnitude, k, map, compiled, ranges)
        self.threshold = selection.threshold
        self.finite = selection.finite  # every magnitude finite (see Selection)
        self.rules = tie_rules(ranges, selection, None, 0, k - selection.above, _double(magnitude))

    @staticmethod
    def ks(n: int, density: float) -> list[int]:
        """The rank it selects: the ``max(1, int(density·n))``-th largest."""
        return [max(1, int(density * n))]

    def apply(self, delta: torch.Tensor, start: int = 0) -> torch.Tensor:
        flat = delta.reshape(-1)
        keep = self.rules[start].keep(flat.abs())
        return (flat * keep.to(flat.dtype)).reshape(delta.shape)


def magnitude_prune(delta: torch.Tensor, density: float, rescale: Rescale | None) -> torch.Tensor:
    """Keep the ``max(1, int(density·n))`` entries of largest magnitude (TIES trim)."""
    if density >= 1:
        return delta
    kept = MagnitudeTrim(delta.reshape(-1).abs(), density).apply(delta)
    return rescale_l1(delta, kept) if rescale == "l1" else kept


class RankWindow:
    """Keep the elements whose rank in a stable ascending sort of the magnitudes (equal values
    in index order) lies in ``[first, first + count)``, without sorting: the values at the
    window's two ends come from :func:`kth_selects`, every element strictly between them is
    inside, and of the elements equal to an end the window takes a run of consecutive ones in
    index order, as the stable sort would. ``ranges`` are the chunks :meth:`keep` will get (any
    order, any thread), as for :class:`MagnitudeTrim`."""

    def __init__(
        self,
        magnitude: torch.Tensor | StoredMagnitude,
        first: int,
        count: int,
        ranges: list[tuple[int, int]] | None = None,
        map: ChunkMap = builtins.map,
        compiled: bool | None = None,
        selections: list[Selection] | None = None,
    ):
        n = magnitude.numel()
        ranges = ranges or [(0, n)]
        self.low, self.high = math.inf, -math.inf  # an empty window keeps nothing
        self.rules = {start: TieRule(math.inf, -math.inf) for start, _ in ranges}
        self.finite = False  # every magnitude finite (see Selection); unknown here
        if count > 0:
            last = first + count - 1
            if selections is None:  # else computed for it (kth_selects_of)
                selections = kth_selects(magnitude, self.ks(n, first, count), map, compiled, ranges)
            low, high = selections
            self.low, self.high = low.threshold, high.threshold
            self.finite = low.finite
            below_low = n - low.above - low.tied  # elements smaller than the low end
            below_high = n - high.above - high.tied
            if low.threshold == high.threshold:
                ties = (first - below_low, last - below_low + 1)
            else:
                ties = (first - below_low, last - below_high + 1)
            self.rules = tie_rules(ranges, low, high, *ties, _double(magnitude))

    @staticmethod
    def ks(n: int, first: int, count: int) -> list[int]:
        """The ranks its ends select (none for an empty window): the r-th smallest is the
        (n-r)-th largest."""
        return [n - first, n - (first + count - 1)] if count > 0 else []

    def keep(self, magnitude: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Boolean keep mask of the flat magnitudes of the chunk starting at ``start``."""
        return self.rules[start].keep(magnitude)

    def apply(self, delta: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The chunk ``delta`` (starting at flat ``start``) with the dropped entries zeroed."""
        import torch

        flat = delta.reshape(-1)
        zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
        return torch.where(self.keep(flat.abs(), start), flat, zero).reshape(delta.shape)


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
        return della_l1(delta, kept)
    return kept
