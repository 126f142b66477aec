"""karcher: the Karcher mean of the models' directions on the unit sphere, rescaled to their
mean norm. Checked against the math written out here, closed forms (two inputs: the geodesic
midpoint), mergekit's edge-case behaviour, the CLI's validation, and the real mergekit 0.1.5."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_ulp_close, load_dir, mmath, write_recipe

from mergekit_math.methods import MergeInputs, get_method

ROOT = Path(__file__).resolve().parent.parent
METHOD = get_method("karcher")


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def merge(tensors: list[torch.Tensor], **shared) -> torch.Tensor:
    return METHOD.merge(
        MergeInputs(
            base=None,
            tensors=[t.clone() for t in tensors],
            params=[METHOD.model_params() for _ in tensors],
            shared=METHOD.shared_params.model_validate(shared),
        )
    )


def plain_karcher(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5):
    """The method as the paper writes it, in float64, for inputs that are all nonzero."""
    xs = [t.double().flatten() for t in tensors]
    n = len(xs)
    lengths = [x.norm() for x in xs]
    units = [x / r for x, r in zip(xs, lengths)]
    mean = sum(units) / n
    mean = mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            cos = torch.clamp(mean @ u, -1, 1)
            theta = torch.arccos(cos)
            if theta > tol:
                tangent += (theta / torch.sin(theta)) * (u - cos * mean) / n
        step = tangent.norm()
        if step < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * tangent / step
        mean = mean / mean.norm()
    return (sum(lengths) / n * mean).reshape(tensors[0].shape)


# ------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("n", [2, 3, 5])
def test_matches_the_math_written_out(n):
    base = _rand(16, 12, seed=0)
    tensors = [base + 0.3 * _rand(16, 12, seed=s) for s in range(1, n + 1)]
    got = merge(tensors)
    expect = plain_karcher(tensors, max_iter=100, tol=1e-12)
    diff = (got.double() - expect).abs().max().item()
    print(f"n={n}: max abs diff vs float64 Karcher mean = {diff:.3g}")
    assert diff <= 1e-5 * expect.abs().max().item()


def test_two_inputs_give_the_geodesic_midpoint_at_the_mean_norm():
    a, b = _rand(40, seed=1), 3 * _rand(40, seed=2)
    ra, rb = a.double().norm(), b.double().norm()
    direction = a.double() / ra + b.double() / rb
    expect = (ra + rb) / 2 * direction / direction.norm()
    got = merge([a, b])
    torch.testing.assert_close(got.double(), expect, rtol=1e-6, atol=1e-6)


def test_the_result_is_a_stationary_point_with_the_mean_norm():
    tensors = [_rand(30, 20, seed=s) for s in range(4)]  # far apart: several steps
    got = merge(tensors, max_iter=50, tol=1e-7).double().flatten()
    norms = [t.double().norm() for t in tensors]
    assert abs(got.norm() - sum(norms) / 4) < 1e-5 * got.norm()
    mean = got / got.norm()
    gradient = torch.zeros_like(mean)
    for t, r in zip(tensors, norms):
        u = t.double().flatten() / r
        cos = torch.clamp(mean @ u, -1, 1)
        theta = torch.arccos(cos)
        gradient += theta / torch.sin(theta) * (u - cos * mean)
    assert gradient.norm() < 1e-5


def test_differs_from_the_linear_mean_only_in_length_for_colinear_inputs():
    x = _rand(8, 8, seed=3)
    got = merge([x, 2 * x, 0.5 * x])
    torch.testing.assert_close(got, x * (1 + 2 + 0.5) / 3, rtol=2e-6, atol=1e-7)


def test_max_iter_zero_is_the_normalised_linear_mean_rescaled():
    a, b, c = (_rand(50, seed=s) for s in (4, 5, 6))
    got = merge([a, b, c], max_iter=0).double()
    units = [t.double() / t.double().norm() for t in (a, b, c)]
    direction = sum(units) / 3
    scale = sum(t.double().norm() for t in (a, b, c)) / 3
    torch.testing.assert_close(got, scale * direction / direction.norm(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ edge cases


def test_one_input_comes_back_unchanged():
    x = _rand(5, 3, seed=7)
    assert torch.equal(merge([x]), x)


def test_all_inputs_zero_give_zeros():
    zeros = torch.zeros(4, 6)
    got = merge([zeros, -zeros, zeros])
    assert torch.equal(got, zeros) and not torch.signbit(got).any()


def test_a_zero_input_counts_in_the_length_not_in_the_direction():
    """As mergekit: a tensor with norm <= tol is left out of the mean direction, but its
    (zero) length still enters the mean length: [0, x] gives x / 2."""
    x = _rand(6, 6, seed=8)
    got = merge([torch.zeros_like(x), x])
    torch.testing.assert_close(got, x / 2, rtol=1e-6, atol=1e-7)
    tiny = torch.full_like(x, 1e-7)  # norm 6e-7 <= tol
    torch.testing.assert_close(merge([tiny, x, x]), x * (2 / 3), rtol=2e-6, atol=1e-7)


def test_opposite_inputs_keep_the_first_direction():
    """x and -x cancel in the linear start: the first direction is kept (the second is at
    angle pi, whose log map is 0 in floating point)."""
    x = _rand(10, seed=9)
    got = merge([x, -x])
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-7)


def _long_inputs(spread: float) -> list[torch.Tensor]:
    base = _rand(300, 200, seed=0)
    return [base + spread * _rand(300, 200, seed=s) for s in (1, 2, 3)]


def _first_tangent(tensors: list[torch.Tensor]) -> float:
    """The first step's tangent length, elementwise in float64 (the math written out)."""
    xs = [t.double().flatten() for t in tensors]
    units = [x / x.norm() for x in xs]
    mean = sum(units) / len(units)
    mean = mean / mean.norm()
    tangent = torch.zeros_like(mean)
    for u in units:
        cos = torch.clamp(mean @ u, -1, 1)
        theta = torch.arccos(cos)
        tangent += (theta / torch.sin(theta)) * (u - cos * mean) / len(units)
    return float(tangent.norm())


