"""scripts/bench_lib.py: a recipe per registered method, the IO floor, cache eviction, the
disk-space check (the benchmark itself is run by hand, not here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_lib  # noqa: E402

from mergekit_math.merge import build_plan  # noqa: E402
from mergekit_math.methods import all_methods  # noqa: E402
from mergekit_math.recipe import load_recipe  # noqa: E402


def test_every_method_has_a_recipe_that_plans(tmp_path, zoo):
    assert set(bench_lib.RECIPES) == {m.name for m in all_methods()}
    paths = {"B": zoo["base"], "A": zoo["a"], "C": zoo["b"]}
    for method in bench_lib.RECIPES:
        recipe = tmp_path / f"{method}.yaml"
        recipe.write_text(bench_lib.recipe_text(method, paths))
        plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
        assert plan.method.name == method
        # the floor's `cat` reads exactly what the merge reads
        planned = {Path(p).resolve() for p in plan.checkpoints}
        assert planned == {p.resolve() for p in bench_lib.method_inputs(method, paths)}, method


def test_targets_cover_the_issue():
    assert bench_lib.TARGETS["task_arithmetic"] == 1.3
    assert bench_lib.TARGETS["dare_linear"] == 1.5
    assert bench_lib.TARGETS["della"] == 2.0
    assert len(bench_lib.NEWER) == 8 and all(bench_lib.TARGETS[m] == 2.5 for m in bench_lib.NEWER)


def test_floor_times_cat_and_dd_and_cleans_up(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\1" * (1 << 20))
    read, write, slower = bench_lib.floor([f], 3 << 20, tmp_path)
    assert read.seconds > 0 and write.seconds > 0 and slower.seconds >= write.seconds
    assert not (tmp_path / "floor.bin").exists()


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
def test_drop_cache_evicts_the_pages(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"\1" * (4 << 20))
    bench_lib.warm([f])

    def resident() -> int:
        out = subprocess.run(
            ["fincore", "-bno", "RES", str(f)], capture_output=True, text=True, check=True
        )
        return int(out.stdout.split()[0])

    if resident() == 0:
        pytest.skip("this filesystem does not keep the file in the page cache")
    bench_lib.drop_cache([f])
    assert resident() == 0


def test_space_check_refuses_with_the_numbers(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    paths = bench_lib.checkpoint_paths(tmp_path, "7b", bench_lib.SHAPES["7b"])
    one = bench_lib.checkpoint_bytes(bench_lib.SHAPES["7b"])
    assert 13.4e9 < one < 13.6e9  # Llama-2-7B in bf16
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(0, 0, 5 * one + 2 * 10**9))
    assert "needed" in bench_lib.check_space(tmp_path, paths, bench_lib.SHAPES["7b"])
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(0, 0, 4 * one))
    with pytest.raises(SystemExit, match="not enough disk space"):
        bench_lib.check_space(tmp_path, paths, bench_lib.SHAPES["7b"])


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "della"])
def test_selection_timing_runs_the_engines_preparation(zoo, method):
    """The second table's ns/element column calls the methods' preparation directly (the
    run of 21:29 on 2026-12-04 lost its tables to a renamed function): it still runs, on
    a model's embedding, and times something."""
    paths = {"B": zoo["base"], "A": zoo["a"]}
    ns, elements = bench_lib.selection_ns(method, paths, reps=1)
    assert elements > 0 and ns > 0


def test_compile_bytecode_writes_what_an_install_has():
    import importlib.util

    import mergekit_math.merge.execution as execution

    cached = Path(importlib.util.cache_from_source(execution.__file__))
    cached.unlink(missing_ok=True)
    assert "byte-compiled" in bench_lib.compile_bytecode()
    assert cached.is_file() and cached.stat().st_size > 1000
