"""Fused CPU kernels: one pass per chunk instead of one torch op per step.

A merge step like task arithmetic is a dozen elementwise torch ops per chunk (upcast each
input, subtract the base, weight, stack, sum, add, round to the output dtype), each a pass
over memory: about 15-20 ns per element on this machine's CPU. The same float32 arithmetic,
in the same order, written as one loop that numba compiles (vectorised, no Python, no GIL)
costs about 0.3 ns per element. The kernels read the inputs as stored (bfloat16 bits or
float32), count non-finite inputs for the finite check, and write the output dtype.

Where a kernel does not apply (no numba, a GPU, float16 storage, inputs with their own
origin, a variant without a kernel), the engine runs the torch path; both give the same
float32 operations, so results agree (to the bit on the cases ``tests/test_kernels.py``
checks). ``MMATH_FUSED=0`` turns the kernels off.

Compiled kernels are cached on disk by numba (next to this package, or the user's cache
folder), so a merge pays the compile time (about a second per kernel) once per machine.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def _numba_ok() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def enabled(device: str) -> bool:
    """Whether fused kernels run for a merge on ``device`` (CPU only; ``MMATH_FUSED=0``
    forces the torch path)."""
    if os.environ.get("MMATH_FUSED", "1") == "0":
        return False
    return device == "cpu" and _numba_ok()
