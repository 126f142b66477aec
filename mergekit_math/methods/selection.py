"""Exact magnitude selections for TIES trims and Breadcrumbs windows, and what a chunk of
the tensor keeps under them.

:func:`kth_select` finds the exact ``k``-th largest value of a flat tensor, how many values
exceed it and, per range of the chunks the merge will run, how many equal it. Those counts
fix which of the tied values each chunk keeps without listing them: ties are kept in index
order, so a chunk keeps all of its ties, none, or (in at most one chunk per threshold) a run
of them, and :class:`TieRule` says which for each chunk.
"""

from __future__ import annotations

import builtins
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mergekit_math import kernels

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import torch

    # methods.base.ChunkMap, not imported from there: base refers to this module
    ChunkMap = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]

# Tensors up to this many elements get their threshold from one kthvalue; larger ones from a
# sample-bracketed selection (exact, and about 10x cheaper on embedding-sized tensors).
_DIRECT_SELECT = 1 << 20
_SELECT_CHUNK = 1 << 18
_SAMPLE = 1 << 16
# where the compiled kernels run, the radix selection answers from this size on (below, its
# two 256 KB histograms cost more than a kthvalue)
_RADIX_SMALLEST = 1 << 16

Ranges = list[tuple[int, int]]


@dataclass(frozen=True)
class StoredMagnitude:
    """One input's |model - base| over a tensor, not materialised: per range of the merge
    (in order), the two stored arrays (numpy: bfloat16 bits as uint16, or float32) the
    compiled selection computes each magnitude from (``kernels.select_passes.magnitude_at``), as
    the fused kernels compute the delta. What the engine hands a TIES or Breadcrumbs
    ``prepare`` when it holds the tensor's inputs as read."""

    parts: list[tuple[Any, Any]]
    elements: int

    def numel(self) -> int:
        return self.elements


@dataclass(frozen=True)
class Selection:
    threshold: float  # the k-th largest value
    above: int  # how many values are larger
    ties: list[int]  # per range of the selection's ranges: how many values equal it
    # every value is finite (known where the compiled selection histogrammed them all; an
    # input a magnitude came from is then finite too): a fact about the values, not part of
    # the answer
    finite: bool = field(default=False, compare=False)

    @property
    def tied(self) -> int:
        return sum(self.ties)


def _starts(n: int) -> range:
    return range(0, n, _SELECT_CHUNK)


def _tie_counts(positions: torch.Tensor, ranges: Ranges) -> list[int]:
    import torch

    bounds = torch.tensor([s for s, _ in ranges] + [ranges[-1][1]], dtype=positions.dtype)
    cut = torch.searchsorted(positions, bounds).tolist()
    return [b - a for a, b in zip(cut, cut[1:])]


def _select_directly(values: torch.Tensor, k: int, map: ChunkMap, ranges: Ranges) -> Selection:
    import torch

    n = values.numel()
    threshold = float(torch.kthvalue(values, n - k + 1).values)

    def scan(start: int) -> tuple[int, torch.Tensor]:
        part = values[start : start + _SELECT_CHUNK]
        above = int(torch.count_nonzero(part > threshold))
        return above, (part == threshold).nonzero().flatten() + start

    found = list(map(scan, _starts(n)))
    positions = torch.cat([t for _, t in found])
    return Selection(threshold, sum(a for a, _ in found), _tie_counts(positions, ranges))


def _select_bracketed(values: torch.Tensor, k: int, map: ChunkMap, ranges: Ranges) -> Selection:
    """A strided sample brackets the answer; one chunked pass counts the elements above the
    bracket and collects those inside it (about 2 %, with positions), and a kthvalue over
    those finishes; should the bracket miss (the counts say so), a kthvalue over
    everything."""
    import torch

    n = values.numel()
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
        return _select_directly(values, k, map, ranges)
    rank = k - above  # rank from the top among the candidates
    threshold = float(torch.kthvalue(candidates, candidates.numel() - rank + 1).values)
    above += int(torch.count_nonzero(candidates > threshold))
    positions = torch.cat([p for _, _, p in found])[candidates == threshold]
    return Selection(threshold, above, _tie_counts(positions, ranges))