@pytest.mark.parametrize("spread", [0.2, 0.5])
def test_long_tensors_decide_the_first_step_from_the_gram_matrix(spread):
    """Over 32768 elements the first check of the descent is decided on the exact tangent
    length (from the inputs' Gram matrix): a tolerance 1% above it stops at the start, whose
    length is the exact one rounded once; 1% below it, the descent steps."""
    from mergekit_math.methods import statistics
    from mergekit_math.methods.karcher import first_step

    tensors = _long_inputs(spread)
    gram = statistics.tensor_gram(tensors)
    norms = statistics.gram_norms(gram)
    exact = _first_tangent(tensors)
    weights = [1 / 3] * 3
    div = first_step(gram, norms, [0, 1, 2], weights, max_iter=10, tol=exact * 1.01)
    assert first_step(gram, norms, [0, 1, 2], weights, max_iter=10, tol=exact * 0.99) is None
    units = [t.double().flatten() / float(r) for t, r in zip(tensors, norms)]
    w32 = float(torch.tensor(1 / 3, dtype=torch.float32))
    start = sum(w32 * u for u in units)
    assert div is not None and div.item() == float(torch.tensor(start.norm().item()).float())

    got = merge(tensors, tol=exact * 1.01)
    mean = torch.zeros_like(tensors[0])
    for t, r in zip(tensors, norms):
        mean += (1 / 3) * (t / r)
    scale = sum((1 / 3) * r for r in norms)
    assert torch.equal(got, scale * (mean / div))
    stepped = merge(tensors, tol=exact * 0.99)
    assert not torch.equal(stepped, got)
    expect = plain_karcher(tensors, tol=exact * 0.99)
    torch.testing.assert_close(stepped.double(), expect, rtol=1e-5, atol=1e-6)


def test_chunks_of_a_start_state_are_the_whole_result():
    """Where the descent stops at the start, the prepared state holds no iterate: a chunk
    through the torch path computes the start from its inputs, the whole path's bits."""
    import numpy as np

    from mergekit_math.methods import statistics
    from mergekit_math.methods.karcher import KarcherState, first_step

    tensors = _long_inputs(0.5)
    gram = statistics.tensor_gram(tensors)
    norms = statistics.gram_norms(gram)
    weights = [1 / 3] * 3
    div = first_step(gram, norms, [0, 1, 2], weights, max_iter=10, tol=1e-3)
    assert div is not None
    scale = sum((1 / 3) * r for r in norms)
    state = KarcherState(
        None,
        div,
        scale,
        True,
        (0, 1, 2),
        np.array([r.item() for r in norms], np.float32),
        np.array(weights, np.float32),
    )
    whole = merge(tensors, tol=1e-3).flatten()
    flat = [t.flatten() for t in tensors]
    for start, end in ((0, 7), (7, 40_000), (40_000, whole.numel())):
        chunk = METHOD.merge(
            MergeInputs(
                base=None,
                tensors=[x[start:end].clone() for x in flat],
                params=[METHOD.model_params() for _ in flat],
                shared=METHOD.shared_params.model_validate({"tol": 1e-3}),
                offset=start,
                states=[state],
            )
        )
        assert torch.equal(chunk, whole[start:end])


