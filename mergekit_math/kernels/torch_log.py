"""torch's float32 natural log on the CPU, from the library torch calls, without importing
torch: what Arcee Fusion's preparation needs for mergekit's KLs row by row in cache.

torch (2.13, built with MKL) takes ``log`` of a float32 CPU tensor with MKL's vector math:
``vmsLn(n, in, out, VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE)`` on each contiguous
stretch (aten/src/ATen/cpu/vml.h), an elementwise function whose bits do not depend on how
the array is split. libtorch_cpu.so exports its Fortran interface ``VMSLN_64_`` (the count
and the mode by reference, 64-bit) and ``MKL_Set_Num_Threads_Local``: loaded with ctypes
(about 0.15 s, against 1.0-1.3 s for ``import torch``; the same file torch maps when it is
imported), the compiled kernels call ``VMSLN_64_`` through its address
(:func:`call_ln`), one row at a time on one thread.

:func:`ln_address` is 0 where this is not torch's log: not x86-64, a torch version it was
not checked against (tests/test_torch_log.py), or the library or its symbols missing
(:func:`ln_available` says so without loading it).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

import mergekit_math.kernels.target  # noqa: F401 (numba's target, before any kernel)

# VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE (mkl_vml_defines.h), torch's mode
MODE = np.int64(0x2 | 0x140000 | 0x100)

# torch versions whose log was checked to be this call (tests/test_torch_log.py)
_CHECKED = ("2.13.0",)


@functools.cache
def _library() -> Path | None:
    """torch's libtorch_cpu.so where :func:`ln_address` can be torch's log (x86-64, a
    checked torch), found without importing torch."""
    from mergekit_math.kernels import checked_torch

    if not checked_torch(_CHECKED):
        return None
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libtorch_cpu.so"
    return path if path.is_file() else None


def ln_available() -> bool:
    """Whether :func:`ln_address` can be torch's log here (x86-64, a checked torch, its
    library present), without loading the library."""
    return _library() is not None


@functools.cache
def ln_address() -> int:
    """The address of MKL's ``VMSLN_64_`` in torch's library, loaded here on the first call
    (0: unavailable, see the module docstring)."""
    path = _library()
    if path is None:
        return 0
    try:
        lib = ctypes.CDLL(str(path))
        ln = lib.VMSLN_64_
        threads = lib.MKL_Set_Num_Threads_Local  # by value (the lower-case name: by reference)
    except (OSError, AttributeError):
        return 0
    _THREADS.append(threads)
    return int(ctypes.cast(ln, ctypes.c_void_p).value or 0)


_THREADS: list[ctypes._CFuncPtr] = []  # MKL_Set_Num_Threads_Local, once loaded


@contextlib.contextmanager
def one_mkl_thread() -> Iterator[None]:
    """Keep MKL's calls from the calling thread on that thread meanwhile (the merge's
    workers are its parallelism), then give the thread its setting back: MKL's count is
    also what torch's ``get_num_threads`` reports on that thread. Nothing where the library
    is not loaded."""
    if not _THREADS:
        yield
        return
    previous = _THREADS[0](ctypes.c_int(1))
    try:
        yield
    finally:
        _THREADS[0](ctypes.c_int(previous))


@intrinsic
def call_ln(typingctx, fn, count, src, out, mode):  # noqa: ANN001, ANN201
    """Call ``VMSLN_64_`` at address ``fn`` with the addresses of the count (int64), the
    input and output floats and the mode (int64): all as integers (numba only)."""
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        ptr = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [ptr] * 4)
        target = builder.inttoptr(args[0], fnty.as_pointer())
        builder.call(target, [builder.inttoptr(a, ptr) for a in args[1:]])
        return context.get_dummy_value()

    return sig, codegen
