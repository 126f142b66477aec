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
checks).

Loading numba and the cached kernels costs about half a second and 120 MB of memory, more
than the kernels save on a small merge, so by default they run only where the work is large:
a merge of at least :data:`MIN_ELEMENTS` output elements (its threshold selections follow
the merge's choice), or a selection on its own over that many.
``MMATH_FUSED=0`` turns the kernels off, ``MMATH_FUSED=1`` turns them on whatever the size.

Compiled kernels are cached on disk by numba (next to this package, or the user's cache
folder), so a merge pays the compile time (about a second per kernel) once per machine, and
again after any change to this package's sources (the cache is dated by all of them:
:func:`~mergekit_math.kernels.target.stamp_cache`).
"""

from __future__ import annotations

import functools
import os
import platform


def _declared_versions_ok() -> bool | None:
    """Whether the installed NumPy and llvmlite are in the ranges numba's metadata declares;
    None where that cannot be read (no ``packaging``, or no metadata for numba or for one it
    needs: ``PackageNotFoundError`` is an ImportError)."""
    from importlib import metadata

    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:
        return None
    try:
        for text in metadata.requires("numba") or []:
            need = Requirement(text)
            if need.marker is not None and not need.marker.evaluate({"extra": ""}):
                continue
            if not need.specifier.contains(metadata.version(need.name), prereleases=True):
                return False
    except (ImportError, InvalidRequirement):
        return None
    return True


@functools.cache
def _numba_ok() -> bool:
    """Whether numba is installed with the versions of NumPy and llvmlite it declares (what
    its import checks first), read from the packages' metadata without importing it: its
    import (0.15-0.18 s) then happens on the merge's threads while the first tensors are
    read, not before the reader starts. Where the metadata cannot be read numba is imported
    here, as it was before; one that passes but does not import stops the merge where a
    kernel is loaded, with one error naming ``MMATH_FUSED=0`` (``cli.handler``)."""
    import sys
    from importlib.util import find_spec

    if "numba" in sys.modules:
        return True
    if find_spec("numba") is None:
        return False
    declared = _declared_versions_ok()
    if declared is not None:
        return declared
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


# the size from which the kernels pay for loading them: the torch path costs about 4 ns per
# output element more than the kernels (task arithmetic of three inputs), numba's start-up
# about 0.5 s, so the break-even is near 100 M elements; below a quarter of that the torch
# path is certainly the faster
MIN_ELEMENTS = 32 << 20


def enabled(device: str, elements: int | None = None) -> bool:
    """Whether fused kernels run for work of ``elements`` output elements (a whole merge,
    or one selection; None: any size) on ``device``: CPU only, numba installed, and at
    least :data:`MIN_ELEMENTS` unless ``MMATH_FUSED=1``; ``MMATH_FUSED=0`` forces the
    torch path."""
    mode = os.environ.get("MMATH_FUSED", "")
    if mode == "0" or device != "cpu":
        return False
    if mode != "1" and elements is not None and elements < MIN_ELEMENTS:
        return False
    return _numba_ok()


# torch versions whose CPU float32 sum kernels.torch_order.row_sum was checked against
# (tests/test_torch_order.py)
_TORCH_SUMS_CHECKED = ("2.13.0",)


_X86_64 = ("x86_64", "amd64")


def checked_torch(versions: tuple[str, ...]) -> bool:
    """Whether this is an x86-64 machine (aarch64's vectors have other widths) with an
    installed torch of one of ``versions`` (read from torch's metadata, without importing
    it): where a transcription of torch's CPU arithmetic was checked against torch."""
    from importlib import metadata

    if platform.machine().lower() not in _X86_64:
        return False
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return False
    return version.split("+")[0] in versions


@functools.cache
def torch_sums_known() -> bool:
    """Whether :func:`mergekit_math.kernels.torch_order.row_sum` gives torch's float32 sums
    here: numba installed and :func:`checked_torch`."""
    return _numba_ok() and checked_torch(_TORCH_SUMS_CHECKED)


# torch versions whose CPU float32 softmax kernels.torch_softmax was checked against
# (tests/test_torch_softmax.py)
_TORCH_SOFTMAX_CHECKED = ("2.13.0",)
# torch's own CPU dispatch (aten/src/ATen/native/DispatchStub.cpp): AVX-512 kernels where
# the CPU has these, AVX2 ones where it has avx2 and fma
_AVX512 = ("avx512vl", "avx512bw", "avx512dq", "fma")
_AVX2 = ("avx2", "fma")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def softmax_lanes() -> int:
    """The vector width (16 or 8 floats) of torch's CPU softmax here, where
    :mod:`mergekit_math.kernels.torch_softmax` gives its bits; 0 where the callers must use
    torch: numba missing, not Linux on x86-64, a torch version it was not checked against,
    or a CPU (or ``ATEN_CPU_CAPABILITY``) for which torch runs neither its AVX-512 nor its
    AVX2 kernels. Read without importing torch."""
    if not _numba_ok() or not checked_torch(_TORCH_SOFTMAX_CHECKED):
        return 0
    flags = _cpu_flags()
    widths = {"avx512": 16 if set(_AVX512) <= flags else 0, "avx2": 8 if set(_AVX2) <= flags else 0}
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    if forced is not None:
        return widths.get(forced, 0)
    return widths["avx512"] or widths["avx2"]
