"""RAM and RAM+ tensor-local (mergekit 0.1.5 ``ram`` and ``ramplus_tl``): the math written out
by hand, edge cases, chunked execution, validation through ``mmath merge``, and the same
tensors as the real mergekit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_ulp_close, load_dir, make_model, mmath, write_recipe

from mergekit_math.merge import build_plan, execute, is_chunked
from mergekit_math.methods.base import MergeInputs, get_method
from mergekit_math.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def merge(name: str, base: torch.Tensor, models: list[torch.Tensor], **shared) -> torch.Tensor:
    """mmath's method on whole tensors, with the deltas made as the engine makes them."""
    method = get_method(name)
    return method.merge(
        MergeInputs(
            base=base,
            tensors=[m - base for m in models],
            params=[method.model_params() for _ in models],
            shared=method.shared_params(**shared),
        )
    )


def reference(
    base: torch.Tensor,
    models: list[torch.Tensor],
    epsilon: float,
    plus: tuple[float, float] | None = None,
) -> torch.Tensor:
    """RAM (``plus=None``) or RAM+ (``plus=(r, alpha)``) in float64, position by position."""
    n = len(models)
    b = base.double().reshape(-1).tolist()
    deltas = [(m - base).double().reshape(-1).tolist() for m in models]
    # the float32 deltas are compared with epsilon rounded to float32, as torch does
    eps32 = float(torch.tensor(epsilon, dtype=torch.float32))
    moved = [[abs(x) > eps32 for x in d] for d in deltas]
    count = [sum(moved[i][p] for i in range(n)) for p in range(len(b))]
    scale = [1.0] * n
    if plus is not None:
        r, alpha = plus
        for i in range(n):
            shared = sum(1 for p, m in enumerate(moved[i]) if m and count[p] > 1)
            unique = sum(1 for p, m in enumerate(moved[i]) if m and count[p] == 1)
            rho = shared / max(unique, eps32)
            scale[i] = 1 + r * min(max(rho, 0.0), alpha)
    out = []
    for p, value in enumerate(b):
        movers = [i for i in range(n) if moved[i][p]]
        if len(movers) == 1:
            value += deltas[movers[0]][p] * scale[movers[0]]
        elif movers:
            value += sum(deltas[i][p] for i in movers) / len(movers)
        out.append(value)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def sparse_models(shape, n, keep, seed=0, scale=0.05):
    """A base and ``n`` models that each move a random ``keep`` fraction of its entries."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(n):
        moved = torch.rand(shape, generator=g) < keep
        models.append(base + torch.randn(shape, generator=g) * scale * moved)
    return base, models


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    # float32 against float64: a few float32 ulps of the inputs' magnitude (|x| ≲ 4)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=5e-7)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("epsilon", [1e-5, 0.02, 0.0])
def test_ram_reference(n, epsilon):
    base, models = sparse_models((11, 13), n, keep=0.5, seed=n)
    close(merge("ram", base, models, epsilon=epsilon), reference(base, models, epsilon))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    ("epsilon", "r", "alpha"), [(1e-5, 0.1, 0.2), (0.02, 0.5, 1.0), (1e-5, 3.0, 10.0)]
)
def test_ramplus_reference(n, epsilon, r, alpha):
    base, models = sparse_models((11, 13), n, keep=0.6, seed=10 + n)
    got = merge("ramplus_tl", base, models, epsilon=epsilon, r=r, alpha=alpha)
    close(got, reference(base, models, epsilon, plus=(r, alpha)))


def test_unique_entries_kept_shared_entries_averaged():
    base = torch.zeros(5)
    a = torch.tensor([0.5, 0.25, 0.0, -1.0, 0.0])
    b = torch.tensor([0.0, 0.75, 0.0, 3.0, 1e-6])
    c = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    # 1e-6 is below epsilon: not a contribution, and not part of the sum either
    assert merge("ram", base, [a, b, c]).tolist() == [0.5, 0.5, 0.0, 1.0, 0.0]


def test_epsilon_is_strict():
    base = torch.zeros(2)
    a, b = torch.tensor([0.5, 0.75]), torch.tensor([0.25, 0.75])
    # |0.5| is not > 0.5 (nor 0.25): position 0 has no contributor and keeps the base
    assert merge("ram", base, [a, b], epsilon=0.5).tolist() == [0.0, 0.75]


def test_zero_deltas_give_the_base():
    base, _ = sparse_models((4, 6), 0, keep=0.5)
    for name in ("ram", "ramplus_tl"):
        assert torch.equal(merge(name, base, [base.clone(), base.clone()]), base)


def test_single_model_is_the_model():
    base, (model,) = sparse_models((4, 6), 1, keep=0.5)
    # every change is unique; ramplus: no shared entries, ρ = 0, λ = 1
    for name in ("ram", "ramplus_tl"):
        assert_ulp_close(merge(name, base, [model]), model, ulps=1)


def test_ramplus_overlap_ratio_caps_at_alpha():
    base = torch.zeros(6)
    # a: 3 shared entries, 1 unique -> ρ = 3, capped at α = 0.5 -> λ = 1 + 0.4·0.5 = 1.2
    # b: 3 shared, none unique -> ρ = 3 / ε (huge), capped, but b has nothing to amplify
    # c: moved nothing -> ρ = 0 / ε = 0 (no NaN)
    a = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0, 0.0])
    b = torch.tensor([3.0, 3.0, 3.0, 0.0, 0.0, 0.0])
    c = torch.zeros(6)
    got = merge("ramplus_tl", base, [a, b, c], r=0.4, alpha=0.5)
    torch.testing.assert_close(got, torch.tensor([2.0, 2.0, 2.0, 2.4, 0.0, 0.0]))
    assert torch.isfinite(got).all()


def test_method_declarations():
    ram, plus = get_method("ram"), get_method("ramplus_tl")
    for method in (ram, plus):
        assert (method.kind, method.base, method.inputs) == ("delta", "required", (1, None))
        assert not method.random and method.ignored == ()
    assert ram.chunking is not None and ram.chunkable(ram.shared_params(), [])
    # ρ counts over the whole tensor: RAM+ runs on chunks only after a compiled count pass
    assert plus.chunking is not None and plus.chunking.compiled


# ----------------------------------------------------------------------------- through mmath


def sparse_finetune(base: Path, folder: Path, seed: int, keep: float, noise: float = 0.05) -> Path:
    """A copy of ``base`` with a random ``keep`` fraction of each tensor's entries moved
    (the others bit-identical, so their deltas are exactly 0): like an RL fine-tune."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, folder)
    g = torch.Generator().manual_seed(seed)
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        for name, t in tensors.items():
            moved = torch.rand(t.shape, generator=g) < keep
            tensors[name] = torch.where(moved, t + torch.randn(t.shape, generator=g) * noise, t)
        save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ram")
    base = make_model(root / "base", layers=4)
    return {
        "base": base,
        "a": sparse_finetune(base, root / "a", seed=1, keep=0.3),
        "b": sparse_finetune(base, root / "b", seed=2, keep=0.5),
        "c": sparse_finetune(base, root / "c", seed=3, keep=0.2),
        "dense": make_model(root / "dense", base=base, seed=4, noise=0.05, layers=4),
    }


