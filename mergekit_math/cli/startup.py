"""The process around a merge, for its start-up and exit (measurements in
docs/benchmarks.md, "Start-up").

Importing torch is most of a small merge's start-up, and it leaves about 160,000 objects that
the cyclic garbage collector tracks (numpy's included). A merge imports it only where it
needs it, through :func:`mergekit_math.merge.host.import_torch` (collector paused, objects
frozen: about 0.25 s); a merge whose tensors all go through compiled kernels never does.

- :func:`freeze_for_exit`: at exit CPython runs full collections over everything alive, torch's
  objects included, before the process gives its memory back anyway. About 0.5 s (0.3 s
  after a merge without torch: numpy's and numba's objects). Only after a merge has imported
  torch through ``import_torch`` or has run without it: the output is complete and closed by
  then (atexit handlers and the flushing of stdout/stderr still run).

- :func:`tune_malloc`: the merge allocates and frees the same few buffer sizes (256K-element
  chunks, a few MB) on several threads. glibc serves such blocks with fresh ``mmap``s that the
  kernel zeroes page by page and unmaps on free, and trims freed heap; raising both thresholds
  keeps them for reuse. About 10% of a TinyLlama-sized task_arithmetic merge. And one arena:
  by default each thread that allocates gets its own (up to 8 per core), each grows its heap
  to its own thread's peak and their free space is not shared, so the process touches more
  fresh memory in all. Fresh heap is what costs here: each new page faults in zeroed, and on a VM
  that returns freed memory to its host (free page reporting, as the development machine)
  the host supplies it again, ~2 ms per MB. One arena: 10-26% fewer page faults, peak RSS
  3-7% lower, SCE 6.81 -> 6.38 s, TIES 4.41 -> 4.33, Arcee Fusion 6.65 -> 6.45 (medians of
  3; task arithmetic and DARE within noise). The blocks are few and large, so the threads
  do not wait on the arena's lock measurably.

- :func:`exit_after_merge`: after the interpreter's atexit handlers, its teardown (modules'
  and code objects' deallocation) and the C++ libraries' static destructors still ran: 0.045 s
  after a DELLA-linear merge, 0.108 s after Arcee Fusion's, whose loaded torch library
  unregisters every operator (the time from the merge's last line on stdout to the process's
  end, medians of 5). Once the merge has succeeded and only daemon threads are left, the
  console script runs the atexit handlers, flushes stdout and stderr (Python's and C's) and
  ends the process with ``os._exit(0)``: 0.028 and 0.023 s.

- :func:`one_blas_thread`: numpy and scipy (which numba imports) each load an OpenBLAS that
  starts a thread per extra core; nothing here calls BLAS, but those threads spun for 2.7% of
  a TIES merge's CPU samples. One thread: TIES 7.17 -> 6.88 CPU-s, 4.35 -> 4.29 s (medians of
  4).

Importing torch in a background thread while the recipe is planned was measured too and saved
nothing (both are held by the GIL on this 2-core machine), so the import stays in line.
"""

from __future__ import annotations

import gc
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def one_blas_thread() -> None:
    """numpy's and scipy's OpenBLAS on one thread (unless OPENBLAS_NUM_THREADS is set), asked
    before either loads: neither does linear algebra here, yet each starts a server thread
    per extra core when it loads (numba imports scipy), and those spin while the merge runs."""
    import os

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def tune_malloc() -> None:
    """Keep freed blocks up to 8 MB (and up to 64 MB of free heap) for reuse, in one malloc
    arena for all threads (glibc only; elsewhere nothing changes). The environment's
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_ARENA_MAX, when set, win.
    Measured: the 64/512 MB of a first try kept more heap out of core (7B: peak RSS 2.6 GB
    against 2.1 GB) for no measurable speed."""
    import ctypes
    import ctypes.util
    import os

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(_M_MMAP_THRESHOLD, 8 << 20)
        mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, 1)


def freeze_for_exit() -> None:
    """Spare the interpreter's final full collections once a merge has imported torch, or
    has run without it."""
    from mergekit_math.merge.host import imported_here

    if imported_here():
        gc.freeze()


_merge_done = False


def merge_done() -> None:
    """``mmath merge`` finished its one merge (not a multi-stage one, no evaluation or push
    after it) and wrote its last line: :func:`exit_after_merge` may end the process."""
    global _merge_done
    _merge_done = True


def exit_after_merge() -> None:
    """End the process with status 0 now, after :func:`merge_done`: Python's atexit
    handlers run and stdout and stderr are flushed (Python's buffers and C's), the rest of
    the interpreter's teardown and the libraries' static destructors are skipped. Returns
    without doing anything where no merge was done, or where a thread that is not a daemon
    is still alive (the normal exit waits for it); returns after the atexit handlers (run
    once: they are then cleared) where flushing stdout or stderr fails, for the normal exit
    to report it."""
    import atexit
    import os
    import threading

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if not _merge_done or run_exitfuncs is None:
        return
    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a full disk, a closed pipe: the normal exit reports it
            return
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
    os._exit(0)
