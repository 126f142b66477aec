"""Preparations run ahead of the merge loop.

A method whose preparation needs whole tensors (TIES and DELLA thresholds, SCE masks, Arcee
Fusion importances, ...) reads all of an output tensor's inputs, prepares, then merges its
ranges: every pass of the preparation ends at a barrier, its selections run on one thread,
and the reads of the next tensor wait for the last range. On two cores that left the
workers idle for a third of an SCE merge. :class:`Ahead` reads and prepares the next tensors
on threads of its own while the main thread merges the current one, so the passes of two or
three tensors fill each other's gaps on the one worker pool.

Bounded: at most ``depth`` tensors ahead, and the working sets of the tensors in flight
together within the largest tensor's (each of the ``depth + 1`` buffer slots keeps its
reused buffers, so the whole stays under twice the largest working set); reads stay in plan
order (a tensor's reads start when the one before it has read all of its inputs, and never
past a tensor that reads while it merges).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from mergekit_math.merge.ranges import _in_worker
from mergekit_math.merge.types import PlanItem
from mergekit_math.pipeline import Stopped


class Preparable(Protocol):
    """What :func:`~mergekit_math.merge.execution.compute_item` sets up for an item."""

    holds: bool  # its inputs are all read before it merges (so its merge reads nothing)
    slot: int  # its reused buffers' (given here, before it is read and prepared)


class Ahead:
    """Reads and prepares items ahead of the one merging (see the module's docstring).

    ``setup(item)`` makes an item's :class:`Preparable` (cheap, on the main thread);
    ``hold(item, ready)`` reads its inputs (in plan order), ``prepare(item, ready)`` runs its
    method's preparation; ``memory(item)`` is its working set in bytes (asked once).
    """

    def __init__(
        self,
        items: list[PlanItem],
        setup: Callable[[PlanItem], Preparable],
        hold: Callable[[PlanItem, Any], None],
        prepare: Callable[[PlanItem, Any], None],
        memory: Callable[[PlanItem], int],
        depth: int,
        init: Callable[[], None] | None = None,
    ):
        self._items = items
        self._index = {id(item): i for i, item in enumerate(items)}
        self._setup, self._hold, self._prepare = setup, hold, prepare
        self._memory = [memory(item) for item in items]  # per item index
        self.depth = depth
        self._allowance = max(self._memory, default=0)
        self._jobs: dict[int, Future[Any]] = {}
        self._slots: dict[int, int] = {}  # item index -> its slot, while in flight
        self._sizes = [0] * (depth + 1)  # per slot, its largest item's working set
        self._next = 0  # the first item not yet looked at
        self._read: threading.Event | None = None  # set when the last job's reads are done
        self._broken = False
        self._threads = (
            ThreadPoolExecutor(depth, thread_name_prefix="mmath-prepare", initializer=init)
            if depth > 0
            else None
        )
        self.started = 0  # items prepared ahead (for tests and benchmarks)

    def slot(self, item: PlanItem) -> int:
        """The item's buffer slot, distinct from those of the items in flight with it (the
        one merging and those ahead): of the free slots, the smallest that fits the item,
        else the largest (whose buffers then grow). A slot's buffers are as large as its
        largest item's; a slot per size class spares fresh allocations (page faults: the
        embeddings' buffers again for the output head)."""
        i = self._index[id(item)]
        self._slots.pop(i, None)
        taken = set(self._slots.values())
        free = [s for s in range(self.depth + 1) if s not in taken]
        need = self._memory[i]
        fits = [s for s in free if self._sizes[s] >= need]
        size = self._sizes.__getitem__
        slot = min(fits, key=size) if fits else max(free, key=size)
        self._sizes[slot] = max(self._sizes[slot], need)
        self._slots[i] = slot
        return slot

    def take(self, item: PlanItem) -> Any | None:
        """The item's prepared setup (waiting for it), or None if it was not started; the
        items before it are merged (their slots free)."""
        i = self._index[id(item)]
        for k in [k for k in self._slots if k < i]:
            del self._slots[k]
        job = self._jobs.pop(i, None)
        return job.result() if job is not None else None

    def start_after(self, item: PlanItem) -> None:
        """``item`` has read all its inputs: start the items after it that hold theirs,
        within the depth and the memory allowance."""
        if self._threads is None or self._broken:
            return
        i = self._index[id(item)]
        used = self._memory[i] + sum(self._memory[k] for k in self._jobs)
        j = max(self._next, i + 1)
        while j < len(self._items) and j - i <= self.depth:
            after = self._items[j]
            need = self._memory[j]
            if used + need > self._allowance:
                break
            ready = self._setup(after)
            if not ready.holds:  # it reads as it merges: nothing is read past it
                break
            ready.slot = self.slot(after)
            before, self._read = self._read, threading.Event()
            job = self._threads.submit(_in_worker, self._job, after, ready, before, self._read)
            self._jobs[j] = job
            self.started += 1
            used += need
            j += 1
        self._next = j

    def _job(
        self, item: PlanItem, ready: Any, before: threading.Event | None, read: threading.Event
    ) -> Any:
        try:
            if before is not None:
                before.wait()
            if self._broken:
                raise Stopped("an earlier preparation failed")
            self._hold(item, ready)
        except BaseException:
            self._broken = True  # the reader is out of step: nothing more is read here
            raise
        finally:
            read.set()
        self._prepare(item, ready)
        return ready

    def close(self) -> None:
        """Stop: jobs not started are dropped, running ones end (the reader and the worker
        pool must be closed first, so that none waits on them)."""
        self._broken = True
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)
