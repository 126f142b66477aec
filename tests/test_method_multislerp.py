"""multislerp: the math written out, its edge cases, validation through `mmath merge`, and
the same recipes through the real mergekit 0.1.5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_ulp_close, load_dir, make_model, mmath, write_recipe

from mergekit_math.methods import MergeInputs, get_method

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "multislerp.yaml"


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _merge(tensors, weights, base=None, **shared) -> torch.Tensor:
    m = get_method("multislerp")
    return m.merge(
        MergeInputs(
            base=base,
            tensors=list(tensors),
            params=[m.model_params.model_validate({"weight": w}) for w in weights],
            shared=m.shared_params.model_validate(shared),
        )
    )


def _reference(tensors, weights, base=None, normalize=True, eps=1e-8) -> torch.Tensor:
    """The barycentre on the sphere, in float64, one flattened vector per input."""
    shape = tensors[0].shape
    vs = [(x if base is None else x - base).double().flatten() for x in tensors]
    w = [float(x) for x in weights]
    if normalize:
        w = [x / sum(w) for x in w]
    lengths = [torch.sqrt((v * v).sum()) for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, lengths)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / torch.sqrt((mean * mean).sum())
    tangent = sum(wi * (u - (u * mean).sum() * mean) for wi, u in zip(w, units))
    angle = torch.sqrt((tangent * tangent).sum()) + eps
    direction = mean * torch.cos(angle) + tangent * torch.sin(angle) / angle
    out = (direction * sum(wi * n for wi, n in zip(w, lengths))).reshape(shape)
    return out if base is None else out + base.double()


@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference(count, with_base, normalize):
    base = _rand(6, 5, seed=0)
    xs = [base + 0.3 * _rand(6, 5, seed=s) for s in range(1, count + 1)]
    weights = [0.5, 0.2, 0.9, 0.4][:count]
    b = base if with_base else None
    got = _merge(xs, weights, b, normalize_weights=normalize)
    expect = _reference(xs, weights, b, normalize=normalize)
    assert got.shape == base.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)


def test_eps_is_used_where_mergekit_uses_it():
    xs = [_rand(3, 4, seed=s) * 1e-3 for s in (1, 2, 3)]
    got = _merge(xs, [0.2, 0.3, 0.5], eps=1e-3)
    torch.testing.assert_close(got.double(), _reference(xs, [0.2, 0.3, 0.5], eps=1e-3))


def test_parallel_inputs_average_their_lengths():
    x = _rand(4, 4, seed=1)
    got = _merge([x, 3 * x], [0.5, 0.5])
    torch.testing.assert_close(got, 2 * x)


def test_one_input_is_returned_as_is():
    base, x = _rand(4, 3, seed=0), _rand(4, 3, seed=1)
    assert torch.equal(_merge([x], [0.3]), x)
    assert torch.equal(_merge([x], [0.3], base), x)


@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("normalize", [True, False])
def test_inputs_equal_to_the_base_give_the_base(count, normalize):
    """All task vectors zero: the base (mergekit returns it for two inputs, raises for more)."""
    base = _rand(5, 4, seed=0)
    got = _merge(
        [base.clone() for _ in range(count)], [0.3] * count, base, normalize_weights=normalize
    )
    assert torch.equal(got, base)
    assert torch.equal(_merge([torch.zeros(3)] * count, [1.0] * count), torch.zeros(3))


def test_a_zero_task_vector_only_shortens_the_result():
    base = _rand(5, 4, seed=0)
    xs = [base + _rand(5, 4, seed=1), base.clone(), base + _rand(5, 4, seed=2)]
    got = _merge(xs, [0.3, 0.4, 0.3], base)
    torch.testing.assert_close(got.double(), _reference(xs, [0.3, 0.4, 0.3], base))


def test_two_antipodal_inputs_fall_back_to_the_linear_combination():
    # Multiples of 1/8: the task vectors come back exactly as v and -v.
    base, v = (torch.round(_rand(4, 3, seed=s) * 8) / 8 for s in (0, 1))
    got = _merge([base + v, base - v], [0.5, 0.5], base)
    assert torch.equal(got, base + (v * 0.5 + (-v) * 0.5))
    got = _merge([v, -v], [1.0, 1.0], normalize_weights=False)
    assert torch.equal(got, v + -v)


def test_directions_that_cancel_out_are_an_error():
    v = _rand(4, 3, seed=1)
    with pytest.raises(ValueError, match="cancel out"):
        _merge([v, -v, torch.zeros_like(v)], [0.4, 0.4, 0.2])


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_long_tensors_take_their_scalars_from_the_gram_matrix(eps):
    """Over 32768 elements the lengths, the mean's length, the components along it and the
    tangent's length are the exact values (float64 from the inputs' Gram matrix), each
    rounded once to float32: the tangent is what the rounded scalars leave of it (zero in
    exact arithmetic: 3.8e-8 here), not the length of the elements' float32 terms (5.1e-8)."""
    import math

    import numpy as np

    from mergekit_math.methods.multislerp import _weights, sphere_terms

    base = _rand(300, 200, seed=0).bfloat16().float()
    xs = [base + 0.01 * _rand(300, 200, seed=s).bfloat16().float() for s in (1, 2, 3)]
    flat = torch.stack([(x - base).flatten() for x in xs])
    weights = torch.tensor([0.5, 0.3, 0.2])
    inputs = MergeInputs(
        base=None,
        tensors=[],
        params=[
            get_method("multislerp").model_params.model_validate({"weight": w}) for w in weights
        ],
        shared=get_method("multislerp").shared_params.model_validate({}),
    )
    w32 = _weights(inputs)
    terms = sphere_terms(flat, w32, eps)

    def f32(x: float) -> float:
        return float(np.float32(x))

    v = flat.double().numpy()
    gram = [[math.fsum(v[j] * v[m]) for m in range(3)] for j in range(3)]
    lengths = [f32(math.sqrt(gram[j][j])) for j in range(3)]
    den = [f32(f32(r) + f32(eps)) for r in lengths]
    w = [float(x) for x in w32]
    c = [w[j] / den[j] for j in range(3)]
    squares = math.fsum(c[j] * c[m] * gram[j][m] for j in range(3) for m in range(3))
    length = f32(math.sqrt(squares))
    along = [
        f32(math.fsum(c[m] * gram[j][m] for m in range(3)) / den[j] / length) for j in range(3)
    ]
    tangent = math.sqrt(squares) * abs(1 - math.fsum(w[j] * along[j] for j in range(3)) / length)
    assert terms.lengths.flatten().tolist() == lengths
    assert terms.mean_length.item() == length
    assert terms.along.flatten().tolist() == along
    assert terms.angle.item() == f32(f32(tangent) + f32(eps))


