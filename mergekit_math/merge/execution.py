"""Execute a merge plan.

``execute`` streams the items through the method functions into the sharded writer inside
a temporary folder that is renamed into place only when everything is written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_math.errors import UserError
from mergekit_math.io.atomic import atomic_output
from mergekit_math.io.progress import byte_progress
from mergekit_math.io.writer import HostPart
from mergekit_math.merge.ahead import Ahead
from mergekit_math.merge.fused import FusedRange
from mergekit_math.merge.host import (
    InputMaps,
    default_threads,
    import_torch,
    import_torch_in_background,
    imported_torch,
    maps_inputs,
    merged,
    prepares_with_torch,
    release_guard,
    restore_threads,
    runs_on_numpy,
    warm_kernels_in_background,
)
from mergekit_math.merge.host import one_intra_op_thread as _one_intra_op_thread
from mergekit_math.merge.inputs import _item_inputs, _range_bytes
from mergekit_math.merge.memory import (
    CHUNK_ELEMENTS,
    _budgets,
    check_memory,
    item_memory,
    item_ranges,
)
from mergekit_math.merge.ranges import (
    _in_worker,
    _RangeInputs,
    _read_range,
    _release_range,
    _Run,
    _torch_dtype,
)
from mergekit_math.merge.ready import (
    _fetch,
    _hold_inputs,
    _prepare,
    _release,
    _setup,
)
from mergekit_math.merge.sink import Sink, Tee
from mergekit_math.merge.types import Plan, PlanItem
from mergekit_math.pipeline import Prefetcher, Unit, WriterThread

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

    from mergekit_math.methods.masks import MaskStream


def _warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def _take(
    plan: Plan,
    item: PlanItem,
    run: _Run | None,
    start: int,
    end: int,
    held: dict[int, list[torch.Tensor]] | None,
) -> tuple[list[torch.Tensor], int]:
    """A range's raw inputs: from ``held`` where the item's inputs were read for its
    preparation (given up as taken), else fetched."""
    if held is not None:
        return held.pop(start), 0
    return _fetch(plan, item, run, start, end)


def _copy_parts(
    plan: Plan, item: PlanItem, run: _Run | None, ranges: list[tuple[int, int]]
) -> Iterator[torch.Tensor]:
    """The single input of a copied (non-float) tensor, as stored."""
    _, ckpt, name = _item_inputs(plan, item)[0]
    info = ckpt.info(name)
    whole = len(ranges) == 1
    for start, end in ranges:
        raw, nbytes = _fetch(plan, item, run, start, end)
        if run is not None and run.host:
            part: Any = HostPart(raw[0], info.dtype)
        else:
            part = raw[0].reshape(info.shape) if whole else raw[0]
        _release(run, nbytes)
        yield part


@dataclass
class _RangeMerge:
    """The method's result for one range of an item, in the output dtype on the CPU; called
    here or on a worker thread."""

    plan: Plan
    item: PlanItem
    inputs: _RangeInputs
    generators: list[MaskStream] | None
    states: Any
    shaped: bool  # the item is one range: its inputs keep their shapes
    out_dtype: str
    fused: FusedRange | None = None

    def __call__(self, raw: list[Any], start: int, end: int) -> torch.Tensor | HostPart:
        from mergekit_math.methods import MergeInputs

        if self.fused is not None:
            result = self.fused(raw, start, self.states)
            if result is not None:
                _release_range(self.plan, self.item, start, end)
                # a HostPart stays flat: only the writer takes it
                shape = self.shaped and not isinstance(result, HostPart)
                return result.reshape(self.item.out.shape) if shape else result
        base, tensors = self.inputs(raw, shaped=self.shaped)
        result = self.plan.method.merge(
            MergeInputs(
                base=base,
                tensors=tensors,
                params=self.item.params,
                shared=self.item.shared,  # type: ignore[arg-type]
                generators=self.generators,
                offset=start,
                states=self.states,
            )
        )
        result = result.to(_torch_dtype(self.out_dtype)).cpu()
        _release_range(self.plan, self.item, start, end)
        return result


def _serial_parts(
    plan: Plan,
    item: PlanItem,
    run: _Run | None,
    ranges: list[tuple[int, int]],
    merge_range: _RangeMerge,
    held: dict[int, list[torch.Tensor]] | None = None,
) -> Iterator[torch.Tensor]:
    """Each range computed here, in order."""
    for start, end in ranges:
        raw, nbytes = _take(plan, item, run, start, end, held)
        result = merge_range(raw, start, end)
        del raw
        _release(run, nbytes)
        yield result


def _pooled_parts(
    plan: Plan,
    item: PlanItem,
    run: _Run,
    pool: ThreadPoolExecutor,
    ranges: list[tuple[int, int]],
    merge_range: _RangeMerge,
    held: dict[int, list[torch.Tensor]] | None = None,
) -> Iterator[torch.Tensor]:
    """The ranges computed on the worker threads (one intra-op thread each), in order."""
    pending: deque[tuple[Future[torch.Tensor], int]] = deque()
    # Chunks in flight hold read-ahead budget until their result is taken: keep them few
    # enough that the reader can always fetch the next one.
    unit = max(1, _range_bytes(plan, item, *ranges[0]))
    depth = max(1, min(2 * run.workers, run.prefetch.budget.limit // unit - 1))  # type: ignore[union-attr]
    try:
        for start, end in ranges:
            raw, nbytes = _take(plan, item, run, start, end, held)
            pending.append((pool.submit(_in_worker, merge_range, raw, start, end), nbytes))
            del raw
            if len(pending) >= depth:
                future, nbytes = pending.popleft()
                result = future.result()
                _release(run, nbytes)
                yield result
        while pending:
            future, nbytes = pending.popleft()
            result = future.result()
            _release(run, nbytes)
            yield result
    finally:
        for future, _ in pending:
            future.cancel()


def compute_item(
    plan: Plan, item: PlanItem, device: str = "cpu", run: _Run | None = None
) -> Iterator[torch.Tensor]:
    """Read one output tensor's inputs, run the method, yield the result in the output dtype.

    Yields the tensor whole, or as consecutive flat chunks when the method runs on chunks.
    With ``run`` (inside :func:`execute`) the inputs come from its read-ahead thread and
    chunks are computed on its worker threads (the items after it may be read and prepared
    meanwhile: ``run.ahead``); without, everything runs here.
    """
    ahead: Ahead | None = run.ahead if run is not None else None
    ready = ahead.take(item) if ahead is not None else None
    if ready is None:
        if item.copy_only:
            chunk = run.chunk if run is not None else CHUNK_ELEMENTS
            yield from _copy_parts(plan, item, run, item_ranges(plan, item, device, chunk))
            return
        ready = _setup(plan, item, device, run)
        if ahead is not None:
            ready.slot = ahead.slot(item)
        _hold_inputs(plan, item, run, ready)
        if ahead is not None and ready.holds:
            ahead.start_after(item)
        _prepare(plan, item, run, ready)
    else:  # read and prepared ahead
        assert ahead is not None
        ahead.start_after(item)
    ranges = ready.ranges
    whole = len(ranges) == 1
    merge_range = _RangeMerge(
        plan,
        item,
        ready.inputs,
        ready.generators,
        ready.states,
        whole,
        item.out.dtype,
        ready.fused,
    )
    held, ready.held = ready.held, None
    pool = run.pool if run is not None else None
    if whole or pool is None:
        yield from _serial_parts(plan, item, run, ranges, merge_range, held)
    else:
        assert run is not None
        yield from _pooled_parts(plan, item, run, pool, ranges, merge_range, held)
    if ready.finite is not None:
        ready.finite.report()


def _units(
    plan: Plan, device: str, chunk: int, pin: bool, host: bool, mapped: InputMaps | None
) -> Iterator[Unit]:
    """What the read-ahead thread reads: every range of every item, in the order computed."""
    return (
        Unit(
            item,
            start,
            end,
            _range_bytes(plan, item, start, end),
            partial(_read_range, plan, item, start, end, pin, host=host, mapped=mapped),
        )
        for item in plan.items
        for start, end in item_ranges(plan, item, device, chunk)
    )


def _host_thread() -> None:
    """:func:`_one_intra_op_thread` where torch is imported; nothing in a merge on numpy
    arrays that has not imported it (a fallback that imports it sets one thread then,
    :func:`~mergekit_math.merge.host.as_torch`)."""
    if imported_torch() is not None:
        _one_intra_op_thread()


def _compute_pool(workers: int) -> ThreadPoolExecutor:
    """The worker threads for chunks, with one intra-op thread each so that ``workers``
    chunks in parallel do not oversubscribe the cores."""
    return ThreadPoolExecutor(workers, thread_name_prefix="mmath-compute", initializer=_host_thread)


def _merge_items(
    plan: Plan,
    device: str,
    run: _Run,
    writes: WriterThread,
    bar: tqdm,
    on_tensor: Callable[[PlanItem], None] | None,
) -> None:
    """Compute every item in plan order and hand its parts to the writer thread."""
    torch = None if run.host else sys.modules["torch"]
    with torch.inference_mode() if torch is not None else contextlib.nullcontext():
        for item in plan.items:
            # through the module global, so that a wrapper set on the module takes effect
            parts = compute_item(plan, item, device, run=run)
            if torch is not None and isinstance(parts, torch.Tensor):
                parts = iter([parts])
            name = item.out.name
            # one part behind, so that the last part of a tensor can be marked as last
            pending = next(parts)
            for part in parts:
                writes.put(pending, name, False)
                bar.update(pending.numel() * pending.element_size())
                pending = part
            writes.put(pending, name, True)
            bar.update(pending.numel() * pending.element_size())
            del pending
            if on_tensor is not None:
                on_tensor(item)


def _verify_inputs(plan: Plan) -> None:
    """Check every input file once more before the output is committed: one changed since
    its last check stops the merge (``UserError``, nothing written). Reads check before and
    after each copy; a mapped range is read while it is computed, so this check is the one
    after it (and where a truncation made a mapped page read as zeros, kernels.sigbus)."""
    for c in plan.checkpoints.values():
        c.verify()  # a pickled checkpoint's files are checked as they are loaded


def _close_inputs(plan: Plan) -> None:
    """Close every checkpoint and patch the plan reads."""
    for c in plan.checkpoints.values():
        c.close()
    for g in {id(i.group): i.group for i in plan.items}.values():
        for s in g.sources:
            if s.patch is not None:
                s.patch.close()


def _write_timings(
    path: str, wall: float, close: float, prefetch: Prefetcher, writes: WriterThread
) -> None:
    """``MMATH_TIMINGS=PATH``: where the merge loop's time went, as JSON (for benchmarks).

    ``read_wait`` and ``write_wait`` are the main thread's waits for the reader and writer
    threads (and for closing the last shard: ``close``), ``compute`` the rest of the loop;
    ``read_busy``/``write_busy`` are the threads' own time in reads and writes;
    ``read_wait_ahead`` the waits for the reader of the preparations run ahead (their
    results' waits count as compute: the preparations compute meanwhile).
    """
    write_wait = writes.waited + close
    compute = wall - prefetch.waited - write_wait
    numbers = {"wall": wall, "read_wait": prefetch.waited, "compute": compute}
    numbers |= {"write_wait": write_wait, "read_busy": prefetch.busy}
    numbers["read_wait_ahead"] = prefetch.waited_elsewhere
    numbers["write_busy"] = writes.busy
    Path(path).write_text(json.dumps({k: round(v, 4) for k, v in numbers.items()}) + "\n")


# Items read and prepared ahead of the one merging (merge.ahead); 0 turns it off.
AHEAD = 2


def _ahead(plan: Plan, device: str, run: _Run, max_memory: int | None) -> Ahead | None:
    """The preparations ahead, on CPU with two workers or more (one worker would only
    queue them), and not under ``--max-memory`` (the buffers of the tensors prepared side
    by side stay allocated, up to twice the largest tensor's working set in all)."""
    if AHEAD <= 0 or run.workers < 2 or device != "cpu" or max_memory is not None:
        return None
    chunking = plan.method.chunking
    if chunking is None or chunking.prepare is None:
        return None
    return Ahead(
        plan.items,
        lambda item: _setup(plan, item, device, run),
        lambda item, ready: _hold_inputs(plan, item, run, ready),
        lambda item, ready: _prepare(plan, item, run, ready),
        lambda item: item_memory(plan, item, device, run.chunk),
        AHEAD,
        init=_host_thread,
    )


def stream_plan(
    plan: Plan,
    sink: Sink,
    *,
    device: str = "cpu",
    progress: bool = True,
    on_tensor: Callable[[PlanItem], None] | None = None,
    max_memory: int | None = None,
    chunk_elements: int | None = None,
    threads: int | None = None,
    strict_finite: bool = False,
    warn: Callable[[str], None] | None = None,
    host: bool = False,
) -> None:
    """Compute every output tensor of the plan into ``sink`` (see :func:`execute` for the
    options): the one merge loop, whatever receives its bytes. The sink is closed at the
    end, or aborted on failure. With ``host`` (a plan :func:`~mergekit_math.merge.host.
    runs_on_numpy` accepts, a sink that takes :class:`HostPart`s) the inputs are read into
    numpy arrays and torch is imported only where needed: on a thread of its own from the
    start where the method's preparation needs it, else where a kernel declines a range;
    either way its thread count is given back afterwards."""
    imported_before = "torch" in sys.modules
    if not host:
        import_torch()
    torch = sys.modules.get("torch")
    if device.startswith("cuda") and not (torch is not None and torch.cuda.is_available()):
        raise UserError("--device cuda: no CUDA device is available here")
    if max_memory is not None:
        check_memory(plan, max_memory, device)
    chunk, io_budget = _budgets(max_memory)
    if chunk_elements is not None:
        chunk = chunk_elements
    pin = device.startswith("cuda")
    bar = byte_progress(plan.write_bytes, f"merge {plan.method.name}", progress)
    workers = threads or default_threads()
    # a plan on numpy arrays whose preparation needs torch: imported while the merge starts
    if host and prepares_with_torch(plan):
        import_torch_in_background()
    mapped = InputMaps() if host and maps_inputs() else None
    warming = warm_kernels_in_background(mapped) if host else None
    units = _units(plan, device, chunk, pin, host, mapped)
    prefetch = Prefetcher(units, io_budget, _host_thread)
    writes = WriterThread(
        lambda part, name, last: sink.write_part(name, part, last), io_budget, init=_host_thread
    )
    pool = _compute_pool(workers)
    run = _Run(
        prefetch, chunk, pool, workers, strict_finite=strict_finite, warn=warn or _warn, host=host
    )
    run.mapped = mapped
    run.phase = getattr(sink, "phase_of", None) if host else None
    run.ahead = _ahead(plan, device, run, max_memory)
    try:
        began = time.perf_counter()
        _merge_items(plan, device, run, writes, bar, on_tensor)
        writes.finish()
        closing = time.perf_counter()
        _verify_inputs(plan)
        sink.close()
        if host:
            merged()
        if os.environ.get("MMATH_TIMINGS"):  # opt-in, for scripts/bench_merge.py
            ended = time.perf_counter()
            timings = (ended - began, ended - closing, prefetch, writes)
            _write_timings(os.environ["MMATH_TIMINGS"], *timings)
    except BaseException as exc:
        writes.abort()
        sink.abort()
        if isinstance(exc, OSError) and exc.errno == errno.EFAULT:
            _verify_inputs(plan)  # a write from a mapped page past a truncated input's end
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        prefetch.close()
        if run.ahead is not None:
            run.ahead.close()
        bar.close()
        _close_inputs(plan)
        if host and not imported_before and "torch" in sys.modules:
            restore_threads(workers)  # its workers ran torch on one thread each
        if warming is not None:
            warming.join()
        release_guard(mapped)


def execute(
    plan: Plan,
    out_dir: Path,
    *,
    device: str = "cpu",
    max_shard_size: int = 5 * 10**9,
    force: bool = False,
    progress: bool = True,
    on_tensor: Callable[[PlanItem], None] | None = None,
    max_memory: int | None = None,
    chunk_elements: int | None = None,
    threads: int | None = None,
    strict_finite: bool = False,
    warn: Callable[[str], None] | None = None,
    also: Sink | None = None,
) -> Path:
    """Run the plan into ``out_dir`` atomically; returns the final path.

    A reader thread reads the inputs ahead (pinned memory for CUDA), the main thread computes
    and a writer thread streams the results into the shards; ``max_memory`` bounds the bytes
    of tensor data held at once by shrinking chunks and read-ahead (checked before any read).
    ``also`` receives every part too (an in-memory model filled by the same merge).

    An input tensor with NaN or inf values gets one warning per tensor and input (``warn``,
    default: a ``warning:`` line on stderr); with ``strict_finite`` it stops the merge with a
    :class:`UserError` and nothing is written.
    """
    from mergekit_math.io.model_files import write_model_files
    from mergekit_math.io.writer import ShardedWriter

    if device.startswith("cuda"):
        import_torch()
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here")
    if max_memory is not None:
        check_memory(plan, max_memory, device)  # before the output folder is made
    out_dir = Path(out_dir)
    with atomic_output(out_dir, force) as tmp:
        writer = ShardedWriter(tmp, [i.out for i in plan.items], max_shard_size)
        sink: Sink = writer if also is None else Tee(writer, also)
        stream_plan(
            plan,
            sink,
            device=device,
            progress=progress,
            on_tensor=on_tensor,
            max_memory=max_memory,
            chunk_elements=chunk_elements,
            threads=threads,
            strict_finite=strict_finite,
            warn=warn,
            host=also is None and runs_on_numpy(plan, device),
        )
        write_model_files(plan, tmp)
    return out_dir.absolute()
