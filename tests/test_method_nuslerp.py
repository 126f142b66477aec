"""nuslerp: the math written out, its edge cases, validation through `mmath merge`, and the
same recipes through the real mergekit 0.1.5."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_ulp_close, load_dir, make_model, mmath, write_recipe

from mergekit_math.methods import MergeInputs, get_method

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "nuslerp.yaml"


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _merge(tensors, weights, base=None, **shared) -> torch.Tensor:
    m = get_method("nuslerp")
    return m.merge(
        MergeInputs(
            base=base,
            tensors=list(tensors),
            params=[m.model_params.model_validate({"weight": w}) for w in weights],
            shared=m.shared_params.model_validate(shared),
        )
    )


def _slerp_vectors(t: float, a: list[float], b: list[float]) -> list[float]:
    """SLERP of two plain vectors, in Python floats (float64)."""
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    cos = sum(x * y for x, y in zip(a, b)) / (max(na, 1e-7) * max(nb, 1e-7))
    cos = max(-1.0, min(1.0, cos))
    if 1 - cos * cos <= 1e-16:
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    theta = math.acos(cos)
    ca = math.sin((1 - t) * theta) / math.sin(theta)
    cb = math.sin(t * theta) / math.sin(theta)
    return [ca * x + cb * y for x, y in zip(a, b)]


def _reference(t, v0, v1, vectors: str) -> torch.Tensor:
    """SLERP of the whole tensors ('flat'), row by row ('rows') or column by column."""
    a, b = v0.double(), v1.double()
    if vectors == "flat":
        out = _slerp_vectors(t, a.flatten().tolist(), b.flatten().tolist())
        return torch.tensor(out, dtype=torch.float64).reshape(v0.shape)
    if vectors == "columns":
        a, b = a.T, b.T
    rows = [_slerp_vectors(t, ra.tolist(), rb.tolist()) for ra, rb in zip(a, b)]
    out = torch.tensor(rows, dtype=torch.float64)
    return out.T if vectors == "columns" else out


OPTIONS = {
    "flat": {},
    "rows": {"nuslerp_flatten": False},
    "columns": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
}


@pytest.mark.parametrize("vectors", sorted(OPTIONS))
@pytest.mark.parametrize("with_base", [True, False])
def test_reference(vectors, with_base):
    base = _rand(6, 5, seed=0)
    x1 = base + 0.3 * _rand(6, 5, seed=1)
    x2 = base + 0.3 * _rand(6, 5, seed=2)
    w1, w2 = 0.4, 1.2
    t = w2 / (w1 + w2)
    if with_base:
        expect = base.double() + _reference(t, x1 - base, x2 - base, vectors)
        got = _merge([x1, x2], [w1, w2], base, **OPTIONS[vectors])
    else:
        expect = _reference(t, x1, x2, vectors)
        got = _merge([x1, x2], [w1, w2], **OPTIONS[vectors])
    assert got.shape == base.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)


def test_flatten_wins_over_row_wise():
    x1, x2 = _rand(4, 3, seed=1), _rand(4, 3, seed=2)
    flat = _merge([x1, x2], [1, 1])
    assert torch.equal(_merge([x1, x2], [1, 1], nuslerp_row_wise=True), flat)


def test_one_dimensional_tensors_row_wise_is_the_whole_vector():
    x1, x2 = _rand(7, seed=1), _rand(7, seed=2)
    whole = _merge([x1, x2], [0.2, 0.5])
    for options in OPTIONS.values():
        torch.testing.assert_close(_merge([x1, x2], [0.2, 0.5], **options), whole)


def test_endpoints_and_symmetry():
    x1, x2 = _rand(5, 4, seed=1), _rand(5, 4, seed=2)
    torch.testing.assert_close(_merge([x1, x2], [1.0, 0.0]), x1)
    torch.testing.assert_close(_merge([x1, x2], [0.0, 1.0]), x2)
    torch.testing.assert_close(_merge([x1, x2], [0.3, 0.7]), _merge([x2, x1], [0.7, 0.3]))


def test_weights_summing_to_zero_interpolate_halfway():
    x1, x2 = _rand(5, 4, seed=1), _rand(5, 4, seed=2)
    assert torch.equal(_merge([x1, x2], [2.0, -2.0]), _merge([x1, x2], [1.0, 1.0]))


@pytest.mark.parametrize("factor", [2.0, -4.0])
def test_colinear_vectors_interpolate_linearly(factor):
    """Entries ±1/4 in a 4x4 matrix: rows of length 1/2 and a tensor of length 1, exactly, so
    cos θ is exactly ±1 whether flattened or row by row."""
    x1 = 0.25 * torch.sign(_rand(4, 4, seed=1))
    x2 = factor * x1
    t = 0.7 / (0.3 + 0.7)
    linear = (1 - t) * x1 + t * x2
    for options in OPTIONS.values():
        assert torch.equal(_merge([x1, x2], [0.3, 0.7], **options), linear)


def test_nearly_colinear_rows_are_nearly_linear():
    """cos θ rounded short of ±1 takes the spherical branch, which is then almost linear."""
    x1 = _rand(4, 6, seed=1)
    for factor in (2.0, -3.0):
        x2 = factor * x1
        got = _merge([x1, x2], [0.3, 0.7], nuslerp_flatten=False)
        torch.testing.assert_close(got, 0.3 * x1 + 0.7 * x2)


def test_inputs_equal_to_the_base_give_the_base():
    base = _rand(5, 4, seed=0)
    for options in OPTIONS.values():
        assert torch.equal(_merge([base.clone(), base.clone()], [0.3, 0.7], base, **options), base)


def test_one_zero_task_vector_is_a_quarter_turn():
    """A zero vector has no direction: θ = π/2, so the other vector is scaled by sin(tπ/2)."""
    base, x2 = _rand(5, 4, seed=0), _rand(5, 4, seed=2)
    t = 0.25
    got = _merge([base.clone(), x2], [0.75, 0.25], base)
    expect = base.double() + math.sin(t * math.pi / 2) * (x2 - base).double()
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)


def test_zero_rows_stay_finite():
    x1, x2 = _rand(4, 3, seed=1), _rand(4, 3, seed=2)
    x1[1] = 0
    x2[1] = 0
    got = _merge([x1, x2], [0.5, 0.5], nuslerp_flatten=False)
    assert torch.isfinite(got).all() and torch.equal(got[1], torch.zeros(3))


def test_large_tensors_do_not_depend_on_thread_count():
    base = _rand(700, 600, seed=0).bfloat16().float()
    others = [base + 0.01 * _rand(700, 600, seed=s).bfloat16().float() for s in (1, 2)]
    before = torch.get_num_threads()
    try:
        for options in OPTIONS.values():
            results = []
            for threads in (1, 2, 4):
                torch.set_num_threads(threads)
                results.append(_merge(others, [0.3, 0.7], base, **options))
            assert all(torch.equal(results[0], r) for r in results[1:])
    finally:
        torch.set_num_threads(before)


# --- through `mmath merge` ---------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("nuslerp")
    base = make_model(root / "base", layers=4)
    return {
        "base": base,
        "a": make_model(root / "a", base=base, seed=1, noise=0.05),
        "b": make_model(root / "b", base=base, seed=2, noise=0.05),
        "c": make_model(root / "c", base=base, seed=3, noise=0.05),
    }


def _fails(tmp_path: Path, text: str, *expected: str) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", text)
    res = mmath("merge", recipe, tmp_path / "out")
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: ")
    for part in expected:
        assert part in line, line
    assert not (tmp_path / "out").exists()


def test_validation_errors_name_the_yaml_path(tmp_path, models):
    head = f"merge_method: nuslerp\nbase_model: {models['base']}\nmodels:\n"
    a = f"  - model: {models['a']}\n    parameters: {{weight: 0.5}}\n"
    b = f"  - model: {models['b']}\n    parameters: {{weight: 0.5}}\n"
    c = f"  - model: {models['c']}\n    parameters: {{weight: 0.5}}\n"
    _fails(tmp_path, head + a + b + c, "models", "exactly 2")
    _fails(tmp_path, head + a, "models", "exactly 2")
    _fails(tmp_path, head + a + f"  - model: {models['b']}\n", "models[1].parameters.weight")
    _fails(
        tmp_path,
        head + a + b + "parameters: {nuslerp_flaten: false}\n",
        "parameters.nuslerp_flaten",
        "did you mean 'nuslerp_flatten'",
    )
    _fails(tmp_path, head + a + b + "parameters: {nuslerp_row_wise: maybe}\n", "nuslerp_row_wise")


def test_base_listed_among_models_is_the_base(tmp_path, models):
    text = f"""
