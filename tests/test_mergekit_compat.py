"""The same recipe text through the real mergekit 0.1.5 and through mmath, compared tensor by
tensor: within 1 ulp of the output dtype for the deterministic methods."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from conftest import assert_ulp_close, demo_recipe, make_model, write_recipe
from test_merge import load_dir, mmath

from mergekit_math.methods import all_methods

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed")
pytestmark = pytest.mark.mergekit


def run_mergekit(recipe_text: str, out) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_text))
    run_merge(
        config,
        str(out),
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    base = make_model(root / "base", layers=4)
    return {
        "base": base,
        "a": make_model(root / "a", base=base, seed=1, noise=0.05),
        "b": make_model(root / "b", base=base, seed=2, noise=0.05),
        "c": make_model(root / "c", base=base, seed=3, noise=0.05),
    }


GRADIENT = "[0.1, 0.9]"
FILTERED = "[{filter: self_attn, value: 0.8}, {filter: mlp, value: [0.2, 0.6]}, {value: 0.5}]"

CASES = {
    "linear": """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: {gradient}}}
  - model: {b}
    parameters: {{weight: {filtered}}}
  - model: {c}
    parameters: {{weight: 0.3}}
dtype: float32
""",
    "linear_unnormalized": """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: -0.2}}
parameters: {{normalize: false}}
dtype: float32
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: {filtered}}}
  - model: {b}
    parameters: {{weight: {gradient}}}
parameters: {{lambda: 0.8}}
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {a}
    parameters: {{weight: 0.6, density: {gradient}}}
  - model: {b}
    parameters: {{weight: {filtered}, density: 0.5}}
  - model: {c}
    parameters: {{weight: 0.4, density: 0.3}}
dtype: float32
""",
    "ties_unnormalized_l1": """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.4}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.7}}
parameters: {{normalize: false, rescale: true}}
dtype: float32
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5, density: 0.6, gamma: 0.05}}
  - model: {b}
    parameters: {{weight: {gradient}, density: 0.5}}
dtype: float32
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5, density: 0.6, gamma: 0.02}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: float32
""",
    "slerp": """
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0.0, 0.5, 0.3, 0.7, 1.0]
    - filter: mlp
      value: [1.0, 0.5, 0.7, 0.3, 0.0]
    - value: 0.5
dtype: float32
""",
    "model_stock": """
merge_method: model_stock
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
dtype: float32
""",
    "passthrough": """
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
dtype: float32
""",
    "bf16_task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
dtype: bfloat16
""",
}

# mmath's compute_dtype reproduces mergekit's arithmetic in `dtype` (mergekit ignores the key).
CASES["bf16_compute_task_arithmetic"] = CASES["bf16_task_arithmetic"] + "compute_dtype: bfloat16\n"


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensors_as_mergekit(tmp_path, models, case):
    text = CASES[case].format(gradient=GRADIENT, filtered=FILTERED, **models)
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
        if case == "bf16_task_arithmetic":
            # mergekit computes in `dtype` (bf16: a rounding after every operation); mmath
            # upcasts to float32 and rounds once, so compare both with the exact value.
            exact = _exact_task_arithmetic(models, name)
            ours_err = (got[name].double() - exact).abs()
            theirs_err = (ref[name].double() - exact).abs()
            assert_ulp_close(got[name], exact, ulps=0.5 + 1e-3)
            assert ours_err.sum() <= theirs_err.sum()
            worst = max(worst, (got[name].float() - ref[name].float()).abs().max().item())
            continue
        worst = max(worst, assert_ulp_close(got[name], ref[name].float(), ulps=1))
    print(f"{case}: max abs diff vs mergekit = {worst:.3g}")


def _exact_task_arithmetic(models, name):
    base, a, b = (load_dir(models[k])[name].bfloat16().double() for k in ("base", "a", "b"))
    return base + 0.5 * (a - base) + 0.5 * (b - base)


def test_dare_l1_rescale_matches_mergekit_statistics(tmp_path, models):
    """DARE is random in both tools (different generators), so compare what must agree:
    the kept fraction and, with rescale: l1, the per-tensor L1 norm of the delta."""
    text = """
merge_method: dare_linear
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.3}}
parameters: {{rescale: l1}}
dtype: float32
""".format(**models)
    recipe = write_recipe(tmp_path / "recipe.yaml", text)
    assert mmath("merge", recipe, tmp_path / "mmath", "-q").exit_code == 0
    run_mergekit(text.replace("rescale: l1", "rescale: true"), tmp_path / "mergekit")
    got, ref = load_dir(tmp_path / "mmath"), load_dir(tmp_path / "mergekit")
    base, a = load_dir(models["base"]), load_dir(models["a"])
    for name in ref:
        if ref[name].numel() < 1000:
            continue
        d_ours, d_theirs = got[name] - base[name], ref[name] - base[name]
        l1 = (a[name] - base[name]).abs().sum()
        torch.testing.assert_close(d_ours.abs().sum(), l1, rtol=1e-3, atol=0)
        torch.testing.assert_close(d_theirs.abs().sum(), l1, rtol=1e-3, atol=0)
        for d in (d_ours, d_theirs):
            assert abs((d != 0).float().mean().item() - 0.3) < 0.05


# Random methods (DARE, DELLA) draw from different generators in the two tools: compared by
# their statistics above, not tensor by tensor.
DETERMINISTIC = sorted(m.name for m in all_methods() if not m.random)


def test_every_method_is_a_mergekit_method():
    from mergekit.merge_methods import registry

    assert {m.name for m in all_methods()} <= {m.spec.name for m in registry.registered_methods()}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_method_recipe_same_tensors_as_mergekit(tmp_path, demo_zoo, name):
    """recipes/NAME.yaml through both tools, unchanged but for the model paths and the dtype:
    on float32 checkpoints mergekit and mmath both compute in float32 (mergekit computes in
    ``dtype``, mmath in ``compute_dtype``), so the outputs agree within 1 ulp."""
    text = re.sub(
        r"^(out_)?dtype: \w+", r"\1dtype: float32", demo_recipe(name, demo_zoo), flags=re.M
    )
    # A recipe's tokenizer_source rebuilds the vocabulary from the tokenizer in both tools
    # (79 tokens here, against the tiny models' 96 embedding rows).
    recipe = write_recipe(tmp_path / "recipe.yaml", text)
    ours, theirs = tmp_path / "mmath", tmp_path / "mergekit"
    res = mmath("merge", recipe, ours, "-q")
    assert res.exit_code == 0, res.output
    run_mergekit(text, theirs)
    got, ref = load_dir(ours), load_dir(theirs)
    assert set(got) == set(ref)
    worst = 0.0
    for key in sorted(ref):
        assert got[key].dtype == ref[key].dtype == torch.float32, key
        assert got[key].shape == ref[key].shape, key
        worst = max(worst, assert_ulp_close(got[key], ref[key], ulps=1))
    print(f"recipes/{name}.yaml: max abs diff vs mergekit = {worst:.3g}")
