"""The method contract, checked over every registered method.

Driven by the examples each method declares (``MergeMethod.examples``), so a new method is
covered the moment it registers: it runs on tiny tensors; whole and chunked runs of the engine
give the same bytes (when it declares chunking); results do not depend on the thread count;
inputs equal to the base return the base (where it promises that); CPU and CUDA agree (where a
GPU is present); and `mmath methods`, the README table and `recipes/NAME.yaml` know it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import demo_recipe, load_dir, make_model, mmath, write_recipe

from mergekit_math.merge import build_plan, execute, is_chunked
from mergekit_math.methods import Example, MergeInputs, MergeMethod, all_methods
from mergekit_math.methods.masks import MaskStream
from mergekit_math.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
METHODS = {m.name: m for m in all_methods()}
EXAMPLES = [
    pytest.param(m, i, id=f"{m.name}-{i}") for m in METHODS.values() for i in range(len(m.examples))
]
CHUNKED = [p for p in EXAMPLES if p.values[0].chunking is not None]


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _inputs(
    method: MergeMethod[Any, Any],
    example: Example,
    base: torch.Tensor,
    others: list[torch.Tensor],
) -> MergeInputs[Any, Any]:
    """What the engine would hand the method for these tensors and the example's parameters."""
    gens = None
    if method.random:
        gens = [MaskStream(7 + i) for i in range(len(others))]
    tensors = [o - base for o in others] if method.kind == "delta" else [o.clone() for o in others]
    return MergeInputs(
        base=base.clone() if example.base and method.base != "none" else None,
        tensors=tensors,
        params=[method.model_params.model_validate(p) for p in example.models],
        shared=method.shared_params.model_validate(example.shared),
        generators=gens,
    )


def _fine_tunes(base: torch.Tensor, n: int, scale: float = 0.1) -> list[torch.Tensor]:
    return [base + _rand(*base.shape, seed=10 + i) * scale for i in range(n)]


# ------------------------------------------------------------------------------ declaration


@pytest.mark.parametrize("method,index", EXAMPLES)
def test_examples_fit_the_declaration(method, index):
    example = method.examples[index]
    low, high = method.inputs
    assert low <= len(example.models) and (high is None or len(example.models) <= high)
    if method.base == "required":
        assert example.base, "a method that needs a base needs it in every example"
    method.shared_params.model_validate(example.shared)
    for p in example.models:
        method.model_params.model_validate(p)
    assert method.pretty_name and method.paper_url.startswith("https://") and method.description


@pytest.mark.parametrize("method,index", EXAMPLES)
@pytest.mark.parametrize("shape", [(16, 12), (7,)])
def test_runs_on_tiny_tensors(method, index, shape):
    example = method.examples[index]
    base = _rand(*shape, seed=0)
    out = method.merge(_inputs(method, example, base, _fine_tunes(base, len(example.models))))
    assert out.shape == base.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method,index", EXAMPLES)
def test_inputs_equal_to_the_base_return_the_base(method, index):
    example = method.examples[index]
    if method.base == "none" or not example.base or not method.keeps_base:
        pytest.skip("the method promises nothing here (no base, or keeps_base=False)")
    base = _rand(16, 12, seed=0)
    out = method.merge(_inputs(method, example, base, [base.clone()] * len(example.models)))
    assert torch.equal(out, base)


