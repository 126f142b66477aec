"""Inputs read through mappings (``InputFile.map_view``) under the SIGBUS guard
(``kernels.sigbus``): the same bytes as the copies, and a file truncated under a mapped
range stops the merge with the error a read gives, nothing written."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from conftest import write_recipe

from mergekit_math.io.input_file import InputFile
from mergekit_math.kernels import sigbus
from mergekit_math.merge import build_plan, execute
from mergekit_math.recipe import load_recipe

pytestmark = pytest.mark.skipif(not sigbus.available(), reason="no SIGBUS guard here")

# Maps a 1 MiB file, truncates it to one page, sums the mapping: 4096 under the guard (the
# pages past the new end read as zeros), a SIGBUS without it.
_TRUNCATED = """
import mmap, os, sys
import numpy as np
from mergekit_math.kernels import sigbus
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(b"\\x01" * (1 << 20))
if sys.argv[2] == "guard":
    sigbus.install()
fd = os.open(path, os.O_RDONLY)
view = np.frombuffer(mmap.mmap(fd, 1 << 20, access=mmap.ACCESS_COPY), np.uint8)
os.truncate(path, 4096)
print(int(view.sum()))
if sys.argv[2] == "guard":
    sigbus.uninstall()
    print(int(view[:4096].sum()))
    os.truncate(path, 0)
    print(int(view.sum()))  # the guard is gone: SIGBUS
"""


def test_the_guard_reads_zeros_past_a_truncated_files_end_and_gives_the_action_back(tmp_path):
    run = [sys.executable, "-c", _TRUNCATED, str(tmp_path / "f.bin")]
    bare = subprocess.run([*run, "bare"], capture_output=True, text=True)
    assert bare.returncode == -signal.SIGBUS and bare.stdout == ""
    guarded = subprocess.run([*run, "guard"], capture_output=True, text=True)
    # the last sum (no guard any more, the file now empty) ends the process with SIGBUS
    assert guarded.returncode == -signal.SIGBUS, guarded.stderr
    assert guarded.stdout.split() == ["4096", "4096"]


@pytest.fixture
def models(bf16_zoo):
    return bf16_zoo


def _recipe(tmp_path, models, method: str, params: str):
    return write_recipe(
        tmp_path / f"{method}.yaml",
        f"merge_method: {method}\nbase_model: {models['base']}\nmodels:\n"
        f"  - model: {models['a']}\n    parameters: {params}\n"
        f"  - model: {models['b']}\n    parameters: {params}\n",
    )


@pytest.mark.parametrize(
    ("method", "params"),
    [("task_arithmetic", "{weight: 0.7}"), ("della", "{weight: 1.0, density: 0.5, epsilon: 0.1}")],
)
def test_mapped_reads_merge_the_same_bytes_as_copies(tmp_path, monkeypatch, models, method, params):
    monkeypatch.setenv("MMATH_FUSED", "1")
    maps = []
    map_view = InputFile.map_view

    def spy(self, offset, nbytes):
        maps.append(nbytes)
        return map_view(self, offset, nbytes)

    monkeypatch.setattr(InputFile, "map_view", spy)
    recipe = _recipe(tmp_path, models, method, params)
    outs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("MMATH_MAP", mode)
        before = len(maps)
        outs[mode] = execute(build_plan(load_recipe(recipe)), tmp_path / mode, progress=False)
        assert (len(maps) > before) == (mode == "1")  # every range mapped, or none
        assert not sigbus.installed()  # given back when the merge ends
    files = {m: sorted(p.name for p in outs[m].iterdir()) for m in outs}
    assert files["0"] == files["1"]
    for name in files["0"]:
        if name.endswith(".safetensors"):
            assert (outs["0"] / name).read_bytes() == (outs["1"] / name).read_bytes()


# Runs a merge in which the first shard of model ``a`` is truncated right after its first
# range was mapped, to the page where that range starts, and the range then read (as the
# kernels would read it): the guard makes its pages read as zeros, and the merge stops at the
# next check of that file. In a child process: without the guard a SIGBUS ends it.
_TRUNCATE_WHILE_MAPPED = """
import mmap, os, sys
from mergekit_math.io.input_file import InputFile
from mergekit_math.cli import main
shard = sys.argv[1]
map_view = InputFile.map_view
def truncating(self, offset, nbytes):
    view = map_view(self, offset, nbytes)
    if str(self.path) == shard and os.path.getsize(shard) == self.size:
        os.truncate(shard, offset // mmap.PAGESIZE * mmap.PAGESIZE)
        print("read", int(view.sum()), flush=True)
    return view
InputFile.map_view = truncating
if os.environ.get("UNGUARDED"):  # the test's own check that it needs the guard
    from mergekit_math.kernels import sigbus
    sigbus.install = sigbus.uninstall = lambda: None
sys.argv = ["mmath", "merge", sys.argv[2], sys.argv[3], "-q"]
main()
"""


def test_an_input_truncated_while_mapped_stops_the_merge_with_nothing_written(tmp_path, models):
    import os
    import shutil

    victim = tmp_path / "a"
    shutil.copytree(models["a"], victim)
    recipe = _recipe(tmp_path, {**models, "a": victim}, "task_arithmetic", "{weight: 0.7}")
    out = tmp_path / "out"
    shard = victim / "model.safetensors"
    size = shard.stat().st_size
    code = [sys.executable, "-c", _TRUNCATE_WHILE_MAPPED, str(shard), str(recipe), str(out)]
    env = {**os.environ, "MMATH_FUSED": "1"}
    run = subprocess.run(code, capture_output=True, text=True, env=env)
    assert shard.stat().st_size < size
    assert run.stdout.split() == ["read", "0"]  # zeros past the new end, not a SIGBUS
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert "a/model.safetensors changed during the merge" in lines[0]
    assert "nothing was written" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.mmath-*"))
    shutil.copy(models["a"] / "model.safetensors", shard)
    unguarded = subprocess.run(code, capture_output=True, text=True, env={**env, "UNGUARDED": "1"})
    assert unguarded.returncode == -signal.SIGBUS


def test_an_input_modified_after_its_last_read_stops_the_merge(tmp_path, monkeypatch, models):
    """The last check before the output is committed sees a change after every read."""
    import os
    import shutil

    monkeypatch.setenv("MMATH_FUSED", "1")
    victim = tmp_path / "a"
    shutil.copytree(models["a"], victim)
    recipe = _recipe(tmp_path, {**models, "a": victim}, "task_arithmetic", "{weight: 0.7}")
    plan = build_plan(load_recipe(recipe))
    shard = victim / "model.safetensors"
    last = plan.items[-1].out.name

    def touch(item):
        if item.out.name == last:  # every range is read by now
            st = shard.stat()
            os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    out = tmp_path / "out"
    from mergekit_math.errors import UserError

    with pytest.raises(UserError, match=r"a/model.safetensors changed during the merge .*nothing"):
        execute(plan, out, progress=False, on_tensor=touch)
    assert not out.exists()