def run(recipe: Path, out: Path, **kwargs) -> dict[str, torch.Tensor]:
    plan = build_plan(load_recipe(recipe), recipe_dir=recipe.parent)
    execute(plan, out, progress=False, **kwargs)
    return load_dir(out)


def test_ram_runs_on_chunks_with_the_same_bytes(tmp_path, models):
    text = (
        f"merge_method: ram\nbase_model: {models['base']}\nmodels:\n"
        f"  - model: {models['a']}\n  - model: {models['b']}\n  - model: {models['c']}\n"
        "parameters: {epsilon: 0.01}\n"
    )
    recipe = write_recipe(tmp_path / "r.yaml", text)
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    assert all(is_chunked(plan, item) for item in plan.items if not item.copy_only)
    whole = run(recipe, tmp_path / "whole", chunk_elements=10**9)
    chunked = run(recipe, tmp_path / "chunked", chunk_elements=997)
    assert whole.keys() == chunked.keys()
    for name in whole:
        assert torch.equal(whole[name].view(torch.uint8), chunked[name].view(torch.uint8)), name
    plus = build_plan(
        load_recipe(write_recipe(tmp_path / "p.yaml", text.replace(": ram\n", ": ramplus_tl\n"))),
        recipe_dir=tmp_path,
    )
    assert not any(is_chunked(plus, item) for item in plus.items if not item.copy_only)


def recipe_text(models, method: str, parameters: str) -> str:
    return (
        f"merge_method: {method}\nbase_model: {models['base']}\nmodels:\n"
        f"  - model: {models['a']}\n  - model: {models['b']}\nparameters: {parameters}\n"
    )


