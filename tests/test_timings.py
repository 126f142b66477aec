"""``MMATH_TIMINGS``: the merge loop's read-wait, compute and write-wait seconds as JSON."""

from __future__ import annotations

import json
import time

from conftest import write_recipe

from mergekit_math.merge import build_plan, execute
from mergekit_math.pipeline import Prefetcher, Unit, WriterThread
from mergekit_math.recipe import load_recipe


def test_prefetcher_and_writer_count_their_time():
    units = [Unit(i, 0, 1, 1, lambda: time.sleep(0.05)) for i in range(4)]
    reader = Prefetcher(units, budget=1)
    for i in range(4):
        reader.get(units[i].key, 0, 1)
        reader.done(1)
    reader.close()
    assert reader.busy >= 0.19  # four reads of 50 ms
    assert reader.waited >= 0.15  # the consumer does nothing else: it waits for them

    import torch

    writer = WriterThread(lambda *_: time.sleep(0.05), budget=4)
    for _ in range(3):
        writer.put(torch.zeros(1))  # 4 bytes: the second put waits for the first write
    writer.finish()
    assert writer.busy >= 0.14
    assert writer.waited >= 0.14


def test_execute_writes_timings_when_asked(tmp_path, zoo, monkeypatch):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: task_arithmetic\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['a']}\n    parameters: {{weight: 0.5}}\n",
    )
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    execute(plan, tmp_path / "plain", progress=False)
    assert not (tmp_path / "t.json").exists()
    monkeypatch.setenv("MMATH_TIMINGS", str(tmp_path / "t.json"))
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    execute(plan, tmp_path / "out", progress=False, chunk_elements=1000)
    got = json.loads((tmp_path / "t.json").read_text())
    assert set(got) == {
        "wall",
        "read_wait",
        "compute",
        "write_wait",
        "read_busy",
        "write_busy",
        "read_wait_ahead",
    }
    assert all(v >= 0 for v in got.values()), got
    parts = got["read_wait"] + got["compute"] + got["write_wait"]
    assert abs(parts - got["wall"]) < 1e-3, got
    assert got["read_busy"] > 0 and got["write_busy"] > 0