@pytest.mark.parametrize("method,index", EXAMPLES)
def test_result_does_not_depend_on_the_thread_count(method, index):
    """float32 CPU reductions over many elements change with the thread count; ours don't.
    bf16-rounded values make many equal magnitudes (ties for the selections)."""
    example = method.examples[index]
    base = _rand(700, 600, seed=0).bfloat16().float()
    others = [
        base + _rand(700, 600, seed=s).bfloat16().float() * 0.01
        for s in range(1, 1 + len(example.models))
    ]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(method.merge(_inputs(method, example, base, others)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method,index", EXAMPLES)
def test_cuda_gives_the_cpu_result(method, index):
    example = method.examples[index]
    base = _rand(64, 48, seed=0)
    others = _fine_tunes(base, len(example.models))
    cpu = method.merge(_inputs(method, example, base, others))
    gpu = method.merge(_inputs(method, example, base.cuda(), [o.cuda() for o in others]))
    diff = (gpu.cpu().double() - cpu.double()).abs()
    # GPU reductions round differently; a threshold on a rounded value may flip an entry.
    off = int((diff > 1e-5 * (1 + cpu.double().abs())).sum())
    assert off <= max(1, cpu.numel() // 1000), f"{off} entries differ, max {diff.max()}"


# ------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def bf16_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16zoo")
    base = make_model(root / "base", seed=0, dtype="bfloat16", tied=True)
    return {
        "base": base,
        "a": make_model(root / "a", base=base, seed=1, dtype="bfloat16"),
        "b": make_model(root / "b", base=base, seed=2, dtype="bfloat16"),
        "c": make_model(root / "c", base=base, seed=3, dtype="bfloat16"),
    }


def example_recipe(method: MergeMethod[Any, Any], example: Example, zoo: dict) -> str:
    """A recipe running ``example`` on the zoo's fine-tunes (and base when it has one)."""
    models = [
        {"model": str(zoo[k]), "parameters": dict(p)} if p else {"model": str(zoo[k])}
        for k, p in zip(("a", "b", "c"), example.models)
    ]
    recipe: dict[str, Any] = {"merge_method": method.name, "seed": 3, "models": models}
    if example.base:
        recipe["base_model"] = str(zoo["base"])
    if example.shared:
        recipe["parameters"] = dict(example.shared)
    return yaml.safe_dump(recipe, sort_keys=False)


def _run(recipe: Path, out: Path, **kwargs) -> dict[str, torch.Tensor]:
    plan = build_plan(load_recipe(recipe), recipe_dir=recipe.parent)
    execute(plan, out, progress=False, **kwargs)
    return load_dir(out)


@pytest.mark.parametrize("method,index", CHUNKED)
@pytest.mark.parametrize("zoo_name", ["zoo", "bf16_zoo"])
def test_chunked_equals_whole(tmp_path, request, monkeypatch, method, index, zoo_name):
    """A method's chunked merge (small chunks) gives the whole-tensor merge's bits; one
    whose chunking is ``compiled`` runs on chunks with the kernels (forced on here) and is
    compared with the whole-tensor torch path."""
    zoo = request.getfixturevalue(zoo_name)
    example = method.examples[index]
    recipe = write_recipe(tmp_path / "r.yaml", example_recipe(method, example, zoo))
    assert method.chunking is not None
    compiled = method.chunking.compiled
    if compiled:
        monkeypatch.setenv("MMATH_FUSED", "0")
        plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
        assert not any(is_chunked(plan, item) for item in plan.items)
    whole = _run(recipe, tmp_path / "whole", chunk_elements=10**9)
    if compiled:
        monkeypatch.setenv("MMATH_FUSED", "1")
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    if method.chunking.applies(plan.items[0].shared, plan.items[0].params):
        assert all(is_chunked(plan, item) for item in plan.items)
    # 997 elements: chunk boundaries fall mid-row and every tensor has several chunks
    chunked = _run(recipe, tmp_path / "chunked", chunk_elements=997, max_shard_size=30_000)
    assert whole.keys() == chunked.keys()
    for name in whole:
        assert torch.equal(whole[name].view(torch.uint8), chunked[name].view(torch.uint8)), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method,index", EXAMPLES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_merge_matches_cpu(tmp_path, zoo, method, index, dtype):
    text = example_recipe(method, method.examples[index], zoo) + f"dtype: {dtype}\n"
    recipe = write_recipe(tmp_path / "r.yaml", text)
    outs = {}
    for device in ("cpu", "cuda"):
        res = mmath("merge", recipe, tmp_path / device, "--device", device, "-q")
        assert res.exit_code == 0, res.output
        outs[device] = load_dir(tmp_path / device)
    tol = 1e-5 if dtype == "float32" else 1e-2
    for name, cpu in outs["cpu"].items():
        gpu = outs["cuda"][name]
        diff = (gpu.double() - cpu.double()).abs()
        off = int((diff > tol * (1 + cpu.double().abs())).sum())
        assert off <= max(1, cpu.numel() // 1000), f"{name}: {off} entries differ, max {diff.max()}"


# ------------------------------------------------------------------------------ documentation


@pytest.mark.parametrize("name", sorted(METHODS))
def test_listed_documented_and_with_a_recipe(name):
    from mergekit_math.methods.listing import markdown_table

    res = mmath("methods")
    assert res.exit_code == 0 and f"\n{name} " in f"\n{res.output}"
    row = next(r for r in markdown_table().splitlines() if r.startswith(f"| `{name}` |"))
    assert row in (ROOT / "README.md").read_text()
    recipe = ROOT / "recipes" / f"{name}.yaml"
    assert recipe.exists(), f"every method has recipes/{name}.yaml"
    first = recipe.read_text().splitlines()[0]
    assert first.startswith(f"# mmath merge recipes/{name}.yaml "), first
    assert yaml.safe_load(recipe.read_text())["merge_method"] == name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_recipe_runs_on_tiny_models(tmp_path, demo_zoo, name):
    """recipes/NAME.yaml, unchanged but for the model paths, on tiny stand-ins of the demo
    models; the output loads with transformers and computes finite logits."""
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path / "r.yaml", demo_recipe(name, demo_zoo))
    res = mmath("merge", recipe, tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(logits).all()
