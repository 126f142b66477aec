"""numba's code generation target for the kernels: this CPU and its features, with 512-bit
vectors preferred where it has AVX-512.

LLVM tunes Intel's AVX-512 cores (Skylake-X to Sapphire Rapids) to prefer 256-bit vectors
(the ``prefer-256-bit`` tuning, against the older parts' frequency drops), and numba takes
that tuning with the host CPU's name, so the kernels' loops ran on 8 float lanes. They are
long all-vector loops, and on this machine (2 cores, AVX-512) 16 lanes are faster:
torch's softmax exponentials 0.70 → 0.57 ns per element, TIES 4.43 → 4.23 s, SCE 5.32 →
4.86 s and Arcee Fusion 5.38 → 5.14 s (docs/benchmarks.md), the same bytes. The width
changes no result: the kernels fix their summation orders and use no fast-math, so LLVM
vectorises only what is exact in any width.

Importing this module sets ``numba.config.CPU_FEATURES`` to the host's features with
``-prefer-256-bit`` where the CPU has AVX-512, before any kernel is decorated (a
dispatcher's creation sets numba's code generator up with the features of that moment):
every module with kernels imports it first. A ``NUMBA_CPU_NAME`` or
``NUMBA_CPU_FEATURES`` of the user's is left as it is. numba's on-disk cache keys its
entries by the features, so the first merge after this change compiles its kernels
again, once.

It also imports numba's ``numba.np.arraymath`` without looking for scipy's BLAS
(:func:`_arraymath_without_scipy`): 0.12-0.17 s less at the start of every merge.

And it dates the kernels' on-disk cache by the whole package (:func:`stamp_cache`). numba
checks a cached kernel against its own source file only, but the kernels inline helpers
from their sibling modules (``scalar``, ``stats``, ``della_lanes``'s vector steps): an edit
to a helper alone, or an upgrade of mmath that changes only a helper and leaves the old
``__pycache__/*.nbi`` files beside the package (pip removes only the files it installed),
would run the cached machine code of the old helper. Here every kernel's cache entry
carries a hash of all the package's sources, so any change to any of them compiles the
kernels again (once).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numba.core.config as _config

PREFER_512 = "-prefer-256-bit"  # an LLVM x86 tuning feature, turned off


def _has_avx512f(features: str) -> bool:
    return "+avx512f" in features.split(",")


def wide_vectors_features() -> str | None:
    """numba's feature string for this host with :data:`PREFER_512` added where it has
    AVX-512 (and numba may use it: ``NUMBA_ENABLE_AVX``); None elsewhere (off x86-64 the
    feature does not exist)."""
    from numba.core.codegen import get_host_cpu_features

    features = get_host_cpu_features()  # "" where LLVM cannot tell
    return features + "," + PREFER_512 if _has_avx512f(features) else None


def has_avx512() -> bool:
    """Whether numba compiles for a CPU with AVX-512 (the features it uses: the user's
    ``NUMBA_CPU_FEATURES`` or the host's), for code that emits its instructions."""
    from numba.core.codegen import get_host_cpu_features

    features = _config.CPU_FEATURES if _config.CPU_FEATURES is not None else get_host_cpu_features()
    return _has_avx512f(features)


def _set() -> None:
    if _config.CPU_NAME is not None or _config.CPU_FEATURES is not None:
        return  # the user's choice
    features = wide_vectors_features()
    if features is not None:
        _config.CPU_FEATURES = features


def _arraymath_without_scipy() -> None:
    """Import numba's ``numba.np.arraymath`` with its check for scipy's BLAS failing.

    numba imports it when it sets up its CPU target (the first kernel call of a process),
    and the module asks at import whether ``scipy.linalg.cython_blas`` imports: where scipy
    is installed that imports scipy.linalg (with pydoc and numpy.f2py), 0.12-0.17 s holding
    the interpreter lock at the start of every merge. Its answer only picks numba's
    ``np.convolve``/``np.correlate`` inner product (BLAS or a plain loop); no kernel here
    uses either, and ``np.dot`` still finds scipy when compiled. So the check is answered
    "no" for the import and numba's function put back after it."""
    import sys

    if "numba.np.arraymath" in sys.modules:
        return
    from numba.np import linalg

    check = getattr(linalg, "ensure_blas", None)
    if check is None:  # another numba: import it as it is
        return

    def no_blas() -> None:
        raise ImportError("scipy's BLAS is not looked for at start-up")

    linalg.ensure_blas = no_blas
    try:
        import numba.np.arraymath as arraymath
    finally:
        linalg.ensure_blas = check
    if getattr(arraymath, "ensure_blas", None) is no_blas:
        arraymath.ensure_blas = check


@functools.lru_cache(maxsize=8)
def _hash_sources(stats: tuple[tuple[str, int, int], ...], folder: str) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stats:
        digest.update(name.encode() + b"\0" + (Path(folder) / name).read_bytes() + b"\0")
    return digest.hexdigest()


def sources_stamp(folder: str) -> str:
    """A hash of every ``.py`` file in ``folder`` (names and contents; read again only when
    a file's size or modification time changes)."""
    stats = tuple(
        (entry.name, entry.stat().st_mtime_ns, entry.stat().st_size)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name)
        if entry.name.endswith(".py") and entry.is_file()
    )
    return _hash_sources(stats, folder)


def stamp_cache(folder: str) -> bool:
    """Make numba date the cached kernels of the modules in ``folder`` by
    :func:`sources_stamp` of the folder instead of their own file's: one subclass of each
    of numba's file-backed cache locators (same cache folders), tried before numba's own,
    that takes only functions defined in ``folder``. Returns False where this numba has no
    such locators (its cache then works as it does), or the user picked the locators
    (``NUMBA_CACHE_LOCATOR_CLASSES``: then numba does not read this list)."""
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    backed = getattr(caching, "_SourceFileBackedLocatorMixin", None)
    if impl is None or backed is None or not isinstance(impl._locator_classes, list):
        return False
    folder = os.path.abspath(folder)
    used = not getattr(_config, "CACHE_LOCATOR_CLASSES", None)
    if any(getattr(c, "stamped_folder", None) == folder for c in impl._locator_classes):
        return used

    class _Stamped:
        stamped_folder = folder

        @classmethod
        def from_function(cls, py_func, py_file):  # noqa: ANN001, ANN206
            if os.path.dirname(os.path.abspath(py_file)) != cls.stamped_folder:
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self) -> str:
            return sources_stamp(self.stamped_folder)

    ours = [
        type(f"Stamped{c.__name__}", (_Stamped, c), {"__module__": __name__})
        for c in impl._locator_classes
        if issubclass(c, backed) and not hasattr(c, "stamped_folder")  # numba's own
    ]
    impl._locator_classes[:0] = ours
    return used


_set()
_arraymath_without_scipy()
stamp_cache(os.path.dirname(os.path.abspath(__file__)))