@pytest.mark.parametrize(
    ("method", "parameters", "expected"),
    [
        ("ram", "{epsilon: -1.0e-5}", "parameters.epsilon"),
        ("ram", "{r: 0.1}", "parameters.r: unknown parameter"),
        ("ramplus_tl", "{epsilon: 0}", "parameters.epsilon"),
        ("ramplus_tl", "{alpha: -0.1}", "parameters.alpha"),
        ("ramplus_tl", "{r: -1}", "parameters.r"),
        ("ramplus_tl", "{weight: 1}", "parameters.weight: unknown parameter"),
    ],
)
def test_invalid_parameters(tmp_path, models, method, parameters, expected):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_text(models, method, parameters))
    res = mmath("merge", recipe, tmp_path / "out")
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert expected in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_base_is_required(tmp_path, models, method):
    text = f"merge_method: {method}\nmodels:\n  - model: {models['a']}\n  - model: {models['b']}\n"
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "out")
    assert res.exit_code == 2 and "base_model" in res.output, res.output


# ----------------------------------------------------------------------------- vs mergekit


def case(method: str, names: tuple[str, ...], parameters: str = "{{}}", base_listed=False) -> str:
    listed = "  - model: {base}\n" if base_listed else ""
    entries = "".join(f"  - model: {{{n}}}\n" for n in names)
    return (
        f"merge_method: {method}\nbase_model: {{base}}\nmodels:\n{listed}{entries}"
        f"parameters: {parameters}\ndtype: float32\n"
    )


CASES = {
    "ram_default": case("ram", ("a", "b")),
    "ram_three_base_listed": case("ram", ("a", "b", "c"), base_listed=True),
    "ram_eps_0.03_dense": case("ram", ("a", "dense", "b"), "{{epsilon: 0.03}}"),
    "ram_eps_0": case("ram", ("c", "a"), "{{epsilon: 0.0}}"),
    "ram_single": case("ram", ("b",)),
    "ramplus_default": case("ramplus_tl", ("a", "b")),
    "ramplus_three": case("ramplus_tl", ("a", "b", "c"), "{{r: 0.5, alpha: 1.0}}"),
    "ramplus_dense_eps": case(
        "ramplus_tl", ("dense", "a", "c"), "{{epsilon: 0.02, r: 2.0, alpha: 5.0}}"
    ),
    "ramplus_single": case("ramplus_tl", ("c",), "{{r: 0.3}}"),
}


def recipe_file_text(models, method: str, dtype: str | None = None) -> str:
    text = (ROOT / "recipes" / f"{method}.yaml").read_text()
    for name, key in (("base", "base"), ("math_a", "a"), ("math_b", "b")):
        text = text.replace(f"../demo/{name}", str(models[key]))
    if dtype is not None:
        text = text.replace("dtype: bfloat16", f"dtype: {dtype}")
    return text


def run_both(tmp_path, text, their_dtype: torch.dtype | None = None):
    """Both tools' outputs; ``their_dtype``: the dtype mergekit writes when it is not ours."""
    from test_mergekit_compat import run_mergekit

    recipe = write_recipe(tmp_path / "recipe.yaml", text)
    res = mmath("merge", recipe, tmp_path / "mmath", "-q")
    assert res.exit_code == 0, res.output
    run_mergekit(text, tmp_path / "mergekit")
    got, ref = load_dir(tmp_path / "mmath"), load_dir(tmp_path / "mergekit")
    assert set(got) == set(ref)
    for name in ref:
        assert ref[name].dtype == (their_dtype or got[name].dtype), name
        assert got[name].shape == ref[name].shape, name
    return got, ref


@pytest.mark.mergekit
@pytest.mark.parametrize("name", [*sorted(CASES), "recipe_ram", "recipe_ramplus_tl"])
def test_same_tensors_as_mergekit(tmp_path, models, name):
    pytest.importorskip("mergekit")
    if name.startswith("recipe_"):
        text = recipe_file_text(models, name.removeprefix("recipe_"), dtype="float32")
    else:
        text = CASES[name].format(**models)
    got, ref = run_both(tmp_path, text)
    worst = max(assert_ulp_close(got[k], ref[k], ulps=1) for k in sorted(ref))
    print(f"{name}: max abs diff vs mergekit = {worst:.3g}")