merge_method: nuslerp
base_model: {models["base"]}
models:
  - model: {models["a"]}
    parameters: {{weight: 0.4}}
  - model: {models["base"]}
  - model: {models["b"]}
    parameters: {{weight: 0.6}}
dtype: float32
"""
    listed = tmp_path / "listed"
    assert mmath("merge", write_recipe(tmp_path / "r1.yaml", text), listed, "-q").exit_code == 0
    unlisted_text = "\n".join(
        ln for ln in text.splitlines() if ln.strip() != f"- model: {models['base']}"
    )
    unlisted = tmp_path / "unlisted"
    res = mmath("merge", write_recipe(tmp_path / "r2.yaml", unlisted_text), unlisted, "-q")
    assert res.exit_code == 0, res.output
    got, ref = load_dir(listed), load_dir(unlisted)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


# --- the real mergekit 0.1.5 -------------------------------------------------------------

CASES = {
    "task_vectors": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.7}}
dtype: float32
""",
    "no_base": """
merge_method: nuslerp
models:
  - model: {a}
    parameters: {{weight: [0.2, 0.9]}}
  - model: {b}
    parameters: {{weight: 0.5}}
dtype: float32
""",
    "rows_base_listed": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {base}
  - model: {a}
    parameters: {{weight: [{{filter: self_attn, value: 0.8}}, {{value: 0.4}}]}}
  - model: {b}
    parameters: {{weight: 1.0}}
