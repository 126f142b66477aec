"""kernels._numba_ok: whether the compiled kernels can run, read from numba's metadata (its
declared NumPy and llvmlite versions) without importing numba, so that its import overlaps
the merge's first reads; a numba that passes the check but does not import stops the merge
with one error naming the remedy (cli/handler.py). Each check runs in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import make_model, write_recipe


def _python(code: str, *args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})},
    )


_ENABLED = """
import sys
from importlib import metadata
if sys.argv[1] == "no-packaging":  # the metadata cannot be read: numba's import decides
    sys.modules["packaging.requirements"] = None
elif sys.argv[1] != "-":  # this version of numpy in numba's eyes
    real = metadata.version
    metadata.version = lambda name: sys.argv[1] if name == "numpy" else real(name)
from mergekit_math import kernels
print(kernels.enabled("cpu"), "numba" in sys.modules)
"""


def test_the_check_reads_numbas_metadata_without_importing_it():
    """Installed with a NumPy in its declared range: on, numba not imported; with a NumPy
    outside it (numba's import would refuse it): off, as where numba is missing."""
    run = _python(_ENABLED, "-")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "False"]
    run = _python(_ENABLED, "99.0")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False"]


def test_without_packaging_numbas_import_decides():
    run = _python(_ENABLED, "no-packaging")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "True"]


# numba found, its import failing as numba's own check fails on an unsupported NumPy
_BROKEN = """
import importlib.abc, importlib.machinery, sys

class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "numba":
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ImportError("Numba needs NumPy 2.5 or less. Got NumPy 9.9.")

sys.meta_path.insert(0, Broken())
from mergekit_math.cli import main
sys.argv = ["mmath", "merge", sys.argv[1], sys.argv[2], "--quiet"]
main()
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("numba")
    base = make_model(root / "base", seed=0)
    a = make_model(root / "a", base=base, seed=1)
    return write_recipe(
        root / "r.yaml",
        f"merge_method: task_arithmetic\nbase_model: {base}\n"
        f"models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n",
    )


def test_a_numba_that_does_not_import_stops_the_merge_naming_the_remedy(tmp_path, recipe):
    out = tmp_path / "out"
    run = _python(_BROKEN, str(recipe), str(out), env={"MMATH_FUSED": "1"})
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == (
        "error: the compiled kernels do not load (Numba needs NumPy 2.5 or less. Got NumPy "
        "9.9.); MMATH_FUSED=0 runs without them"
    )
    assert "Traceback" not in run.stderr
    assert not out.exists()
    run = _python(_BROKEN, str(recipe), str(out), env={"MMATH_FUSED": "0"})  # the remedy
    assert run.returncode == 0, run.stderr
    assert (out / "model.safetensors").is_file()