@pytest.mark.mergekit
@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_recipe_file_in_bfloat16(tmp_path, models, method):
    """As shipped (bfloat16): mergekit computes the deltas and their sums in bf16, mmath in
    float32 from the same bf16 inputs. mergekit's ramplus_tl multiplies by its float32 λ, so
    its output is float32 (a type-promotion slip: it writes no bf16 tensor); mmath writes the
    asked bfloat16."""
    pytest.importorskip("mergekit")
    promoted = torch.float32 if method == "ramplus_tl" else None
    got, ref = run_both(tmp_path, recipe_file_text(models, method), their_dtype=promoted)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    ref = {k: v.to(torch.bfloat16) for k, v in ref.items()}
    # mergekit rounds each delta and partial sum to bf16, mmath only the result: within a
    # bf16 ulp of the tensor's largest value (2^-8 relative to it)
    worst = 0.0
    for k in sorted(ref):
        diff = (got[k].float() - ref[k].float()).abs().max().item()
        assert diff <= 2**-8 * ref[k].float().abs().max().item(), k
        worst = max(worst, diff)
    differ = sum(int((got[k] != ref[k]).sum()) for k in ref)
    total = sum(ref[k].numel() for k in ref)
    print(
        f"{method} recipe_file (bfloat16): max abs diff vs mergekit = {worst:.3g}, "
        f"{differ}/{total} values differ"
    )


@pytest.mark.parametrize("models", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_counts_equal_the_torch_counts(models, dtype):
    """RAM+'s compiled counts (per model: entries it alone changes by more than ε, entries
    it changes with others) equal torch's on values at ε exactly, NaN and inf, over a
    length that is not a multiple of the kernel's block."""
    import numpy as np

    from mergekit_math.kernels.entrywise import ram_counts

    n, epsilon = 5_003, 0.01
    g = torch.Generator().manual_seed(models)
    base = torch.randn(n, generator=g).to(dtype)
    tensors = [(base.float() + torch.randn(n, generator=g) * 0.02).to(dtype) for _ in range(models)]
    tensors[0][:3] = base[:3] + epsilon  # at ε (as rounded to the dtype)
    tensors[-1][10:13] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    base[20] = float("nan")
    hits = torch.stack([(t.float() - base.float()).abs() > np.float32(epsilon) for t in tensors])
    count = hits.sum(0)
    want_unique = (hits & (count == 1)).sum(1).tolist()
    want_shared = (hits & (count > 1)).sum(1).tolist()

    def stored(t: torch.Tensor) -> np.ndarray:
        return t.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else t.numpy()

    overlapping, unique = np.zeros(models, np.int64), np.zeros(models, np.int64)
    ram_counts(
        stored(base), tuple(stored(t) for t in tensors), np.float32(epsilon), overlapping, unique
    )
    assert unique.tolist() == want_unique and overlapping.tolist() == want_shared
    assert sum(want_unique) > 0 and (models == 1 or sum(want_shared) > 0)


def test_scales_in_numpy_equal_torchs_steps():
    """RAM+'s λ computed in numpy (so that it merges without torch) has the bits of
    mergekit's torch steps, ``1 + r · (overlapping / unique.clamp(min=ε)).clamp(0, α)``, on
    counts up to 2^40 (past float32's exact integers), zeros, and ε, r, α of every size."""
    import numpy as np

    from mergekit_math.methods.ram import RamPlusShared, scales_of

    g = np.random.default_rng(3)
    for trial in range(400):
        n = int(g.integers(1, 60))
        top = int(g.choice([10, 1000, 2**24 + 7, 2**40]))
        overlapping = g.integers(0, top, n, dtype=np.int64)
        unique = g.integers(0, top, n, dtype=np.int64)
        unique[g.random(n) < 0.2] = 0
        overlapping[g.random(n) < 0.1] = 0
        eps, r, alpha = (float(x) for x in 10.0 ** g.uniform(-9, 1, 3))
        shared = RamPlusShared(epsilon=eps, r=r, alpha=alpha)
        o, u = torch.from_numpy(overlapping), torch.from_numpy(unique)
        want = (1 + r * (o / u.clamp(min=eps)).clamp(min=0, max=alpha)).unsqueeze(-1)
        got = scales_of(overlapping, unique, shared)
        assert got.dtype == np.float32 and want.dtype == torch.float32
        assert np.array_equal(got.view(np.int32), want.numpy().view(np.int32)), trial
