"""The threads around the computation: a reader that runs ahead, a writer that runs behind.

Reading (``os.preadv``), writing and torch ops all release the GIL, so one reader thread and
one writer thread overlap file IO with the computation in the main thread. Both are bounded
by bytes in flight, so read-ahead never holds more than its budget whatever the tensor sizes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class Stopped(Exception):
    """The pipeline was shut down while a thread waited."""


class ByteBudget:
    """A counting semaphore in bytes. One request larger than the limit is let through alone."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.used = 0
        self.stopped = False
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self.used and self.used + n > self.limit and not self.stopped:
                self._cond.wait()
            if self.stopped:
                raise Stopped
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._cond.notify_all()


@dataclass
class Unit:
    """One read: a flat element range of one output tensor's inputs."""

    key: Any
    start: int
    end: int
    nbytes: int
    read: Callable[[], Any]


class Prefetcher:
    """Runs ``unit.read()`` for the units in order in a thread, at most ``budget`` bytes ahead.

    :meth:`get` must be called with the units' keys and ranges in the same order; the caller
    :meth:`done` s each unit's bytes once it no longer needs them.
    """

    def __init__(self, units: Iterable[Unit], budget: int, init: Callable[[], None] | None = None):
        self.budget = ByteBudget(budget)
        self._init = init
        self.busy = 0.0  # seconds the thread spent in ``unit.read()``
        # seconds :meth:`get` waited for a unit on the thread that made this (the merge
        # loop's), and on others (preparations ahead, merge.ahead)
        self.waited = 0.0
        self.waited_elsewhere = 0.0
        self._owner = threading.current_thread()
        self._queue: queue.Queue[tuple[Unit, Any, BaseException | None]] = queue.Queue()
        self._thread = threading.Thread(
            target=self._run, args=(iter(units),), name="mmath-reader", daemon=True
        )
        self._thread.start()

    def _run(self, units: Iterable[Unit]) -> None:
        if self._init is not None:
            self._init()
        for unit in units:
            try:
                self.budget.acquire(unit.nbytes)
            except Stopped:
                return
            began = time.perf_counter()
            try:
                data = unit.read()
            except BaseException as exc:  # handed to the consumer, which raises it
                self._queue.put((unit, None, exc))
                return
            self.busy += time.perf_counter() - began
            self._queue.put((unit, data, None))

    def get(self, key: Any, start: int, end: int) -> tuple[Any, int]:
        """The data of the next unit, which must be (key, start, end), and its byte count."""
        began = time.perf_counter()
        got = self._queue.get()
        if threading.current_thread() is self._owner:
            self.waited += time.perf_counter() - began
        else:
            self.waited_elsewhere += time.perf_counter() - began
        unit, data, error = got
        if isinstance(error, Stopped):
            self._queue.put(got)  # for any other waiter
        if error is not None:
            raise error
        if unit.key is not key or unit.start != start or unit.end != end:
            raise RuntimeError(
                f"reader out of step: expected {start}:{end}, got {unit.start}:{unit.end}"
            )
        return data, unit.nbytes

    def done(self, nbytes: int) -> None:
        self.budget.release(nbytes)

    def close(self) -> None:
        """Stop the thread; a :meth:`get` waiting now or later raises :class:`Stopped`."""
        self.budget.stop()
        self._thread.join(timeout=60)
        self._queue.put((None, None, Stopped("the reader was closed")))  # type: ignore[arg-type]


class WriterThread:
    """Performs ``write(*args)`` calls in order in a thread, at most ``budget`` bytes behind.

    An exception in the thread is raised by the next :meth:`put` or by :meth:`finish`.
    """

    def __init__(
        self, write: Callable[..., None], budget: int, init: Callable[[], None] | None = None
    ):
        self._write = write
        self._init = init
        self.busy = 0.0  # seconds the thread spent in ``write``
        self.waited = 0.0  # seconds :meth:`put` and :meth:`finish` waited for the thread
        self.budget = ByteBudget(budget)
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mmath-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._init is not None:
            self._init()
        while True:
            job = self._queue.get()
            if job is None:
                return
            nbytes, args = job
            if self._error is None:
                began = time.perf_counter()
                try:
                    self._write(*args)
                except BaseException as exc:
                    self._error = exc
                    self.budget.stop()
                self.busy += time.perf_counter() - began
            self.budget.release(nbytes)

    def put(self, tensor: torch.Tensor, *args: Any) -> None:
        """Queue ``write(tensor, *args)``; blocks while the queue holds its budget."""
        if self._error is not None:
            raise self._error
        nbytes = tensor.numel() * tensor.element_size()
        began = time.perf_counter()
        try:
            self.budget.acquire(nbytes)
        except Stopped:
            assert self._error is not None
            raise self._error from None
        self.waited += time.perf_counter() - began
        self._queue.put((nbytes, (tensor, *args)))

    def finish(self) -> None:
        """Wait until everything queued is written; raise the thread's error if any."""
        began = time.perf_counter()
        self._queue.put(None)
        self._thread.join()
        self.waited += time.perf_counter() - began
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Drop what is still queued and stop the thread."""
        if self._error is None:
            self._error = Stopped("aborted")
        self.budget.stop()
        self._queue.put(None)
        self._thread.join(timeout=60)