def test_float64_inputs_compute_in_float64():
    tensors = [_rand(20, seed=s).double() for s in (1, 2)]
    got = merge(tensors)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, plain_karcher(tensors, 100, 1e-12), rtol=1e-9, atol=1e-12)


def test_declaration():
    assert METHOD.base == "none" and METHOD.kind == "tensors"
    # chunks only where the fused kernel runs, after the compiled descent over held inputs
    assert METHOD.chunking is not None and METHOD.chunking.compiled
    assert METHOD.inputs == (1, None) and not METHOD.random
    shared = METHOD.shared_params()
    assert (shared.max_iter, shared.tol) == (10, 1e-5)


# ------------------------------------------------------------------------------ the CLI


def _fails(tmp_path: Path, text: str, *expected: str) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", text)
    res = mmath("merge", recipe, tmp_path / "out")
    assert res.exit_code == 2, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("error: "))
    for text_ in expected:
        assert text_ in line, line
    assert not (tmp_path / "out").exists()


def _recipe(zoo, parameters: str = "", a_params: str = "", base: bool = False) -> str:
    text = "merge_method: karcher\n"
    if base:
        text += f"base_model: {zoo['base']}\n"
    text += f"models:\n  - model: {zoo['a']}\n"
    if a_params:
        text += f"    parameters: {a_params}\n"
    text += f"  - model: {zoo['b']}\n"
    if parameters:
        text += f"parameters: {parameters}\n"
    return text + "dtype: float32\n"


@pytest.mark.parametrize(
    "parameters,expected",
    [
        ("{max_iter: -1}", ("parameters.max_iter", "0")),
        ("{max_iter: 2.5}", ("parameters.max_iter",)),
        ("{tol: -1.0e-5}", ("parameters.tol", "0")),
        ("{tol: .nan}", ("parameters.tol",)),
        ("{max_itr: 5}", ("parameters.max_itr", "did you mean 'max_iter'")),
    ],
)
def test_bad_parameters_name_their_yaml_path(tmp_path, zoo, parameters, expected):
    _fails(tmp_path, _recipe(zoo, parameters), *expected)


def test_per_model_parameters_are_refused(tmp_path, zoo):
    _fails(tmp_path, _recipe(zoo, a_params="{weight: 0.5}"), "models[0].parameters.weight")


def test_an_unlisted_base_model_is_one_more_input(tmp_path, zoo):
    """As mergekit: the base of a method without a base is averaged with the others."""
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(zoo, base=True))
    assert mmath("merge", recipe, tmp_path / "out", "-q").exit_code == 0
    got = load_dir(tmp_path / "out")
    inputs = [load_dir(zoo[k]) for k in ("a", "b", "base")]
    for name, tensor in got.items():
        assert torch.equal(tensor, merge([m[name] for m in inputs])), name


# ------------------------------------------------------------------------------ mergekit 0.1.5


def run_mergekit(recipe_text: str, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_text))
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(config, str(out), options=options)


def shipped_recipe(zoo) -> str:
    text = (ROOT / "recipes" / "karcher.yaml").read_text()
    for demo, key in (("base", "base"), ("math_a", "a"), ("math_b", "b")):
        text = text.replace(f"../demo/{demo}", str(zoo[key]))
    return text


def compat_cases(zoo) -> dict[str, str]:
    listed_base = (
        f"merge_method: karcher\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['a']}\n  - model: {zoo['base']}\n  - model: {zoo['b']}\n"
        "dtype: float32\n"
    )
    three = _recipe(zoo).replace("dtype:", f"  - model: {zoo['c']}\ndtype:")
    return {
        "defaults": _recipe(zoo),
        "three_short": three + "parameters: {max_iter: 2, tol: 1.0e-3}\n",
        "no_steps": _recipe(zoo, "{max_iter: 0}"),
        "filtered_max_iter": _recipe(
            zoo, "{max_iter: [{filter: self_attn, value: 1}, {value: 20}]}"
        ),
        "unlisted_base": _recipe(zoo, base=True),
        "listed_base": listed_base,
        # mergekit computes in `dtype`; compute_dtype (ignored by mergekit) makes mmath do so too
        "recipe_bf16_compute": shipped_recipe(zoo) + "compute_dtype: bfloat16\n",
        "recipe": shipped_recipe(zoo),
    }


