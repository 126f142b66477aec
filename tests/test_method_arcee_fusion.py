"""arcee_fusion: the math written out, its edge cases, recipe validation, and the same tensors
as mergekit 0.1.5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_ulp_close, load_dir, make_model, mmath, write_recipe

from mergekit_math.methods.base import MergeInputs, get_method

ROOT = Path(__file__).resolve().parent.parent
METHOD = get_method("arcee_fusion")


def merge(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    return METHOD.merge(
        MergeInputs(
            base=base,
            tensors=[model],
            params=[METHOD.model_params()],
            shared=METHOD.shared_params(),
        )
    )


def reference(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """The method as its description reads, with a full sort for the quartiles."""
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    importance = (model - base).abs() * kl
    ordered = torch.sort(importance.reshape(-1)).values
    n = ordered.numel()
    q1 = ordered[int(0.25 * (n - 1))]
    median = ordered[int(0.5 * (n - 1))]
    q3 = ordered[int(0.75 * (n - 1))]
    threshold = median + 1.5 * (q3 - q1)
    return base + (model - base) * (importance >= threshold).float()


def pair(shape, seed: int, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return base, base + noise * torch.randn(shape, generator=gen)


# ----------------------------------------------------------------------------- the math


@pytest.mark.parametrize("shape", [(6, 10), (3, 4, 5), (17,), (1,), (), (64, 33)])
def test_matches_the_written_out_math(shape):
    base, model = pair(shape, seed=len(shape) + sum(shape))
    got = merge(base, model)
    assert got.shape == base.shape and got.dtype == base.dtype
    assert torch.equal(got, reference(base, model))


def test_takes_only_the_outliers():
    base, model = pair((32, 16), seed=3)
    got = merge(base, model)
    taken = got != base
    assert 0 < taken.sum() < 0.25 * base.numel()  # above Q3 at least: a small minority
    assert torch.equal(got[taken], model[taken])  # taken entries are base + delta exactly here
    assert torch.equal(got[~taken], base[~taken])


def test_vector_is_one_row():
    """A 1-D tensor (norm, bias) is one row: one KL for the whole vector."""
    base, model = pair((40,), seed=5)
    p, q = F.softmax(model, dim=0) + 1e-8, F.softmax(base, dim=0) + 1e-8
    kl = (p * (p / q).log()).sum()
    importance = (model - base).abs() * kl
    got = merge(base, model)
    taken = got != base
    # Taken entries are exactly those with the largest importance.
    assert taken.any()
    assert importance[taken].min() > importance[~taken].max()


def test_identical_models_give_the_base():
    base, _ = pair((8, 12), seed=7)
    assert torch.equal(merge(base, base.clone()), base)


def test_uniform_row_shift_is_never_taken():
    """softmax ignores a constant added to a row: such a row has KL 0 and importance 0, so
    even a large shift stays out while other rows' outliers come in."""
    gen = torch.Generator().manual_seed(11)
    base = torch.randint(-16, 16, (8, 8), generator=gen).float() / 16  # exact under +1.0
    model = base + 0.3 * torch.randn(8, 8, generator=gen)
    model[:2] = base[:2] + 1.0
    got = merge(base, model)
    assert torch.equal(got[:2], base[:2])
    assert (got[2:] != base[2:]).any()
    assert torch.equal(got, reference(base, model))


def test_mostly_unchanged_tensor_takes_every_change():
    """More than 3/4 of the entries unchanged: Q1 = median = Q3 = 0, the threshold is 0 and
    every entry passes (mergekit's rule, kept as is)."""
    base = torch.zeros(4, 8)
    model = base.clone()
    model[0, :3] = torch.tensor([0.5, -0.25, 2.0])
    got = merge(base, model)
    assert torch.equal(got, model)
    assert torch.equal(got, reference(base, model))


def test_empty_tensor():
    base = torch.zeros(0, 4)
    assert merge(base, base.clone()).shape == (0, 4)


def test_large_tensor_uses_every_entry_exactly_and_no_global_rng():
    """Above 1,000,000 entries mergekit samples with torch.randint; here the quartiles are
    the exact ones of all entries, and the global RNG is neither used nor needed."""
    base, model = pair((1050, 1000), seed=13)
    state = torch.get_rng_state()
    got = merge(base, model)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(got, reference(base, model))  # reference sorts all 1,050,000 entries
    torch.manual_seed(0)
    assert torch.equal(merge(base, model), got)


@pytest.mark.parametrize("shape", [(700, 600), (40000,)])
def test_thread_count_does_not_change_bits(shape):
    base, model = pair(shape, seed=17)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(merge(base, model))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_declared_contract():
    assert METHOD.base == "required"
    assert METHOD.inputs == (1, 1)
    assert METHOD.kind == "tensors"
    # quartiles of the whole tensor, KL of whole rows: chunks of whole rows, only where the
    # fused kernel runs after the preparation over the held inputs
    assert METHOD.chunking is not None and METHOD.chunking.compiled
    assert METHOD.chunking.unit is not None and METHOD.chunking.unit((6, 10)) == 10
    assert METHOD.chunking.unit(()) == 1 and METHOD.fused is not None
    assert not METHOD.random