def kth_selects(
    values: torch.Tensor | StoredMagnitude,
    ks: list[int],
    map: ChunkMap = builtins.map,
    compiled: bool | None = None,
    ranges: Ranges | None = None,
) -> list[Selection]:
    """The exact ``k``-th largest element of a flat float tensor for each ``k`` of ``ks``
    (``1 <= k <= n``), with how many elements exceed it and, per range of ``ranges`` (in
    order, covering the tensor; default one range), how many equal it.

    For large float32 magnitudes on the CPU, where the compiled kernels run (``compiled``:
    the caller's decision for the whole merge; None: by this tensor's size, see
    :func:`mergekit_math.kernels.enabled`), a radix selection on their bits, two passes for
    all ``ks`` together (:mod:`mergekit_math.kernels.select`), from 65,537 elements on, and
    always for a :class:`StoredMagnitude` (whose ranges are its parts). Otherwise, per
    ``k``, a kthvalue for small tensors and a sample-bracketed selection for large ones.
    ``map`` runs the chunked passes (the engine hands over its worker threads: single-
    threaded ops on each, rather than this thread's OpenMP fan-out, which a busy machine
    makes 5-10x slower).
    """
    if isinstance(values, StoredMagnitude):  # no torch: a merge on numpy arrays
        from mergekit_math.kernels.select import kth_largest_bits

        parts = list(enumerate(values.parts))
        found = kth_largest_bits(parts, ks, map, len(parts))
        assert found is not None  # magnitudes have no sign bit
        return [Selection(*f) for f in found]
    import torch

    n = values.numel()
    ranges = ranges or [(0, n)]
    if compiled is None:  # on its own: the kernels pay for loading them on large tensors
        compiled = kernels.enabled(values.device.type, n)
    radix = compiled and n > _RADIX_SMALLEST and values.dtype == torch.float32
    if radix and values.device.type == "cpu":
        from mergekit_math.kernels.select import kth_largest_bits, tensor_parts

        found = kth_largest_bits(tensor_parts(values, ranges), ks, map, len(ranges))
        if found is not None:  # else some value is negative: not magnitudes
            return [Selection(*f) for f in found]
    if n <= _DIRECT_SELECT:
        return [_select_directly(values, k, map, ranges) for k in ks]
    return [_select_bracketed(values, k, map, ranges) for k in ks]


def kth_selects_of(
    items: list[tuple[torch.Tensor | StoredMagnitude, list[int]]],
    map: ChunkMap = builtins.map,
    compiled: bool | None = None,
    ranges: Ranges | None = None,
) -> list[list[Selection]]:
    """:func:`kth_selects` of several ``(values, ks)`` (a tensor's inputs): where all are
    :class:`StoredMagnitude`, the histogram passes of all of them in one ``map``."""
    if items and all(isinstance(v, StoredMagnitude) for v, _ in items):
        from mergekit_math.kernels.select import kth_largest_bits_of

        groups = [(list(enumerate(v.parts)), ks, len(v.parts)) for v, ks in items]  # type: ignore[union-attr]
        found = kth_largest_bits_of(groups, map)
        assert all(f is not None for f in found)  # magnitudes have no sign bit
        return [[Selection(*one) for one in f] for f in found]  # type: ignore[union-attr]
    return [kth_selects(v, ks, map, compiled, ranges) for v, ks in items]


