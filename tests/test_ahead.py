"""Preparations run ahead of the merge loop (mergekit_math.merge.ahead): the same bytes as
one tensor at a time, within depth and memory, reads in plan order, failures surfaced."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from conftest import load_dir, write_recipe

from mergekit_math.merge import build_plan, execute
from mergekit_math.merge import execution as engine
from mergekit_math.merge.ahead import Ahead
from mergekit_math.pipeline import Prefetcher, Stopped
from mergekit_math.recipe import load_recipe

RECIPES = {
    "ties": "  density: 0.4\n  weight: 0.5",
    "della": "  density: 0.5\n  epsilon: 0.1\n  weight: 0.5",
    "breadcrumbs": "  density: 0.6\n  gamma: 0.05\n  weight: 0.5",
    "sce": "  select_topk: 0.4",
    "arcee_fusion": None,
}


def _recipe(tmp_path: Path, zoo: dict[str, Path], method: str) -> Path:
    models = ("a",) if method == "arcee_fusion" else ("a", "b")
    params = RECIPES[method]
    text = f"merge_method: {method}\nbase_model: {zoo['base']}\n"
    text += "models:\n" + "".join(f"  - model: {zoo[m]}\n" for m in models)
    if params is not None:
        text += f"parameters:\n{params}\n"
    return write_recipe(tmp_path / f"{method}.yaml", text + "seed: 5\n")


def _merge(recipe: Path, out: Path, threads: dict[str, int]) -> dict[str, torch.Tensor]:
    """The merge on two workers in ranges of 512 elements, counting the threads that ran
    each preparation."""
    real = engine._prepare

    def prepare(plan, item, run, ready):
        name = threading.current_thread().name.split("_")[0]
        threads[name] = threads.get(name, 0) + 1
        return real(plan, item, run, ready)

    engine._prepare = prepare
    try:
        plan = build_plan(load_recipe(recipe), recipe_dir=recipe.parent)
        execute(plan, out, progress=False, chunk_elements=512, threads=2)
    finally:
        engine._prepare = real
    return load_dir(out)


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_merges_prepared_ahead_are_the_bytes_of_one_tensor_at_a_time(
    tmp_path, zoo, monkeypatch, method
):
    monkeypatch.setenv("MMATH_FUSED", "1")  # the compiled preparations, as on real models
    recipe = _recipe(tmp_path, zoo, method)
    ahead: dict[str, int] = {}
    merged = _merge(recipe, tmp_path / "ahead", ahead)
    monkeypatch.setattr(engine, "AHEAD", 0)
    serial: dict[str, int] = {}
    expected = _merge(recipe, tmp_path / "serial", serial)
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(merged[name].view(torch.uint8), tensor.view(torch.uint8)), name
    # tensors were prepared on the threads ahead (not all: the first, and those after a
    # tensor that reads its inputs as it merges, are prepared in turn); none without them
    assert ahead.get("mmath-prepare", 0) >= 5, ahead
    assert sum(ahead.values()) == serial["MainThread"] and set(serial) == {"MainThread"}


def _failing(monkeypatch, name: str, nth: int, exc: BaseException) -> dict[str, int]:
    """``engine.<name>`` raising ``exc`` on its first call ahead from the ``nth`` on."""
    real = getattr(engine, name)
    calls = {"n": 0, "raised ahead": 0}

    def flaky(plan, item, run, ready):
        calls["n"] += 1
        if calls["n"] >= nth and threading.current_thread().name.startswith("mmath-prepare"):
            calls["raised ahead"] += 1
            raise exc
        return real(plan, item, run, ready)

    monkeypatch.setattr(engine, name, flaky)
    return calls


@pytest.mark.parametrize("stage", ["_hold_inputs", "_prepare"])
def test_a_failure_ahead_stops_the_merge_with_its_error_and_leaves_nothing(
    tmp_path, zoo, monkeypatch, stage
):
    """A read or a preparation failing on a thread ahead: the merge raises that error (the
    preparations after it never wait on a reader that stopped), no output is left."""
    monkeypatch.setenv("MMATH_FUSED", "1")
    recipe = _recipe(tmp_path, zoo, "ties")
    calls = _failing(monkeypatch, stage, 6, RuntimeError("disk on fire"))
    out = tmp_path / "sub" / "out"
    plan = build_plan(load_recipe(recipe), recipe_dir=recipe.parent)
    done: list[BaseException] = []

    def merge() -> None:
        try:
            execute(plan, out, progress=False, chunk_elements=512, threads=2)
        except BaseException as exc:
            done.append(exc)

    thread = threading.Thread(target=merge, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the merge hung after a failure ahead"
    assert len(done) == 1 and isinstance(done[0], RuntimeError) and "disk on fire" in str(done[0])
    assert calls["raised ahead"] == 1
    assert not out.exists() and list((tmp_path / "sub").iterdir()) == []


class _Ready:
    def __init__(self, holds: bool):
        self.holds = holds
        self.slot = -1


def _ahead(memory: dict[str, int], holds: set[str], depth: int = 2):
    items = [type("Item", (), {"name": n})() for n in memory]
    log: list[tuple[str, str, int]] = []
    gate = threading.Event()

    def setup(item):
        log.append(("setup", item.name, -1))
        return _Ready(item.name in holds)

    def hold(item, ready):
        log.append(("hold", item.name, ready.slot))

    def prepare(item, ready):
        gate.wait(10)

    ahead = Ahead(items, setup, hold, prepare, lambda item: memory[item.name], depth)
    return ahead, items, log, gate


def test_ahead_keeps_to_its_depth_its_memory_and_stops_at_an_item_that_reads_as_it_merges():
    memory = {"embed": 100, "q": 30, "k": 30, "v": 30, "norm": 1, "o": 30, "head": 100}
    ahead, items, log, gate = _ahead(memory, holds={"embed", "q", "k", "v", "o", "head"})
    embed, q, k, v, norm, o, head = items
    try:
        assert ahead.take(embed) is None  # nothing was started for the first one
        ahead.start_after(embed)  # the largest working set: nothing fits beside it
        assert ahead.started == 0
        assert ahead.take(q) is None
        ahead.start_after(q)
        assert ahead.started == 2 and [e[1] for e in log if e[0] == "setup"] == ["k", "v"]
        gate.set()
        assert ahead.take(k).holds
        ahead.start_after(k)  # norm reads its inputs as it merges: nothing past it
        assert ahead.started == 2 and [e[1] for e in log if e[0] == "setup"][-1] == "norm"
        assert 4 not in ahead._slots  # norm, not started, holds no buffer slot
        assert ahead.take(v).holds and ahead.take(norm) is None
        assert [e[1] for e in log if e[0] == "hold"] == ["k", "v"]  # in plan order
    finally:
        gate.set()
        ahead.close()


def test_ahead_gives_the_items_in_flight_distinct_slots_and_big_items_the_big_slot():
    memory = {"embed": 100, "a": 30, "b": 30, "c": 30, "head": 100}
    ahead, items, log, gate = _ahead(memory, holds=set(memory))
    embed, a, b, c, head = items
    gate.set()
    try:
        assert ahead.take(embed) is None
        big = ahead.slot(embed)
        assert ahead.take(a) is None
        slots = {ahead.slot(a)}
        ahead.start_after(a)  # b and c ahead
        assert ahead.started == 2
        ready_b, ready_c = ahead.take(b), ahead.take(c)
        slots |= {ready_b.slot, ready_c.slot}
        assert len(slots) == 3  # a, b and c at once
        assert ahead.take(head) is None
        assert ahead.slot(head) == big  # the embeddings' slot: no second large set
        assert sorted(ahead._sizes) == [30, 30, 100]
    finally:
        ahead.close()


def test_a_closed_reader_stops_a_waiting_get_and_every_later_one():
    prefetch = Prefetcher([], budget=1)  # nothing will come
    errors: list[BaseException] = []

    def get() -> None:
        try:
            prefetch.get("k", 0, 1)
        except BaseException as exc:
            errors.append(exc)

    waiting = threading.Thread(target=get, daemon=True)
    waiting.start()
    prefetch.close()
    waiting.join(timeout=10)
    get()
    assert not waiting.is_alive() and len(errors) == 2
    assert all(isinstance(e, Stopped) for e in errors)


def test_reader_waits_of_other_threads_are_counted_apart_from_the_merge_loops():
    """MMATH_TIMINGS' read_wait is the merge loop's; a preparation ahead waiting for its
    reads is not the loop waiting (read_wait_ahead)."""
    import time

    from mergekit_math.pipeline import Unit

    def slow() -> bytes:
        time.sleep(0.2)
        return b"x"

    prefetch = Prefetcher([Unit("a", 0, 1, 1, slow), Unit("b", 0, 1, 1, slow)], budget=1)
    try:
        elsewhere = threading.Thread(target=prefetch.get, args=("a", 0, 1))
        elsewhere.start()
        elsewhere.join(timeout=10)
        assert prefetch.waited == 0 and prefetch.waited_elsewhere >= 0.1
        prefetch.done(1)
        assert prefetch.get("b", 0, 1) == (b"x", 1)
        assert prefetch.waited >= 0.1
    finally:
        prefetch.close()
