"""The k-th largest of non-negative float32 values (TIES trims, Breadcrumbs windows) by
radix selection on their bits: a non-negative float's bits order like the float, so one
histogram pass over the top 16 bits (exponent and 8 mantissa bits) finds the bin holding
the answer. Within a bin, the values whose low 15 bits are all zero are one value, the
bin's smallest; the same pass collects the others (a bfloat16 model's deltas: about 3 in
100), and the answer and how many elements of each range equal it follow from them. Where
too many have low bits to collect (float32 inputs), a second pass collects the answers'
bins whole, or where those hold too many values (``_COLLECT``), histograms the low 15 bits
of the answer's bin per range. No sort, no copy of most values, no positions (tied
positions are found later, in the few ranges that need them, see
:class:`mergekit_math.methods.selection.TieRule`). The magnitudes are a float32 array, or
computed as the passes go from the stored (base, model) pairs the engine read for the merge
(:func:`magnitude_at`), so that they are neither materialised nor read twice.

From pairs, the pass collects nothing: it counts each bin's clean values (low bits all zero)
and the others apart (:func:`histogram_pairs`), which answers wherever the k-th largest is
its bin's clean value, nearly always for a bfloat16 model's deltas; else a second pass
collects the answers' bins' values with low bits. 0.6-0.75 ns per element and model, where
collecting in the pass took 1.0 (1.2-1.7 with the second pass always run, 4-5 for the
sample-bracketed ``torch.kthvalue`` selection).

The compiled passes are in :mod:`mergekit_math.kernels.select_passes`; this module runs
them over a tensor's parts and answers from their counts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from mergekit_math.kernels.select_passes import (
    _BLOCK,
    _NONFINITE,
    BINS,
    LOW,
    SHIFT,
    collect_bins,
    histogram,
    histogram_low,
    histogram_low2,
    histogram_pairs,
)


def pick(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the ``k``-th largest and how many elements lie in higher bins."""
    return picks(hist, [k])[0]


def picks(hist: np.ndarray, ks: list[int]) -> list[tuple[int, int]]:
    """:func:`pick` of each ``k`` (1 ≤ k ≤ the count), in one sum from the top over the
    histogram's filled bins only (a tensor's values fill a few thousand of the 65536)."""
    filled = np.flatnonzero(hist)
    low, high = int(filled[0]), int(filled[-1]) + 1
    down = hist[low:high][::-1]
    reached = np.cumsum(down)  # from the top: the count in each bin and those above it
    out = []
    for k in ks:
        j = int(np.searchsorted(reached, k))  # the first bin from the top reaching k
        out.append((high - 1 - j, int(reached[j] - down[j])))
    return out


# histogram tasks per selection of a tensor: enough to share between the worker threads
_TASKS = 8


