"""kernels/target.py: numba's target for the kernels prefers 512-bit vectors where the CPU
has AVX-512, whichever kernel module a process imports first, and leaves a user's
NUMBA_CPU_FEATURES alone; the kernels' on-disk cache is dated by every source of the
package. The target checks run in a fresh process (numba sets its code generator up once
per process)."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import pytest

import mergekit_math.kernels as kernels_package
from mergekit_math.kernels.target import PREFER_512, wide_vectors_features

needs_avx512 = pytest.mark.skipif(
    wide_vectors_features() is None, reason="no AVX-512 here: LLVM's own choice stands"
)

# a loop LLVM vectorises in any width: zmm registers show the 512-bit preference
_PROBE = """
import numpy as np
from numba import njit

@njit
def probe(a):
    s = 0
    for i in range(a.shape[0]):
        s += a[i] * 3
    return s

probe(np.arange(64, dtype=np.int32))
asm = probe.inspect_asm(probe.signatures[0])
import numba.core.config as config
print("zmm" in asm, config.CPU_FEATURES)
"""


def _kernel_modules() -> list[str]:
    return [
        m.name
        for m in pkgutil.iter_modules(kernels_package.__path__)
        if m.name != "target" and not m.name.startswith("_")
    ]


def _probe(first: str) -> list[str]:
    """The command running :data:`_PROBE` after importing kernel module ``first`` (none:
    numba alone)."""
    code = f"import mergekit_math.kernels.{first}\n{_PROBE}" if first else _PROBE
    return [sys.executable, "-c", code]


def _run(first: str, env: dict[str, str] | None = None) -> tuple[bool, str]:
    run = subprocess.run(
        _probe(first),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    zmm, features = run.stdout.split(maxsplit=1)
    return zmm == "True", features.strip()


@needs_avx512
def test_every_kernel_module_imported_first_sets_512_bit_vectors():
    """Whichever kernel module a process imports first, later compiled code (the kernels'
    and any other) uses 512-bit registers and the host's features end with the
    preference."""
    modules = _kernel_modules()
    assert {"scalar", "philox", "torch_order", "torch_softmax", "ranks"} <= set(modules)
    procs = {
        m: subprocess.Popen(
            _probe(m),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for m in modules
    }
    for m, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        zmm, features = out.split(maxsplit=1)
        assert zmm == "True", m
        assert features.strip() == wide_vectors_features() and features.strip().endswith(
            "," + PREFER_512
        ), m


@needs_avx512
def test_without_the_kernels_llvm_keeps_its_own_choice():
    """The preference comes from importing the kernels: numba alone has no features set
    (what the test above measures is this module's doing, not numba's default)."""
    zmm, features = _run("")
    assert features == "None"


def test_a_users_numba_features_are_left_alone():
    """NUMBA_CPU_FEATURES given by the user stays what numba uses."""
    from numba.core.codegen import get_host_cpu_features

    mine = get_host_cpu_features()
    zmm, features = _run("scalar", {"NUMBA_CPU_FEATURES": mine})
    assert features == mine and not features.endswith(PREFER_512)


_NO_SCIPY = """
import sys
import numpy as np
from numba.np import linalg
from mergekit_math.kernels.elementwise import widen_into

out = np.zeros(4, np.float32)
widen_into(np.array([0x3F80] * 4, np.uint16), out)  # sets numba's CPU target up
import numba.np.arraymath as arraymath
print(out.tolist() == [1.0] * 4, "scipy.linalg" in sys.modules, arraymath._HAVE_BLAS,
      arraymath.ensure_blas is linalg.ensure_blas, linalg.ensure_blas.__name__)
"""


def test_a_kernel_call_imports_no_scipy_and_leaves_numba_as_it_was():
    """numba's CPU target set up (a kernel called) without importing scipy.linalg, its BLAS
    check answered "no", and numba's own ``ensure_blas`` back in both modules."""
    pytest.importorskip("scipy")
    run = subprocess.run(
        [sys.executable, "-c", _NO_SCIPY], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "False", "False", "True", "ensure_blas"]


_HELPER = """
from numba import njit


@njit
def value():
    return {}
"""

_KERNEL = """
import os
import sys

from mergekit_math.kernels.target import stamp_cache

if sys.argv[1] == "stamped":
    stamp_cache(os.path.dirname(os.path.abspath(__file__)))
from helper import value
from numba import njit


@njit(cache=True)
def kernel():
    return value()


print(kernel(), len(kernel.stats.cache_hits))
"""


@pytest.mark.parametrize("stamped", [True, False])
def test_an_edited_helper_module_recompiles_the_kernels_that_use_it(tmp_path, stamped):
    """A cached kernel calling a helper from a sibling module, the helper edited (the
    kernel's own file not): with the folder's sources stamped the next process compiles the
    kernel again and returns the new value; numba's own stamp (its file only) serves the
    stale machine code (what ``stamp_cache`` is for: an upgrade that changes only a helper
    of ``kernels`` leaves the old cache files beside the package)."""
    (tmp_path / "kern.py").write_text(_KERNEL)
    mode = "stamped" if stamped else "numba"

    def run() -> list[str]:
        done = subprocess.run(
            [sys.executable, str(tmp_path / "kern.py"), mode],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(tmp_path), "NUMBA_CACHE_DIR": ""},
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    (tmp_path / "helper.py").write_text(_HELPER.format(1))
    assert run() == ["1", "0"]  # compiled
    assert run() == ["1", "1"]  # from the cache
    (tmp_path / "helper.py").write_text(_HELPER.format(2))
    assert run() == (["2", "0"] if stamped else ["1", "1"])
    assert list(tmp_path.glob("__pycache__/kern.kernel-*.nbi"))


def test_the_kernels_are_cached_under_the_packages_stamp():
    """Every cached kernel of the package (numba's dispatchers and the SIGBUS guard's
    ``cfunc``) is located by a stamped locator whose stamp is the hash of all the package's
    sources (so an edit to any of them invalidates it)."""
    import importlib

    from mergekit_math.kernels.target import sources_stamp

    folder = os.path.dirname(os.path.abspath(kernels_package.__file__))
    stamp = sources_stamp(folder)
    cached = {}
    for name in _kernel_modules():
        module = importlib.import_module(f"mergekit_math.kernels.{name}")
        for attr, value in vars(module).items():
            impl = getattr(getattr(value, "_cache", None), "_impl", None)
            if impl is not None:  # a sibling's kernel imported here is the package's too
                cached[f"{name}.{attr}"] = impl.locator
    assert {"ranks.della_decisions", "elementwise.delta_ties", "sigbus._on_sigbus"} <= set(cached)
    for name, locator in cached.items():
        assert locator.stamped_folder == folder, name
        assert locator.get_source_stamp() == stamp, name
