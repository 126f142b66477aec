"""Chunked execution gives the same bytes as whole-tensor execution.

The engine runs elementwise methods on row-major chunks (read ahead by a thread, written
behind by another); every result here is compared bit for bit with a run that sees each
tensor whole.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import load_dir, write_recipe
from mask_reference import keeps as reference_keeps
from mask_reference import key_of

from mergekit_math.errors import UserError
from mergekit_math.merge import build_plan, execute, is_chunked
from mergekit_math.methods.masks import MaskStream
from mergekit_math.methods.selection import kth_largest
from mergekit_math.methods.sparsify import (
    KeepMask,
    MagnitudeTrim,
    magnitude_prune,
)
from mergekit_math.recipe import load_recipe


def run(recipe: Path, out: Path, **kwargs) -> dict[str, torch.Tensor]:
    plan = build_plan(load_recipe(recipe), recipe_dir=recipe.parent)
    execute(plan, out, progress=False, **kwargs)
    return load_dir(out)


# Whole against chunked runs for every method that declares chunking: tests/test_contract.py.


def test_chunked_with_per_model_origin(tmp_path, zoo):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['a']}\n    origin: {zoo['c']}\n"
        f"    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {zoo['b']}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
    )
    whole = run(recipe, tmp_path / "whole", chunk_elements=10**9)
    chunked = run(recipe, tmp_path / "chunked", chunk_elements=1500)
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name


def test_l1_rescale_and_slerp_run_whole(tmp_path, zoo):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {zoo['base']}\nparameters: {{rescale: l1}}\n"
        f"models:\n  - model: {zoo['a']}\n    parameters: {{weight: 1, density: 0.5}}\n",
    )
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    assert not any(is_chunked(plan, i) for i in plan.items if not i.copy_only)


def test_max_memory_too_small_for_a_whole_tensor_method(tmp_path, zoo):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: slerp\nbase_model: {zoo['base']}\nparameters: {{t: 0.5}}\n"
        f"models:\n  - model: {zoo['base']}\n  - model: {zoo['a']}\n",
    )
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    with pytest.raises(UserError, match=r"--max-memory .*needs about .* slerp whole"):
        execute(plan, tmp_path / "out", progress=False, max_memory=2**20)
    assert not (tmp_path / "out").exists()


def test_max_memory_runs_in_small_chunks(tmp_path, zoo):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['a']}\n    parameters: {{weight: 1, density: 0.4}}\n",
    )
    whole = run(recipe, tmp_path / "whole", chunk_elements=10**9)
    limited = run(recipe, tmp_path / "limited", max_memory=16 * 2**20)
    for name in whole:
        assert torch.equal(whole[name], limited[name]), name


# ----------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("n,density", [(3_000_000, 0.3), (2_500_001, 0.01), (1_500_000, 0.97)])
def test_kth_largest_is_exact_on_large_tensors_with_ties(n, density):
    g = torch.Generator().manual_seed(n)
    # bf16-rounded values: many exact ties, as deltas of bf16 checkpoints have
    values = torch.randn(n, generator=g).to(torch.bfloat16).float().abs()
    k = max(1, int(density * n))
    expect = float(torch.kthvalue(values, n - k + 1).values)
    assert kth_largest(values, k) == expect


def test_kth_largest_when_the_sample_misleads():
    # the strided sample sees only zeros; the counts catch it and the fallback is exact
    n = 2_000_000
    values = torch.zeros(n)
    values[1::2] = torch.arange(n // 2, dtype=torch.float32)
    values[:: n // 65536] = 0
    for k in (1, 1000, n // 2, n):
        assert kth_largest(values, k) == float(torch.kthvalue(values, n - k + 1).values)


def test_magnitude_trim_in_chunks_keeps_exactly_k_with_ties_in_index_order():
    g = torch.Generator().manual_seed(0)
    delta = torch.randint(-3, 4, (40_000,), generator=g).float()  # very many ties
    whole = magnitude_prune(delta, 0.25, None)
    ranges = [(s, min(s + 777, delta.numel())) for s in range(0, delta.numel(), 777)]
    trim = MagnitudeTrim(delta.abs(), 0.25, ranges)
    parts = {s: trim.apply(delta[s:e], s) for s, e in reversed(ranges)}  # any order
    assert torch.equal(torch.cat([parts[s] for s, _ in ranges]), whole)
    assert int(torch.count_nonzero(whole)) == int(0.25 * delta.numel())


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, 1 / 3])
def test_keep_mask_is_the_mask_definition_in_any_chunking(density):
    n = 50_000
    key = key_of(9, 0, "t")
    bounds = [0, 1, 624, 625, 9_999, 16_384, 31_337, n]
    ranges = list(zip(bounds, bounds[1:]))
    mask = KeepMask(MaskStream(key), density)
    parts = {a: mask.take(a, b) for a, b in [ranges[3], ranges[0], *ranges[4:], *ranges[1:3]]}
    got = torch.cat([parts[a] for a, _ in ranges])
    expect = reference_keeps(key, 0, [density] * n)
    for e in sorted(set(random.Random(0).sample(range(n), 300)) | {b - 1 for b in bounds[1:]}):
        assert bool(got[e]) == expect[e], e
    assert torch.equal(got, MaskStream(key).keep(0, n, density))


@pytest.mark.parametrize("mode", ["direct", "buffered", "direct_refused"])
def test_shard_files_are_identical_with_and_without_direct_io(tmp_path, zoo, monkeypatch, mode):
    import errno
    import os

    from mergekit_math.io import writer as writer_module

    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {zoo['a']}\n    parameters: {{weight: 1}}\n",
    )
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    direct = mode != "buffered"
    if mode == "direct_refused":
        real = os.pwrite

        def refuse(fd, data, offset):
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(writer_module.os, "pwrite", refuse)
    real_init = writer_module.ShardedWriter.__init__

    def init(self, folder, tensors, size, direct_=direct):
        real_init(self, folder, tensors, size, direct_)

    monkeypatch.setattr(writer_module.ShardedWriter, "__init__", init)
    execute(plan, tmp_path / "out", progress=False, max_shard_size=50_000)
    if mode == "direct_refused":
        monkeypatch.setattr(writer_module.os, "pwrite", real)
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 2
    source = load_dir(zoo["a"])
    merged = load_dir(tmp_path / "out")
    assert merged.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(merged[name], tensor), name
    for f in files:  # no padding left behind: the header's offsets end where the file ends
        import json
        import struct

        raw = f.read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + size])
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        assert len(raw) == 8 + size + end


def test_preparation_buffers_are_reused_per_key_and_grow_when_short():
    """PrepareInputs.buffer inside a merge: one array per key and slot, the same memory for a
    tensor that fits, a new one for a longer tensor; outside a merge, a fresh array each time."""
    import numpy as np

    from mergekit_math.merge.ranges import _buffer, _Run

    run = _Run(prefetch=None, chunk=1024)
    first = _buffer(run, "a", 1000, np.float32)
    assert first.shape == (1000,) and first.dtype == np.float32
    shorter = _buffer(run, "a", 600, np.float32)
    assert np.shares_memory(first, shorter) and shorter.shape == (600,)
    other = _buffer(run, "b", 600, np.float32)
    assert not np.shares_memory(first, other)
    longer = _buffer(run, "a", 2000, np.float32)
    assert longer.shape == (2000,) and not np.shares_memory(first, longer)
    assert _buffer(run, "a", 2000, np.uint8).dtype == np.uint8  # another dtype: a new one
    # another slot (a tensor prepared beside this one, merge.ahead): its own array
    in_slot = _buffer(run, "a", 600, np.uint8, slot=1)
    assert not np.shares_memory(in_slot, _buffer(run, "a", 600, np.uint8))
    assert np.shares_memory(in_slot, _buffer(run, "a", 600, np.uint8, slot=1))
    assert not np.shares_memory(
        _buffer(None, "a", 10, np.float32), _buffer(None, "a", 10, np.float32)
    )