# ----------------------------------------------------------------------------- recipes


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("arcee_fusion")
    base = make_model(root / "base", layers=2)
    qwen = make_model(root / "qwen", arch="qwen2", layers=2, seed=4)  # has 1-D biases
    return {
        "base": base,
        "a": make_model(root / "a", base=base, seed=1, noise=0.05),
        "b": make_model(root / "b", base=base, seed=2, noise=0.2),
        "qwen": qwen,
        "qwen_ft": make_model(root / "qwen_ft", base=qwen, seed=5, noise=0.05),
    }


def refused(tmp_path: Path, monkeypatch, text: str, *expected: str) -> None:
    """``mmath merge`` fails with exit code 2 and one error line, before reading a tensor."""
    from mergekit_math.io.reader import Checkpoint

    def forbidden(self, name):
        raise AssertionError(f"tensor {name} read during validation")

    monkeypatch.setattr(Checkpoint, "read", forbidden)
    res = mmath("merge", write_recipe(tmp_path / "recipe.yaml", text), tmp_path / "out")
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for part in expected:
        assert part in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_rejects_parameters(tmp_path, monkeypatch, models):
    text = f"""
merge_method: arcee_fusion
base_model: {models["base"]}
models:
  - model: {models["a"]}
    parameters: {{weight: 0.5}}
"""
    refused(tmp_path, monkeypatch, text, "models[0].parameters.weight", "unknown parameter")


def test_rejects_recipe_level_parameters(tmp_path, monkeypatch, models):
    text = f"""
merge_method: arcee_fusion
base_model: {models["base"]}
models:
  - model: {models["a"]}
parameters: {{t: 0.5}}
"""
    refused(tmp_path, monkeypatch, text, "parameters.t", "unknown parameter")


def test_requires_base_model(tmp_path, monkeypatch, models):
    text = f"""
merge_method: arcee_fusion
models:
  - model: {models["a"]}
  - model: {models["b"]}
"""
    refused(tmp_path, monkeypatch, text, "base_model")


def test_takes_exactly_one_other_model(tmp_path, monkeypatch, models):
    text = f"""
merge_method: arcee_fusion
base_model: {models["base"]}
models:
  - model: {models["a"]}
  - model: {models["b"]}
"""
    refused(tmp_path, monkeypatch, text, "models:", "arcee_fusion", "exactly 1")


# ----------------------------------------------------------------------------- mergekit

CASES = {
    "base_listed": """
merge_method: arcee_fusion
base_model: {base}
models:
  - model: {base}
  - model: {a}
dtype: float32
""",
    "base_not_listed": """
merge_method: arcee_fusion
base_model: {base}
models:
  - model: {b}
dtype: float32
""",
    "reversed_roles": """
merge_method: arcee_fusion
base_model: {a}
models:
  - model: {b}
dtype: float32
""",
    "qwen2_biases": """
merge_method: arcee_fusion
base_model: {qwen}
models:
  - model: {qwen_ft}
dtype: float32
""",
}


def run_mergekit(recipe_text: str, out: Path) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_text))
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(config, str(out), options=options)


def _recipe_file(models) -> str:
    text = (ROOT / "recipes" / "arcee_fusion.yaml").read_text()
    for demo, key in (("base", "base"), ("math_a", "a"), ("math_b", "b")):
        text = text.replace(f"../demo/{demo}", str(models[key]))
    return text


@pytest.mark.mergekit
@pytest.mark.parametrize("case", [*sorted(CASES), "recipes/arcee_fusion.yaml"])
def test_same_tensors_as_mergekit(tmp_path, models, case):
    pytest.importorskip("mergekit", reason="mergekit is not installed")
    text = _recipe_file(models) if case.startswith("recipes/") else CASES[case].format(**models)
    recipe = write_recipe(tmp_path / "recipe.yaml", text)
    ours, theirs = tmp_path / "mmath", tmp_path / "mergekit"
    res = mmath("merge", recipe, ours, "-q")
    assert res.exit_code == 0, res.output
    run_mergekit(text, theirs)
    got, ref = load_dir(ours), load_dir(theirs)
    assert set(got) == set(ref)
    worst = 0.0
    for name in sorted(ref):
        assert got[name].dtype == ref[name].dtype, name
        assert got[name].shape == ref[name].shape, name
        worst = max(worst, assert_ulp_close(got[name], ref[name].float(), ulps=1))
    print(f"arcee_fusion {case}: max abs diff vs mergekit = {worst:.3g}")
