"""In-memory merges (`--in-memory` sweep points): the model filled by the engine holds the
same bytes as the folder the disk merge writes, its fingerprint is the folder's, the cached
skeleton is rebuilt when the output changes shape, and a model that cannot hold the output
is refused before any tensor is merged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_dir, make_model, write_recipe

from mergekit_math.io.fingerprint import model_fingerprint
from mergekit_math.merge import build_plan, execute
from mergekit_math.merge import in_memory as im
from mergekit_math.recipe import load_recipe


@pytest.fixture(scope="module")
def zoo3(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inmem")
    base = make_model(root / "base", seed=0)
    return {
        "base": base,
        "a": make_model(root / "a", base=base, seed=1),
        "b": make_model(root / "b", base=base, seed=2),
        "tied": make_model(root / "tied", seed=4, tied=True),
        "tied_a": make_model(root / "tied_a", seed=5, tied=True),
    }


@pytest.fixture(autouse=True)
def fresh_skeleton():
    im._cached = None
    yield
    im._cached = None


def plan_of(tmp_path: Path, text: str):
    path = write_recipe(tmp_path / "r.yaml", text)
    return build_plan(load_recipe(path), recipe_dir=tmp_path)


def recipe(method: str, zoo3: dict, extra: str = "", params: str = "weight: 0.6") -> str:
    return (
        f"merge_method: {method}\nbase_model: {zoo3['base']}\n{extra}"
        f"models:\n  - model: {zoo3['a']}\n    parameters: {{{params}}}\n"
        f"  - model: {zoo3['b']}\n    parameters: {{{params}}}\n"
    )


def assert_same_bits(model, folder: Path) -> None:
    state = model.state_dict()
    disk = load_dir(folder)
    assert set(disk) <= set(state)
    for name, expect in disk.items():
        got = state[name]
        assert got.dtype == expect.dtype, name
        assert torch.equal(got.view(-1).view(torch.uint8), expect.view(-1).view(torch.uint8)), name


CASES = {
    "task_arithmetic": ("task_arithmetic", "", "weight: 0.6"),
    "ties": ("ties", "parameters: {lambda: 0.9}\n", "weight: 0.7, density: 0.5"),
    "dare_ties": ("dare_ties", "seed: 11\n", "weight: 0.8, density: 0.4"),
    "bf16": ("task_arithmetic", "dtype: bfloat16\nout_dtype: bfloat16\n", "weight: 0.6"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_bits_as_the_disk_merge(zoo3, tmp_path, case):
    method, extra, params = CASES[case]
    text = recipe(method, zoo3, extra, params)
    disk = execute(plan_of(tmp_path, text), tmp_path / "disk", progress=False)
    # small chunks: the model is filled chunk by chunk, through the same worker threads
    got = im.merge_in_memory(plan_of(tmp_path, text), threads=2)
    assert_same_bits(got.model, disk)
    assert got.fingerprint == model_fingerprint(disk)
    want = "bfloat16" if case == "bf16" else "float32"
    assert {p.dtype for p in got.model.parameters()} == {getattr(torch, want)}
    if method == "dare_ties":  # random: another seed gives other bits
        other = im.merge_in_memory(plan_of(tmp_path, text.replace("seed: 11", "seed: 12")))
        assert other.fingerprint != got.fingerprint


def test_chunked_fill_and_reuse(zoo3, tmp_path, monkeypatch):
    """Tensors delivered in many chunks land at the right offsets; the second point re-fills
    the same skeleton (no rebuild) and ends with its own bytes, not the first point's."""
    import mergekit_math.merge.execution as execution

    real = execution._budgets
    monkeypatch.setattr(execution, "_budgets", lambda m: (1000, real(m)[1]))
    first = recipe("ties", zoo3, "", "weight: 0.3, density: 0.5")
    second = recipe("ties", zoo3, "", "weight: 0.9, density: 0.8")
    one = im.merge_in_memory(plan_of(tmp_path, first), threads=2)
    model = one.model
    two = im.merge_in_memory(plan_of(tmp_path, second), threads=2)
    assert two.model is model  # the skeleton is reused
    assert_same_bits(two.model, execute(plan_of(tmp_path, second), tmp_path / "d2"))
    assert one.fingerprint != two.fingerprint


def test_kept_point_is_the_disk_merge(zoo3, tmp_path):
    text = recipe("dare_ties", zoo3, "seed: 3\n", "weight: 0.8, density: 0.4")
    disk = execute(plan_of(tmp_path, text), tmp_path / "disk", progress=False)
    got = im.merge_in_memory(plan_of(tmp_path, text), keep=tmp_path / "kept")
    files = sorted(p.name for p in disk.iterdir())
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == files
    for name in files:
        assert (tmp_path / "kept" / name).read_bytes() == (disk / name).read_bytes(), name
    assert_same_bits(got.model, disk)
    assert got.fingerprint == model_fingerprint(tmp_path / "kept")


def test_skeleton_rebuilt_when_the_output_changes(zoo3, tmp_path):
    text = recipe("task_arithmetic", zoo3)
    fp32 = im.merge_in_memory(plan_of(tmp_path, text)).model
    bf16 = im.merge_in_memory(plan_of(tmp_path, "out_dtype: bfloat16\n" + text)).model
    assert bf16 is not fp32 and next(bf16.parameters()).dtype == torch.bfloat16
    sliced = (
        "merge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: {zoo3['a']}, layer_range: [0, 2]}}]\n"
    )
    two = im.merge_in_memory(plan_of(tmp_path, sliced))
    assert two.model.config.num_hidden_layers == 2
    assert_same_bits(two.model, execute(plan_of(tmp_path, sliced), tmp_path / "two"))


def test_tied_embeddings(zoo3, tmp_path):
    """A tied model's output has no lm_head.weight: the skeleton's lm_head follows the
    merged embeddings (their storage is shared)."""
    text = (
        f"merge_method: linear\nmodels:\n  - model: {zoo3['tied']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {zoo3['tied_a']}\n    parameters: {{weight: 1}}\n"
    )
    disk = execute(plan_of(tmp_path, text), tmp_path / "disk", progress=False)
    assert "lm_head.weight" not in load_dir(disk)
    got = im.merge_in_memory(plan_of(tmp_path, text))
    assert_same_bits(got.model, disk)
    emb = got.model.get_input_embeddings().weight
    assert torch.equal(got.model.get_output_embeddings().weight, emb)


def test_a_model_that_cannot_hold_the_output_is_refused(zoo3, tmp_path):
    from conftest import make_config
    from transformers import AutoModelForCausalLM

    plan = plan_of(tmp_path, recipe("task_arithmetic", zoo3))
    tensors = [i.out for i in plan.items]
    two_layers = AutoModelForCausalLM.from_config(make_config("llama", False, layers=2))
    with pytest.raises(im.SkeletonMismatch, match="has no tensor model.layers.2"):
        im.ModelSink(two_layers, tensors)
    four_layers = AutoModelForCausalLM.from_config(make_config("llama", False, layers=4))
    with pytest.raises(im.SkeletonMismatch, match="does not write the model's tensor"):
        im.ModelSink(four_layers, tensors)
    tied = AutoModelForCausalLM.from_config(make_config("llama", True, layers=3))
    with pytest.raises(im.SkeletonMismatch, match="tied in the loaded model but both merged"):
        im.ModelSink(tied, tensors)
