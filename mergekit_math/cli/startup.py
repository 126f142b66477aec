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
  keeps them for reuse. About 10% of a TinyLlama-sized task_arithmetic merge.

Importing torch in a background thread while the recipe is planned was measured too and saved
nothing (both are held by the GIL on this 2-core machine), so the import stays in line.
"""

from __future__ import annotations

import gc
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> None:
    """Keep freed blocks up to 8 MB (and up to 64 MB of free heap) for reuse (glibc only;
    elsewhere nothing changes). The environment's MALLOC_MMAP_THRESHOLD_ /
    MALLOC_TRIM_THRESHOLD_, when set, win. Measured: the 64/512 MB of a first try kept more
    heap out of core (7B: peak RSS 2.6 GB against 2.1 GB) for no measurable speed."""
    import ctypes
    import ctypes.util
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc
    mallopt(_M_MMAP_THRESHOLD, 8 << 20)
    mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def freeze_for_exit() -> None:
    """Spare the interpreter's final full collections once a merge has imported torch, or
    has run without it."""
    from mergekit_math.merge.host import imported_here

    if imported_here():
        gc.freeze()
