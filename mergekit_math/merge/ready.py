"""One plan item made ready to merge: its ranges, finite check, inputs, fused kernel and
mask generators (:func:`_setup`), its inputs read whole where its preparation needs them
(:func:`_hold_inputs`) and its preparation's states (:func:`_prepare`). The engine
(:mod:`mergekit_math.merge.execution`) runs these for the item it merges, and
:class:`~mergekit_math.merge.ahead.Ahead` for the items it prepares ahead; both look them up
as ``execution``'s names, which tests wrap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergekit_math.merge.finite import FiniteCheck
from mergekit_math.merge.fused import FusedRange
from mergekit_math.merge.memory import CHUNK_ELEMENTS, item_ranges
from mergekit_math.merge.prepare import _prepare_states
from mergekit_math.merge.ranges import _RangeInputs, _read_range, _Run
from mergekit_math.merge.types import Plan, PlanItem

if TYPE_CHECKING:
    import torch

    from mergekit_math.methods.masks import MaskStream


def _fetch(
    plan: Plan, item: PlanItem, run: _Run | None, start: int, end: int
) -> tuple[list[torch.Tensor], int]:
    """One range's raw inputs and the read-ahead bytes they hold (0 when read here)."""
    if run is None or run.prefetch is None:
        return _read_range(plan, item, start, end), 0
    return run.prefetch.get(item, start, end)


def _hold(
    plan: Plan, item: PlanItem, run: _Run | None, ranges: list[tuple[int, int]]
) -> dict[int, list[torch.Tensor]]:
    """Every range's raw inputs, read once for a preparation that needs whole magnitudes
    and for the merge after it. They are held outside the read-ahead budget (released as
    taken, so the reader goes on): the item's inputs as stored, about what the whole-tensor
    float32 magnitude they replace would take (6 bytes per element for a base and two
    bfloat16 inputs, against 4), and the inputs are no longer read a second time."""
    held = {}
    for start, end in ranges:
        raw, nbytes = _fetch(plan, item, run, start, end)
        _release(run, nbytes)
        held[start] = raw
    return held


def _release(run: _Run | None, nbytes: int) -> None:
    if run is not None and run.prefetch is not None and nbytes:
        run.prefetch.done(nbytes)


def _generators(plan: Plan, item: PlanItem) -> list[MaskStream] | None:
    """One counter-based generator per source for a random method, keyed by (seed, source,
    output tensor): a tensor's draws depend neither on which tensors are computed before it
    nor on how it is chunked."""
    from mergekit_math.methods.masks import MaskStream

    if not plan.method.random:
        return None
    return [MaskStream.of(plan.seed, s.index, item.out.name) for s in item.group.sources]


@dataclass
class _Ready:
    """One item set up for its ranges (:func:`_setup`); once read and prepared, also its
    inputs as read (``held``, for a preparation that needs whole tensors) and its states."""

    ranges: list[tuple[int, int]]
    finite: FiniteCheck | None
    inputs: _RangeInputs
    generators: list[MaskStream] | None
    fused: FusedRange | None
    prepares: bool  # the method's preparation runs (a whole tensor: only for its kernel)
    holds: bool  # every range is read before the preparation (and merge) start
    slot: int = 0  # its reused buffers' (see _scratch)
    held: dict[int, list[Any]] | None = None
    states: Any = None


def _setup(plan: Plan, item: PlanItem, device: str, run: _Run | None) -> _Ready:
    """The item's ranges, checks, inputs and kernel, and whether it prepares and holds its
    inputs; its buffer slot is 0 until the caller gives it one (``Ahead.slot``)."""
    chunk = run.chunk if run is not None else CHUNK_ELEMENTS
    ranges = item_ranges(plan, item, device, chunk)
    finite = FiniteCheck(plan, item, run.strict_finite, run.warn) if run is not None else None
    inputs = _RangeInputs(plan, item, device, finite)
    generators = _generators(plan, item)
    fused = FusedRange.of(plan, item, device, finite, generators)
    if fused is not None and run is not None and run.phase is not None:
        fused.phase = run.phase(item.out.name)
    chunking = plan.method.chunking
    # a tensor of one range is merged whole, by the fused kernel where there is one (which
    # needs the states too: TIES thresholds), else by the method's whole-tensor path
    prepares = chunking is not None and chunking.prepare is not None and not item.copy_only
    if len(ranges) == 1:
        prepares = prepares and fused is not None
        prepares = prepares and plan.method.chunkable(item.shared, item.params)
    # a compiled selection reads the magnitudes from the inputs as read, as do compiled
    # statistics: read them once
    holds = prepares and fused is not None
    if holds:
        assert chunking is not None  # prepares
        buffers = run is not None and chunking.buffers(item.shared, item.params) > 0
        holds = chunking.compiled or buffers
    return _Ready(ranges, finite, inputs, generators, fused, prepares, holds)


def _hold_inputs(plan: Plan, item: PlanItem, run: _Run | None, ready: _Ready) -> None:
    if ready.holds:
        ready.held = _hold(plan, item, run, ready.ranges)


def _prepare(plan: Plan, item: PlanItem, run: _Run | None, ready: _Ready) -> None:
    if ready.prepares:
        held = list(ready.held.values()) if ready.held is not None else None
        ready.states = _prepare_states(
            plan,
            item,
            run,
            ready.ranges,
            ready.inputs,
            ready.generators,
            ready.fused,
            held,
            ready.slot,
        )