def kth_select(
    values: torch.Tensor | StoredMagnitude,
    k: int,
    map: ChunkMap = builtins.map,
    compiled: bool | None = None,
    ranges: Ranges | None = None,
) -> Selection:
    """:func:`kth_selects` of one ``k``."""
    return kth_selects(values, [k], map, compiled, ranges)[0]


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The exact ``k``-th largest element of a flat float tensor (``1 <= k <= n``)."""
    return kth_select(values, k).threshold


def first_ties(values: torch.Tensor, selection: Selection, count: int) -> torch.Tensor:
    """Positions of the first ``count`` values equal to the selection's threshold."""
    return (values == selection.threshold).nonzero().flatten()[:count]


Run = tuple[float, int, int]  # (value, skip, take)


@dataclass(frozen=True)
class TieRule:
    """What one chunk keeps of a flat magnitude tensor: the values strictly between ``low``
    and ``high`` and, for each ``(value, skip, take)`` of ``runs``, of the values equal to
    ``value`` (in index order) those numbered ``skip .. skip + take - 1``.

    A chunk that keeps every value equal to a threshold gets the bound moved one float32
    past it (``m > low`` becomes ``m > nextafter(low, -inf)``, which is ``m >= low``), so
    only the chunk where a threshold's kept ties begin or end needs a run."""

    low: float
    high: float
    runs: tuple[Run, ...] = ()

    def keep(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Boolean keep mask of the chunk's flat magnitudes (compared in float32, or float64
        for float64 magnitudes: the bounds are moved by one ulp of that type)."""
        import torch

        if magnitude.dtype != torch.float64:
            magnitude = magnitude.float()

        mask = torch.gt(magnitude, self.low)
        if self.high != math.inf:
            mask &= magnitude < self.high
        for value, skip, take in self.runs:
            tied = (magnitude == value).nonzero().flatten()
            mask[tied[skip : skip + take]] = True
        return mask


def _interval(counts: list[int], first: int, stop: int) -> list[tuple[int, int, int]]:
    """Per range, of the global tie interval ``[first, stop)`` (ties numbered in index
    order): ``(count, skip, take)`` of that range's ties."""
    out, before = [], 0
    for count in counts:
        skip = min(max(first - before, 0), count)
        out.append((count, skip, min(max(stop - before, 0), count) - skip))
        before += count
    return out


def _past(value: float, direction: float, double: bool) -> float:
    """The next float32 (float64 with ``double``) after ``value`` towards ``direction``."""
    import numpy as np

    if double:
        return math.nextafter(value, direction)
    return float(np.nextafter(np.float32(value), np.float32(direction)))


def tie_rules(
    ranges: Ranges,
    low: Selection,
    high: Selection | None,
    first: int,
    stop: int,
    double: bool = False,
) -> dict[int, TieRule]:
    """Per range start, the rule keeping the values above ``low.threshold`` (and below
    ``high.threshold`` when given) and the ties numbered ``[first, stop)`` of ``low``'s
    threshold (with ``high``: ``low``'s ties from ``first`` on and ``high``'s ties before
    ``stop``, or one threshold's ties ``[first, stop)`` where both are the same value).
    ``double``: the magnitudes are float64 (else compared as float32)."""
    lo = low.threshold
    hi = math.inf if high is None else high.threshold
    if high is None or lo == hi:
        # -1 / +1: the bounds a chunk that keeps all of this value's ties moves past it
        ends = [(lo, _interval(low.ties, first, stop), (-1, 1) if high else (-1,))]
    else:
        ends = [(lo, _interval(low.ties, first, low.tied), (-1,))]
        ends.append((hi, _interval(high.ties, 0, stop), (1,)))
    rules = {}
    for r, (start, _) in enumerate(ranges):
        bounds, runs = [lo, hi], []
        for value, parts, sides in ends:
            count, skip, take = parts[r]
            if take and take == count and math.isfinite(value):
                for side in sides:
                    bounds[side > 0] = _past(value, side * math.inf, double)
            elif take:
                runs.append((value, skip, take))
        rules[start] = TieRule(bounds[0], bounds[1], tuple(runs))
    return rules