def _exact_bf16(zoo, name: str, max_iter: int, tol: float) -> torch.Tensor:
    """The same steps in float64 on the bfloat16-rounded inputs of the shipped recipe."""
    from mergekit.merge_methods.karcher import karcher_merge_tensors

    inputs = [load_dir(zoo[k])[name].bfloat16().double() for k in ("a", "b")]
    return karcher_merge_tensors(inputs, [0.5, 0.5], max_iter, tol)


CASES = [
    "defaults",
    "three_short",
    "no_steps",
    "filtered_max_iter",
    "unlisted_base",
    "listed_base",
    "recipe_bf16_compute",
    "recipe",
]


@pytest.mark.mergekit
@pytest.mark.parametrize("case", CASES)
def test_same_tensors_as_mergekit(tmp_path, zoo, case):
    """Tensors up to 4096 elements (all of the tiny models') take mergekit's exact steps."""
    pytest.importorskip("mergekit")
    text = compat_cases(zoo)[case]
    recipe = write_recipe(tmp_path / "recipe.yaml", text)
    res = mmath("merge", recipe, tmp_path / "mmath", "-q")
    assert res.exit_code == 0, res.output
    run_mergekit(text, tmp_path / "mergekit")
    got, ref = load_dir(tmp_path / "mmath"), load_dir(tmp_path / "mergekit")
    assert set(got) == set(ref)
    worst = 0.0
    for name in sorted(ref):
        assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape, name
        diff = (got[name].double() - ref[name].double()).abs().max().item()
        worst = max(worst, diff)
        if case == "recipe":
            # mergekit rounds to bfloat16 after every operation, mmath once at the end: compare
            # both with the float64 mean of the bfloat16-rounded inputs
            exact = _exact_bf16(zoo, name, **yaml.safe_load(text)["parameters"])
            ours_err = (got[name].double() - exact).abs()
            theirs_err = (ref[name].double() - exact).abs()
            assert_ulp_close(got[name], exact, ulps=1)
            assert ours_err.sum() <= theirs_err.sum(), name
        else:
            assert torch.equal(got[name], ref[name]), (name, diff)
    print(f"karcher {case}: max abs diff vs mergekit = {worst:.3g}")


@pytest.mark.mergekit
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("shape", [(64, 64), (100, 100), (700, 600)])
def test_kernel_against_mergekit_on_large_tensors(shape, n):
    """Above 4096 elements our dot products (and above 32768 our norms) accumulate in float64,
    mergekit's in float32 (and, beyond 8192 elements, differently for each thread count):
    the results agree within the stopping tolerance (relative), and ours is the closer to
    the same iteration run in float64."""
    pytest.importorskip("mergekit")
    from mergekit.merge_methods.karcher import karcher_merge_tensors

    base = _rand(*shape, seed=0)
    spread = 1.0 if n == 4 else 0.1  # four unrelated directions or fine-tunes of one
    tensors = [base * (n != 4) + spread * _rand(*shape, seed=s) for s in range(1, n + 1)]
    alphas = [1.0 / n] * n
    ours = merge(tensors)
    theirs = karcher_merge_tensors(tensors, alphas)
    exact = karcher_merge_tensors([t.double() for t in tensors], alphas)
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    ours_err = (ours.double() - exact).abs().max().item()
    theirs_err = (theirs.double() - exact).abs().max().item()
    print(
        f"karcher kernel {shape} n={n}: max abs diff vs mergekit = {diff:.3g} "
        f"(relative {diff / scale:.2g}); vs float64: ours {ours_err:.3g}, mergekit {theirs_err:.3g}"
    )
    if math.prod(shape) <= 4096:
        assert torch.equal(ours, theirs)
    # both stop within tol = 1e-5 (radians) of the mean direction; mergekit's float32 dot
    # products over 420000 elements cost it up to about that much again
    assert diff <= 2e-5 * scale
    assert ours_err <= theirs_err + 2**-23 * scale
