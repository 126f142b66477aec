"""Per-tensor preparation of chunked methods (TIES thresholds, Breadcrumbs windows, DARE
masks): the method's ``Chunking.prepare`` gets whole deltas assembled range by range into
the reused scratch buffer, and runs its passes on the engine's worker threads."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from mergekit_math.merge.fused import FusedRange
from mergekit_math.merge.host import imported_torch
from mergekit_math.merge.ranges import (
    _buffer,
    _in_worker,
    _RangeInputs,
    _read_range,
    _release_range,
    _Run,
    _scratch,
)
from mergekit_math.merge.types import Plan, PlanItem

if TYPE_CHECKING:
    import torch

    from mergekit_math.methods.masks import MaskStream
    from mergekit_math.methods.selection import StoredMagnitude


def _prepare_states(
    plan: Plan,
    item: PlanItem,
    run: _Run | None,
    ranges: list[tuple[int, int]],
    inputs: _RangeInputs,
    generators: list[MaskStream] | None,
    fused: FusedRange | None = None,
    held: list[list[torch.Tensor]] | None = None,
    slot: int = 0,
) -> Any:
    """The per-input states of the method's ``prepare``, which may need whole deltas: each
    is assembled range by range into the reused scratch buffer (on the worker threads).
    With ``held`` (every range's raw inputs, read once for prepare and merge) and a fused
    kernel, magnitudes are not assembled: the compiled selection reads them from ``held``.
    The reused buffers are ``slot``'s (see :func:`~mergekit_math.merge.ranges._scratch`)."""
    from mergekit_math import kernels
    from mergekit_math.methods import PrepareInputs

    chunking = plan.method.chunking
    assert chunking is not None and chunking.prepare is not None

    def fill(buf: torch.Tensor, i: int, start: int, end: int, absolute: bool) -> None:
        # no finite check: the merge pass reads these ranges again and checks them
        host = run is not None and run.host
        raw = _read_range(plan, item, start, end, only=i, host=host, mapped=run and run.mapped)
        if fused is None or not fused.delta(raw, i, buf[start:end], absolute):
            _, deltas = inputs(raw, shaped=False, check=False, only=i)
            buf[start:end] = deltas[i]
            if absolute:
                buf[start:end].abs_()
        _release_range(plan, item, start, end)

    def full_delta(i: int, absolute: bool = False) -> torch.Tensor:
        buf = _scratch(run, item.out.numel, inputs.compute, inputs.device, slot)
        pool = run.pool if run is not None else None
        if pool is None:
            for start, end in ranges:
                fill(buf, i, start, end, absolute)
        else:
            tasks = [pool.submit(_in_worker, fill, buf, i, s, e, absolute) for s, e in ranges]
            for future in tasks:
                future.result()
        return buf

    def magnitude(i: int) -> torch.Tensor | StoredMagnitude:
        stored = fused.stored(held, i) if held is not None and fused is not None else None
        return stored if stored is not None else full_delta(i, absolute=True)

    def chunk_map(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        pool = run.pool if run is not None else None
        if pool is None:
            return [fn(x) for x in items]
        return [f.result() for f in [pool.submit(_in_worker, fn, x) for x in items]]

    prepare_inputs = PrepareInputs(
        shared=item.shared,  # type: ignore[arg-type]
        params=item.params,
        generators=generators,
        numel=item.out.numel,
        shape=tuple(item.out.shape),
        ranges=ranges,
        delta=full_delta,
        magnitude=magnitude,
        compiled=kernels.enabled(inputs.device, plan.output_elements),
        map=chunk_map,
        held=fused.arrays(held) if fused is not None and held is not None else None,
        buffer=lambda key, numel, dtype: _buffer(run, key, numel, dtype, slot),
    )
    if chunking.compiled and prepare_inputs.held is None:
        raise RuntimeError(f"{plan.method.name}: compiled statistics without the held inputs")
    if run is None or run.pool is None:
        return chunking.prepare(prepare_inputs)
    # The heavy passes go through chunk_map; what is left here (selections over a few % of
    # the elements) runs on one thread: OpenMP fan-out of it next to the reader, the writer
    # and other processes costs more than it gains (5-10x on a busy 2-core machine). A merge
    # on numpy arrays (``run.host``) may not have imported torch: its passes are compiled.
    torch = imported_torch()
    if torch is None:  # not imported, or imported in the background (1 thread, see there)
        return chunking.prepare(prepare_inputs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return chunking.prepare(prepare_inputs)
    finally:
        torch.set_num_threads(threads)