def test_large_tensors_do_not_depend_on_thread_count():
    base = _rand(700, 600, seed=0).bfloat16().float()
    others = [base + 0.01 * _rand(700, 600, seed=s).bfloat16().float() for s in (1, 2, 3)]
    before = torch.get_num_threads()
    try:
        for b in (base, None):
            results = []
            for threads in (1, 2, 4):
                torch.set_num_threads(threads)
                results.append(_merge(others, [0.5, 0.3, 0.2], b))
            assert all(torch.equal(results[0], r) for r in results[1:])
    finally:
        torch.set_num_threads(before)


def test_check_refuses_weights_without_a_mean():
    m = get_method("multislerp")
    params = [m.model_params.model_validate({"weight": w}) for w in (0.5, -0.5)]
    assert m.check(m.shared_params(), params)[1] == "normalize_weights"
    assert m.check(m.shared_params(normalize_weights=False), params) is None
    zeros = [m.model_params.model_validate({"weight": 0}) for _ in range(3)]
    assert m.check(m.shared_params(normalize_weights=False), zeros)[:2] == (0, "weight")
    assert m.check(m.shared_params(), params[:1]) is None


# --- through `mmath merge` ---------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("multislerp")
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
    head = f"merge_method: multislerp\nbase_model: {models['base']}\nmodels:\n"

    def model(key: str, weight: float | None) -> str:
        params = "" if weight is None else f"    parameters: {{weight: {weight}}}\n"
        return f"  - model: {models[key]}\n" + params

    two = model("a", 0.5) + model("b", -0.5)
    _fails(tmp_path, head + two, "parameters.normalize_weights", "sum to zero")
    three_zero = model("a", 0) + model("b", 0) + model("c", 0)
    _fails(
        tmp_path,
        head + three_zero + "parameters: {normalize_weights: false}\n",
        "models[0].parameters.weight",
    )
    _fails(tmp_path, head + model("a", 0.5) + model("b", None), "models[1].parameters.weight")
    _fails(tmp_path, head + two + "parameters: {eps: 0}\n", "parameters.eps", "greater than 0")
    _fails(tmp_path, head + two + "parameters: {normalise_weights: true}\n", "normalise_weights")


def test_base_listed_among_models_is_the_base(tmp_path, models):
    text = f"""
merge_method: multislerp
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
    "two_with_base": """
merge_method: multislerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.7}}
dtype: float32
""",
    "three_base_listed": """
merge_method: multislerp
base_model: {base}
models:
  - model: {base}
  - model: {a}
    parameters: {{weight: [{{filter: self_attn, value: 0.8}}, {{value: 0.4}}]}}
  - model: {b}
    parameters: {{weight: [0.1, 0.9]}}
  - model: {c}
    parameters: {{weight: 0.5}}
dtype: float32
""",
    "no_base": """
merge_method: multislerp
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 2.0}}
  - model: {c}
    parameters: {{weight: 0.5}}
dtype: float32
""",
    "unnormalized_eps": """
merge_method: multislerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: 0.6}}
parameters: {{normalize_weights: false, eps: 1.0e-4}}
dtype: float32
""",
    "single": """
merge_method: multislerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
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
    print(f"multislerp {case}: max abs diff vs mergekit = {worst:.3g}")
