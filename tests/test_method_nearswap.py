"""nearswap: per entry, take the other model's value where it lies within t of the base's,
interpolating with weight t / |base - other| farther out. Checked against the formula written
out entry by entry, its limits, the CLI's validation, chunked runs and the real mergekit 0.1.5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_ulp_close, load_dir, mmath, write_recipe

from mergekit_math.methods import MergeInputs, get_method

ROOT = Path(__file__).resolve().parent.parent
METHOD = get_method("nearswap")


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def merge(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    return METHOD.merge(
        MergeInputs(
            base=base.clone(),
            tensors=[other.clone()],
            params=[METHOD.model_params()],
            shared=METHOD.shared_params(t=t),
        )
    )


def plain_nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """The formula, one entry at a time in Python floats (float64)."""
    out = []
    for b, x in zip(base.flatten().tolist(), other.flatten().tolist()):
        w = min(max(t / max(abs(b - x), 1e-6), 0.0), 1.0)
        out.append(w * x + (1 - w) * b)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


# ------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("t", [0.0, 1e-7, 1e-4, 0.05, 0.3, 10.0])
def test_matches_the_formula_written_out(t):
    base = _rand(12, 9, seed=0)
    other = base + 0.1 * _rand(12, 9, seed=1)
    other[0, :3] = base[0, :3]  # equal entries
    other[1, :3] = base[1, :3] + 1e-7  # closer than the 1e-6 floor
    got = merge(base, other, t)
    expect = plain_nearswap(base, other, t)
    # float32 rounding of the weight and of the two products
    size = base.double().abs() + other.double().abs()
    diff = (got.double() - expect).abs()
    print(f"t={t}: max abs diff vs the formula = {diff.max().item():.3g}")
    assert (diff <= 4e-7 * size + 1e-12).all()


def test_weights_of_the_three_regimes():
    base = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    other = torch.tensor([0.25, 0.5, 2.0, 0.0, 1.0 + 2**-22])
    # |d| < t: swapped; |d| = t: swapped; |d| = 4t: a quarter of the way; equal: swapped;
    # |d| below the 1e-6 floor with t = 0.5: swapped
    got = merge(base, other, 0.5)
    assert torch.equal(got, torch.tensor([0.25, 0.5, 0.5, 0.0, 1.0 + 2**-22]))


def test_t_zero_gives_the_base_and_large_t_the_other_model():
    base, other = _rand(7, 5, seed=2), _rand(7, 5, seed=3)
    assert torch.equal(merge(base, other, 0.0), base)
    assert torch.equal(merge(base, other, 1e6), other)


def test_equal_inputs_give_the_base_back_for_t_from_1e_6_on():
    """w = 1 where the entries are equal (distance floored at 1e-6); below that floor t gives
    w < 1, and w·b + (1 − w)·b may round off b, hence keeps_base=False."""
    base = _rand(16, 12, seed=4)
    for t in (0.0, 1.5e-6, 1e-4, 1.0):
        assert torch.equal(merge(base, base.clone(), t), base)
    assert not METHOD.keeps_base


def test_declaration():
    assert METHOD.base == "required" and METHOD.kind == "tensors"
    assert METHOD.inputs == (1, 1) and not METHOD.random
    assert METHOD.chunking is not None and METHOD.chunkable(METHOD.shared_params(t=0.1), [])


def test_a_missing_base_is_a_value_error():
    x = _rand(3, seed=5)
    inputs = MergeInputs(
        base=None, tensors=[x], params=[METHOD.model_params()], shared=METHOD.shared_params(t=1)
    )
    with pytest.raises(ValueError, match="base"):
        METHOD.merge(inputs)


# ------------------------------------------------------------------------------ the CLI


def _fails(tmp_path: Path, text: str, *expected: str) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", text)
    res = mmath("merge", recipe, tmp_path / "out")
    assert res.exit_code == 2, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("error: "))
    for text_ in expected:
        assert text_ in line, line
    assert not (tmp_path / "out").exists()


def _recipe(zoo, parameters: str = "{t: 0.01}", base: bool = True, extra: str = "") -> str:
    text = "merge_method: nearswap\n"
    if base:
        text += f"base_model: {zoo['base']}\n"
    text += f"models:\n  - model: {zoo['a']}\n{extra}"
    return text + f"parameters: {parameters}\ndtype: float32\n"


@pytest.mark.parametrize(
    "parameters,expected",
    [
        ("{}", ("parameters.t", "missing required parameter 't'")),
        ("{t: -0.1}", ("parameters.t", "0")),
        ("{t: [0.1, -0.1]}", ("parameters.t",)),
        ("{t: .inf}", ("parameters.t", "finite")),
        ("{t: 0.1, tt: 1}", ("parameters.tt", "unknown parameter")),
    ],
)
def test_bad_parameters_name_their_yaml_path(tmp_path, zoo, parameters, expected):
    _fails(tmp_path, _recipe(zoo, parameters), *expected)


def test_needs_a_base_model(tmp_path, zoo):
    _fails(tmp_path, _recipe(zoo, base=False), "base_model", "nearswap needs a base_model")


def test_takes_exactly_one_other_model(tmp_path, zoo):
    text = _recipe(zoo, extra=f"  - model: {zoo['b']}\n")
    _fails(tmp_path, text, "models", "nearswap takes exactly 1")


def test_t_per_model_is_refused(tmp_path, zoo):
    text = _recipe(zoo, extra="    parameters: {t: 0.1}\n")
    _fails(tmp_path, text, "models[0].parameters.t", "top-level")


def test_chunked_run_gives_the_whole_run_bytes(tmp_path, zoo):
    from mergekit_math.merge import build_plan, execute
    from mergekit_math.recipe import load_recipe

    recipe = write_recipe(tmp_path / "r.yaml", _recipe(zoo, "{t: 0.01}"))
    outs = []
    for chunk in (10**9, 997):
        plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
        execute(plan, tmp_path / str(chunk), progress=False, chunk_elements=chunk)
        outs.append(load_dir(tmp_path / str(chunk)))
    base, a = load_dir(zoo["base"]), load_dir(zoo["a"])
    for name, whole in outs[0].items():
        assert torch.equal(whole, outs[1][name]), name
        assert torch.equal(whole, merge(base[name], a[name], 0.01)), name


# ------------------------------------------------------------------------------ mergekit 0.1.5


def run_mergekit(recipe_text: str, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_text))
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(config, str(out), options=options)


def shipped_recipe(zoo) -> str:
    text = (ROOT / "recipes" / "nearswap.yaml").read_text()
    for demo, key in (("base", "base"), ("math_a", "a"), ("math_b", "b")):
        text = text.replace(f"../demo/{demo}", str(zoo[key]))
    return text


def compat_cases(zoo) -> dict[str, str]:
    listed_base = _recipe(zoo, "{t: 0.02}", extra=f"  - model: {zoo['base']}\n")
    gradient = "{t: [{filter: self_attn, value: [0.0, 0.05]}, {value: 0.005}]}"
    return {
        "t_0.0001": _recipe(zoo, "{t: 0.0001}"),
        "t_0.01": _recipe(zoo, "{t: 0.01}"),
        "t_1e-7": _recipe(zoo, "{t: 1.0e-7}"),
        "t_gradient": _recipe(zoo, gradient),
        "listed_base": listed_base,
        # mergekit computes in `dtype`; compute_dtype (ignored by mergekit) makes mmath do so too
        "recipe_bf16_compute": shipped_recipe(zoo) + "compute_dtype: bfloat16\n",
        "recipe": shipped_recipe(zoo),
    }


CASES = [
    "t_0.0001",
    "t_0.01",
    "t_1e-7",
    "t_gradient",
    "listed_base",
    "recipe_bf16_compute",
    "recipe",
]


@pytest.mark.mergekit
@pytest.mark.parametrize("case", CASES)
def test_same_tensors_as_mergekit(tmp_path, zoo, case):
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
        worst = max(worst, (got[name].double() - ref[name].double()).abs().max().item())
        if case == "recipe":
            # mergekit rounds to bfloat16 after every operation, mmath once at the end: mmath
            # is within 1 bfloat16 ulp of the formula on the bfloat16-rounded inputs
            base, a = (load_dir(zoo[k])[name].bfloat16() for k in ("base", "a"))
            exact = plain_nearswap(
                base.double(), a.double(), yaml.safe_load(text)["parameters"]["t"]
            )
            ours_err = (got[name].double() - exact).abs()
            theirs_err = (ref[name].double() - exact).abs()
            assert_ulp_close(got[name], exact, ulps=1)
            assert ours_err.sum() <= theirs_err.sum(), name
        else:
            assert torch.equal(got[name], ref[name]), name
    print(f"nearswap {case}: max abs diff vs mergekit = {worst:.3g}")