parameters: {{nuslerp_flatten: false}}
dtype: float32
""",
    "columns": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: -0.4}}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
dtype: float32
""",
    "columns_no_base_weights_cancel": """
merge_method: nuslerp
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {c}
    parameters: {{weight: -0.5}}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
dtype: float32
""",
}


def _recipe_case(models) -> str:
    text = RECIPE.read_text()
    for demo, key in (("base", "base"), ("math_a", "a"), ("math_b", "b")):
        text = text.replace(f"../demo/{demo}", str(models[key]))
    return text


def _run_mergekit(text: str, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(config, str(out), options=options)


@pytest.mark.mergekit
@pytest.mark.parametrize("case", [*sorted(CASES), "recipe"])
def test_same_tensors_as_mergekit(tmp_path, models, case):
    pytest.importorskip("mergekit", reason="mergekit is not installed")
    if case == "recipe":
        text = _recipe_case(models)
    else:
        text = CASES[case].format(**{k: str(v) for k, v in models.items()})
    recipe = write_recipe(tmp_path / "recipe.yaml", text)
    ours, theirs = tmp_path / "mmath", tmp_path / "mergekit"
    res = mmath("merge", recipe, ours, "-q")
    assert res.exit_code == 0, res.output
    _run_mergekit(text, theirs)
    got, ref = load_dir(ours), load_dir(theirs)
    assert set(got) == set(ref)
    worst = 0.0
    for name in sorted(ref):
        assert got[name].dtype == ref[name].dtype, name
        assert got[name].shape == ref[name].shape, name
        worst = max(worst, assert_ulp_close(got[name], ref[name].float(), ulps=1))
    print(f"nuslerp {case}: max abs diff vs mergekit = {worst:.3g}")
