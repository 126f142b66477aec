"""The merge's own threads (chunk workers, the writer) run torch ops on one intra-op thread.

torch applies a thread's OpenMP thread count at that thread's first parallel op, from the
last ``torch.set_num_threads`` of any thread. A worker that only called
``torch.set_num_threads(1)`` at its start therefore took the main thread's later 2, and its
team's idle member spun on one of the machine's cores (a quarter of a TIES merge's CPU time
on 2 cores). ``execution._one_intra_op_thread`` applies the count before setting it.
"""

from __future__ import annotations

import threading

import pytest
from conftest import write_recipe

from mergekit_math.merge import build_plan
from mergekit_math.merge.execution import _compute_pool, _one_intra_op_thread, stream_plan
from mergekit_math.pipeline import WriterThread
from mergekit_math.recipe import load_recipe


@pytest.fixture
def restore_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _after_a_parallel_op() -> int:
    import torch

    torch.ones(1 << 20).add_(1)
    return torch.get_num_threads()


def test_compute_pool_keeps_one_thread_after_the_main_thread_sets_two(restore_threads):
    import torch

    pool = _compute_pool(1)
    try:
        pool.submit(lambda: None).result()  # the initializer has run
        torch.set_num_threads(2)  # as the main thread does after a tensor's preparation
        assert pool.submit(_after_a_parallel_op).result() == 1
    finally:
        pool.shutdown()


def test_writer_thread_keeps_one_thread_after_the_main_thread_sets_two(restore_threads):
    import torch

    started, seen = threading.Event(), []

    def write(_part, first: bool) -> None:
        if first:  # no torch call here: the thread's count is applied lazily
            started.set()
        else:
            seen.append(_after_a_parallel_op())

    writer = WriterThread(write, budget=1 << 20, init=_one_intra_op_thread)
    writer.put(torch.zeros(1), True)
    assert started.wait(10)
    torch.set_num_threads(2)
    writer.put(torch.zeros(1), False)
    writer.finish()
    assert seen == [1]


class _Recorder:
    """A sink that records, per part, the intra-op threads of the thread writing it."""

    def __init__(self) -> None:
        self.threads: list[tuple[str, int]] = []

    def write_part(self, name, part, last) -> None:  # noqa: ANN001
        self.threads.append((threading.current_thread().name, _after_a_parallel_op()))

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def test_merge_writer_runs_on_one_intra_op_thread(tmp_path, zoo, monkeypatch, restore_threads):
    import torch

    torch.set_num_threads(2)
    monkeypatch.setenv("MMATH_FUSED", "1")  # the compiled TIES preparation, on the pool
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['a']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {zoo['b']}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
    )
    sink = _Recorder()
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    stream_plan(plan, sink, progress=False, chunk_elements=1000, threads=2)
    assert sink.threads and {name for name, _ in sink.threads} == {"mmath-writer"}
    assert {count for _, count in sink.threads} == {1}
    assert torch.get_num_threads() == 2  # the caller's count is left as it was