def tensor_parts(values, ranges: list[tuple[int, int]]) -> list[tuple[int, object]]:  # noqa: ANN001
    """``(range index, array)`` parts of a flat float32 CPU tensor: its ranges, each cut at
    a grid of about :data:`_TASKS` tasks."""
    flat = values.numpy()
    step = min(1 << 30, max(1 << 18, -(-flat.shape[0] // _TASKS)))
    out = []
    for r, (start, end) in enumerate(ranges):
        cut = start
        while cut < end:
            stop = min(end, (cut // step + 1) * step)
            out.append((r, flat[cut:stop]))
            cut = stop
    return out


def _sum(hists: list[np.ndarray]) -> np.ndarray:
    """The histograms added up, in int64 (in place: ``np.sum`` of the list stacks a copy)."""
    total = hists[0].astype(np.int64)
    for hist in hists[1:]:
        total += hist
    return total


class _Counted(NamedTuple):
    """One part's first pass (:func:`histogram`): its histogram of top-16-bit bins and the
    values it collected with low bits set (None: too many to collect)."""

    hist: np.ndarray
    found: np.ndarray | None

    def count(self, bin_: int) -> int:
        """The part's values in bin ``bin_``."""
        return int(self.hist[bin_])

    def bins(self) -> np.ndarray:
        """The top-16-bit histogram."""
        return self.hist


@dataclass(frozen=True)
class _Split:
    """One part's split histogram (:func:`histogram_pairs`: each bin's clean and dirty
    counts apart), kept as the split bins it filled: ``filled`` from split bin ``low`` on,
    and split bins 0 and 1 (zeros, which lie far below the rest) in ``zeros``. Nothing is
    collected."""

    filled: np.ndarray
    low: int
    zeros: tuple[int, int]
    found: None = None

    def at(self, split_bin: int) -> int:
        if split_bin < 2:
            return self.zeros[split_bin]
        i = split_bin - self.low
        return int(self.filled[i]) if 0 <= i < self.filled.shape[0] else 0

    def clean(self, bin_: int) -> int:
        """The part's values in bin ``bin_`` with their low 15 bits all zero."""
        return self.at(2 * bin_)

    def dirty(self, bin_: int) -> int:
        """The part's values in bin ``bin_`` with some low bit set."""
        return self.at(2 * bin_ + 1)

    def count(self, bin_: int) -> int:
        return self.clean(bin_) + self.dirty(bin_)

    def add_to(self, split: np.ndarray) -> None:
        """Add the part's counts to a whole split histogram."""
        split[self.low : self.low + self.filled.shape[0]] += self.filled
        split[:2] += self.zeros

    def bins(self) -> np.ndarray:
        split = np.zeros(2 * BINS, np.int64)
        self.add_to(split)
        return split[0::2] + split[1::2]


def _total(counted: list[_Counted | _Split]) -> np.ndarray:
    """The parts' top-16-bit histograms added up (split ones over the bins they filled,
    folded once after the sum)."""
    if all(isinstance(c, _Split) for c in counted):
        split = np.zeros(2 * BINS, np.int64)
        for c in counted:
            c.add_to(split)  # type: ignore[union-attr]
        return split[0::2] + split[1::2]
    return _sum([c.bins() for c in counted])


def _from_clean(
    bin_: int, above: int, k: int, counted: list[_Split]
) -> tuple[int, int, list[int]] | None:
    """The answer in bin ``bin_`` from split histograms where it is the bin's clean value
    (its smallest, ``bin_ << SHIFT``, below the bin's dirty values): ``(bits, above, ties
    per part)``; None where the ``k``-th largest is one of the dirty values."""
    clean = [c.clean(bin_) for c in counted]
    dirty = sum(c.dirty(bin_) for c in counted)
    if k - above <= dirty:
        return None
    return bin_ << SHIFT, above + dirty, clean


def _from_found(
    bin_: int, above: int, k: int, counted: list[_Counted | _Split], found: list[np.ndarray]
) -> tuple[int, int, list[int]]:
    """The answer in bin ``bin_`` from the values collected there (those with low bits; the
    rest of the bin are one value, its smallest, ``bin_ << SHIFT``; or every value of the
    bin, :func:`collect_bins`): ``(bits, above, ties per part)``."""
    inside = [f[(f >> np.uint32(SHIFT)) == bin_] for f in found]
    dirty = sum(f.shape[0] for f in inside)
    if k - above <= dirty:
        bits, above = kth_in_bin(inside, k, above)
        return bits, above, [int(np.count_nonzero(f == bits)) for f in inside]
    clean = [c.count(bin_) - f.shape[0] for c, f in zip(counted, inside)]
    return bin_ << SHIFT, above + dirty, clean


def kth_in_bin(inside: list[np.ndarray], k: int, above: int) -> tuple[int, int]:
    """The bits of the ``k``-th largest value, ``above`` values lying above the values of
    ``inside`` (its parts' bits, uint32) and it among them, and how many exceed it."""
    values = np.sort(np.concatenate(inside))[::-1]
    bits = int(values[k - above - 1])  # the rank from the top of these values
    return bits, above + int(np.count_nonzero(values > bits))


# Collect the answers' bins whole where they hold at most 1/_COLLECT[bins] of the values,
# else count their low bits (one pass per two bins). ns per element, 11.5M float32 values:
# collecting 0.45 / 0.59 / 0.90 / 1.39 / 2.05 with 1 in 1000 / 170 / 50 / 20 / 8 in the bins,
# a low-bits pass of one bin 0.81-1.39, of two 2.43-2.53 (three bins take both passes)
_COLLECT = {1: 20, 2: 8, 3: 8}


def _collect(
    sources: list[object],
    bins: list[int],
    counted: list[_Counted | _Split],
    map,  # noqa: ANN001
    dirty: bool = False,
) -> list[np.ndarray]:
    """Per source, the bits of its values in ``bins`` (at most three; with ``dirty``, only
    those with some low bit set, counted by split histograms), in index order."""
    first, second, third = (np.uint32(b) for b in (bins * 3)[:3])

    def one(job: tuple[object, _Counted | _Split]) -> np.ndarray:
        src, part = job
        if dirty:
            length = sum(part.dirty(b) for b in bins)  # type: ignore[union-attr]
        else:
            length = sum(part.count(b) for b in bins)
        out = np.empty(length, np.uint32)
        if collect_bins(src, first, second, third, out, dirty) != out.shape[0]:
            raise RuntimeError("selection: the values in the bins changed between passes")
        return out

    return list(map(one, zip(sources, counted)))


def _low_passes(
    sources: list[object],
    bins: np.ndarray,
    map,  # noqa: ANN001
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per source, its histogram of the low 15 bits in each of ``bins`` (one pass per two
    bins: three quartiles may fall in three), and their sum."""

    def count_low(src: object, pair: np.ndarray) -> np.ndarray:
        hist = np.zeros((pair.shape[0], LOW), np.int32)
        if pair.shape[0] == 1:
            histogram_low(src, pair[0], hist[0])
        else:
            histogram_low2(src, pair[0], pair[1], hist)
        return hist

    pairs = [bins[g : g + 2] for g in range(0, bins.shape[0], 2)]
    passes = [list(map(partial(count_low, pair=pair), sources)) for pair in pairs]
    lows = passes[0] if len(passes) == 1 else [np.concatenate(h) for h in zip(*passes)]
    return lows, _sum(lows)


def _found_buffer(length: int) -> np.ndarray:
    return np.empty((length >> 4) + _BLOCK, np.uint32)  # 1 in 16, and a block


def _count(src: object) -> _Counted | None:
    """One part's histogram pass: its top-16-bit histogram and the values it collected
    (None: too many to collect), or None if some value has its sign bit set. A part has
    < 2^31 elements (the engine's ranges, a tensor's task grid): int32 counts halve what is
    zeroed and summed."""
    hist = np.zeros(BINS, np.int32)
    length = src[0].shape[0] if isinstance(src, tuple) else src.shape[0]  # type: ignore[index, attr-defined]
    found = _found_buffer(length)
    got = histogram(src, hist, found)
    if got == -1:
        return None
    return _Counted(hist, found[:got] if got >= 0 else None)


_local = threading.local()


def _split_buffer(k: int) -> np.ndarray:
    """This thread's zeroed split histograms for ``k`` models: reused from part to part,
    each returned zeroed where it was filled (a fresh megabyte per part, zeroed and freed,
    cost more than the pass's saving)."""
    hists = getattr(_local, "split", None)
    if hists is None or hists.shape[0] < k:
        _local.split = hists = np.zeros((k, 2 * BINS), np.int32)
    return hists[:k]


def _count_pairs(sources: list[tuple[Any, Any]]) -> list[_Split]:
    """The split histograms of ``(base, model)`` sources of one base array and one model
    dtype, in one pass (:func:`histogram_pairs`)."""
    hists = _split_buffer(len(sources))
    spans = np.zeros((len(sources), 2), np.int64)
    try:
        histogram_pairs(sources[0][0], tuple(m for _, m in sources), hists, spans)
    except BaseException:
        _local.split = None  # filled where unknown: not reused
        raise
    out = []
    for hist, (low, high) in zip(hists, spans):
        out.append(_Split(hist[low:high].copy(), int(low), (int(hist[0]), int(hist[1]))))
        hist[low:high] = 0
        hist[:2] = 0
    return out


def _count_all(sources: list[object], map) -> list[Any]:  # noqa: ANN001
    """:func:`_count` of every source, those that are ``(base, model)`` pairs of one base
    range (several models' deltas; the base arrays may be distinct views of its memory)
    counted together by :func:`_count_pairs`."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, src in enumerate(sources):
        if isinstance(src, tuple):  # one base: its memory (each model's view is its own)
            base = src[0]
            key: tuple[Any, ...] = (base.ctypes.data, base.shape[0], base.dtype, src[1].dtype)
        else:
            key = (i,)  # an array of magnitudes: a pass of its own
        groups.setdefault(key, []).append(i)

    def one(members: list[int]) -> list[Any]:
        first = sources[members[0]]
        if not isinstance(first, tuple):
            return [_count(first)]
        return _count_pairs([sources[i] for i in members])  # type: ignore[misc]

    out: list[Any] = [None] * len(sources)
    jobs = list(groups.values())
    for members, counted in zip(jobs, map(one, jobs)):
        for i, c in zip(members, counted):
            out[i] = c
    return out


def kth_largest_bits(
    parts: list[tuple[int, object]],
    ks: list[int],
    map,  # noqa: ANN001
    ranges: int,
) -> list[tuple[float, int, list[int], bool]] | None:
    """For each ``k`` of ``ks``: ``(threshold, above, ties, finite)``, the exact ``k``-th
    largest magnitude, how many exceed it, per range how many equal it, and whether every
    magnitude is finite (then so is every input they were computed from); None if some
    value has its sign bit set. The magnitudes come in ``parts``, ``(range index, source)`` in
    order (a source: see :func:`magnitude_at`), of ``ranges`` ranges. ``map`` runs the
    passes over the parts.

    One histogram pass of the top 16 bits finds each answer's bin. Within a bin the values
    whose low 15 bits are all zero are one value, the bin's smallest; the pass collects the
    others (:func:`histogram`), from which the answer and its ties follow. Where they were
    too many to collect (float32 inputs), a second pass collects the answers' bins whole
    (:func:`collect_bins`) where they hold few values, else counts their low bits
    (:func:`histogram_low`)."""
    return kth_largest_bits_of([(parts, ks, ranges)], map)[0]


def kth_largest_bits_of(
    groups: list[tuple[list[tuple[int, object]], list[int], int]],
    map,  # noqa: ANN001
) -> list[list[tuple[float, int, list[int], bool]] | None]:
    """:func:`kth_largest_bits` of several magnitudes, ``(parts, ks, ranges)`` each (a
    tensor's inputs), with the histogram passes of all their parts in one ``map``: the
    worker threads wait once, not once per input."""
    sources = [src for parts, _, _ in groups for _, src in parts]
    counted = iter(_count_all(sources, map))
    return [
        _answers(parts, ks, [next(counted) for _ in parts], map, ranges)
        for parts, ks, ranges in groups
    ]


def _first_pass_answers(
    ks: list[int], picks: list[tuple[int, int]], counted: list[_Counted | _Split]
) -> list[tuple[int, int, list[int]]] | None:
    """The answers from the first pass alone, from the values it collected or from split
    histograms where every answer is its bin's clean value; None where that is not enough."""
    found = [c.found for c in counted]
    if all(f is not None for f in found):
        return [
            _from_found(b, above, k, counted, found)  # type: ignore[arg-type]
            for k, (b, above) in zip(ks, picks)
        ]
    if not all(isinstance(c, _Split) for c in counted):
        return None
    cleans = [_from_clean(b, above, k, counted) for k, (b, above) in zip(ks, picks)]
    return None if any(c is None for c in cleans) else cleans  # type: ignore[return-value]


def _second_pass_answers(
    ks: list[int],
    picks: list[tuple[int, int]],
    counted: list[_Counted | _Split],
    high: np.ndarray,
    sources: list[object],
    map,  # noqa: ANN001
) -> list[tuple[int, int, list[int]]]:
    """The answers where some lies among values with low bits that the first pass did not
    collect: the values with low bits of the answers' bins where split histograms count
    few (a bfloat16 model's deltas), else the answers' bins whole where they hold few values,
    else their low bits counted (float32 inputs)."""
    bins = sorted({b for b, _ in picks})
    few = int(high.sum()) // _COLLECT[min(len(bins), 3)]
    if len(bins) <= 3 and all(isinstance(c, _Split) for c in counted):
        dirty = sum(c.dirty(b) for c in counted for b in bins)  # type: ignore[union-attr]
        if dirty <= few:  # a bfloat16 model's deltas: the dirty values of those bins
            found = _collect(sources, bins, counted, map, dirty=True)
            return [_from_found(b, above, k, counted, found) for k, (b, above) in zip(ks, picks)]
    if len(bins) <= 3 and int(high[bins].sum()) <= few:
        found = _collect(sources, bins, counted, map)
        # every value of those bins collected: _from_found answers from them alone
        return [_from_found(b, above, k, counted, found) for k, (b, above) in zip(ks, picks)]
    answers = []
    lows, total = _low_passes(sources, np.array(bins, np.uint32), map)
    for k, (bin_, above) in zip(ks, picks):
        row = int(np.searchsorted(bins, bin_))
        low, above_low = pick(total[row], k - above)
        ties = [int(hist[row, low]) for hist in lows]
        answers.append(((bin_ << SHIFT) | low, above + above_low, ties))
    return answers


def kth_largest_bits_from(
    parts: list[tuple[int, np.ndarray]],
    hists: list[np.ndarray],
    ks: list[int],
    map,  # noqa: ANN001
    ranges: int,
) -> list[tuple[float, int, list[int], bool]]:
    """:func:`kth_largest_bits` of float32 values whose first pass ran as they were made:
    ``hists[i]``, part ``i``'s top-16-bit histogram (int32, ``BINS``; its values finite and
    non-negative, which the caller knows). The second pass runs here."""
    counted: list[_Counted | _Split | None] = [_Counted(h, None) for h in hists]
    found = _answers(parts, ks, counted, map, ranges)  # type: ignore[arg-type]
    assert found is not None
    return found


def _answers(
    parts: list[tuple[int, object]],
    ks: list[int],
    counted: list[_Counted | _Split | None],
    map,  # noqa: ANN001
    ranges: int,
) -> list[tuple[float, int, list[int], bool]] | None:
    """:func:`kth_largest_bits`' answers from its parts' histogram passes (``counted``)."""
    if any(c is None for c in counted):
        return None
    done: list[_Counted | _Split] = counted  # type: ignore[assignment]
    high = _total(done)
    chosen = picks(high, ks)
    answers = _first_pass_answers(ks, chosen, done)
    if answers is None:
        answers = _second_pass_answers(ks, chosen, done, high, [s for _, s in parts], map)
    finite = not high[_NONFINITE:].any()
    out = []
    for bits, above, part_ties in answers:
        ties = [0] * ranges
        for (r, _), tied in zip(parts, part_ties):
            ties[r] += tied
        threshold = float(np.array([bits], np.uint32).view(np.float32)[0])
        out.append((threshold, above, ties, finite))
    return out
