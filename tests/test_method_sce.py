"""SCE (mergekit 0.1.5 ``sce``): the math written out by hand, edge cases, validation through
``mmath merge``, and the same tensors as the real mergekit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_ulp_close, load_dir, make_model, mmath, write_recipe

from mergekit_math.methods.base import MergeInputs, get_method
from mergekit_math.methods.consensus import agreement_mask, elect_sign
from mergekit_math.methods.sce import variance_mask

ROOT = Path(__file__).resolve().parents[1]


def merge(base: torch.Tensor, models: list[torch.Tensor], **shared) -> torch.Tensor:
    """mmath's sce on whole tensors, with the deltas made as the engine makes them."""
    method = get_method("sce")
    return method.merge(
        MergeInputs(
            base=base,
            tensors=[m - base for m in models],
            params=[method.model_params() for _ in models],
            shared=method.shared_params(**shared),
        )
    )


def reference(base: torch.Tensor, models: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """The paper's three steps in float64, one position at a time."""
    n = len(models)
    b = base.double().reshape(-1).tolist()
    deltas = [(m - base).double().reshape(-1).tolist() for m in models]
    size = len(b)
    # select: population variance over the models per position
    if select_topk < 1:
        variances = []
        for p in range(size):
            column = [d[p] for d in deltas]
            mean = sum(column) / n
            variances.append(sum((x - mean) ** 2 for x in column) / n)
        nonzero = sum(v != 0 for v in variances)
        # mergekit forms count · fraction in float32
        k = int(torch.tensor(nonzero, dtype=torch.float32) * torch.tensor(select_topk))
        order = sorted(range(size), key=lambda p: -variances[p])  # stable: ties by index
        kept = set(order[:k])
        deltas = [[x if p in kept else 0.0 for p, x in enumerate(d)] for d in deltas]
    # calculate: mean squared delta per model, normalised
    means = [sum(x * x for x in d) / size for d in deltas]
    total = sum(means)
    weights = [1 / n] * n if abs(total) < 1e-6 else [m / total for m in means]
    # erase: keep entries whose sign is that of the column sum (+ when the sum is 0)
    out = []
    for p in range(size):
        column = [d[p] for d in deltas]
        elected = 1.0 if sum(column) >= 0 else -1.0
        agree = [(x > 0 and elected > 0) or (x < 0 and elected < 0) for x in column]
        top = sum(w * x for w, x, a in zip(weights, column, agree) if a)
        bottom = sum(w for w, a in zip(weights, agree) if a)
        out.append(b[p] + top / max(bottom, 1e-6))
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def seeded(shape, n, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) * scale for _ in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("select_topk", [1.0, 0.6, 0.25, 0.0])
def test_reference(n, select_topk):
    base, models = seeded((9, 14), n, seed=n)
    # a few columns where every model moved the same way: zero variance, never selected
    for m in models[1:]:
        m[0, :5] = models[0][0, :5]
    got = merge(base, models, select_topk=select_topk)
    # float32 against float64: a few float32 ulps of the inputs' magnitude (|x| ≲ 4)
    expected = reference(base, models, select_topk)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=5e-7)


def test_variance_ties_are_kept_in_index_order():
    # two models with opposite deltas: variance v², so equal |v| tie
    v = torch.tensor([0.1, 0.2, 0.2, 0.2, 0.05, 0.2, 0.3, 0.2])
    deltas = torch.stack([v, -v])
    # 8 nonzero variances · 0.5 = 4: 0.3, then the first three of the five tied 0.2s
    mask = variance_mask(deltas, 0.5)
    assert mask is not None
    assert mask.tolist() == [0, 1, 1, 1, 0, 0, 1, 0]
    assert variance_mask(deltas, 1.0) is None
    assert variance_mask(deltas, 0.0).sum() == 0


def test_k_is_formed_in_float32_like_mergekit():
    # 90 distinct nonzero variances and 10 zero ones: int(float32(90) · float32(0.7)) = 63
    g = torch.Generator().manual_seed(3)
    a = torch.cat([torch.rand(90, generator=g) + 0.1, torch.zeros(10)])
    mask = variance_mask(torch.stack([a, -a]), 0.7)
    assert mask is not None and int(mask.sum()) == 63
    assert int(90 * 0.7) == 62  # what a float64 product would give


def test_single_model():
    base, (model,) = seeded((6, 7), 1)
    # its own sign always wins and its weight is 1: the model itself (up to base + (m - base))
    assert_ulp_close(merge(base, [model]), model, ulps=1)
    # one model has no variance, so nothing is selected: the base
    assert torch.equal(merge(base, [model], select_topk=0.9), base)


def test_zero_deltas_give_the_base():
    base, _ = seeded((5, 4), 0)
    assert torch.equal(merge(base, [base.clone(), base.clone()]), base)
    assert torch.equal(merge(base, [base.clone(), base.clone()], select_topk=0.5), base)


def test_tiny_deltas_weigh_uniformly():
    # Σ mean(δ²) below 1e-6: the weights fall back to 1/n, so agreeing entries are averaged
    base = torch.zeros(2, 3)
    a = torch.tensor([[1e-4, 2e-4, -1e-4], [3e-4, 0.0, 1e-4]])
    b = torch.tensor([[3e-4, -1e-4, -3e-4], [1e-4, 2e-4, -5e-4]])
    got = merge(base, [a, b])
    expected = torch.tensor([[2e-4, 2e-4, -2e-4], [2e-4, 2e-4, -5e-4]])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.double(), reference(base, [a, b], 1.0), rtol=1e-6, atol=0)


def test_divisor_floor_shrinks_a_lone_light_model():
    # at the last position only b (weight ≈ 3.3e-9) moved: its delta · w_b / max(w_b, 1e-6)
    base = torch.zeros(4)
    a = torch.tensor([1.0, 1.0, 1.0, 0.0])
    b = torch.tensor([0.0, 0.0, 0.0, 1e-4])
    got = merge(base, [a, b])
    w_b = (1e-8 / 4) / (3 / 4 + 1e-8 / 4)
    assert got[:3].tolist() == [1.0, 1.0, 1.0]
    assert got[3].item() == pytest.approx(1e-4 * w_b / 1e-6, rel=1e-5)


def test_method_declaration():
    method = get_method("sce")
    assert (method.kind, method.base, method.inputs) == ("delta", "required", (1, None))
    assert not method.random
    # chunks only where the fused kernel runs, after a compiled preparation
    assert method.chunking is not None and method.chunking.compiled
    assert method.fused is not None
    assert method.ignored == ("int8_mask",)


# ----------------------------------------------------------------------------- through mmath


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sce")
    base = make_model(root / "base", layers=4)
    return {
        "base": base,
        "a": make_model(root / "a", base=base, seed=1, noise=0.05, layers=4),
        "b": make_model(root / "b", base=base, seed=2, noise=0.05, layers=4),
        "c": make_model(root / "c", base=base, seed=3, noise=0.05, layers=4),
    }


def recipe_text(models, parameters: str = "{}", extra: str = "", dtype: str = "float32") -> str:
    return (
        f"merge_method: sce\nbase_model: {models['base']}\nmodels:\n"
        f"  - model: {models['a']}\n{extra}  - model: {models['b']}\n"
        f"parameters: {parameters}\ndtype: {dtype}\n"
    )


@pytest.mark.parametrize(
    ("parameters", "extra", "expected"),
    [
        ("{select_topk: 1.5}", "", "parameters.select_topk"),
        ("{select_topk: -0.1}", "", "parameters.select_topk"),
        ("{density: 0.5}", "", "parameters.density: unknown parameter"),
        ("{}", "    parameters: {weight: 1.0}\n", "models[0].parameters.weight"),
        ("{}", "    parameters: {select_topk: 0.5}\n", "models[0].parameters.select_topk"),
    ],
)
def test_invalid_parameters(tmp_path, models, parameters, extra, expected):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_text(models, parameters, extra))
    res = mmath("merge", recipe, tmp_path / "out")
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert expected in lines[0]
    assert not (tmp_path / "out").exists()


def test_base_is_required(tmp_path, models):
    text = f"merge_method: sce\nmodels:\n  - model: {models['a']}\n  - model: {models['b']}\n"
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "out")
    assert res.exit_code == 2 and "base_model" in res.output, res.output


def test_int8_mask_is_accepted_with_a_warning(tmp_path, models):
    recipe = recipe_text(models, "{int8_mask: true, select_topk: 0.5}")
    plain = recipe_text(models, "{select_topk: 0.5}")
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "int8_mask" in res.output and "no effect" in res.output
    res = mmath("merge", write_recipe(tmp_path / "p.yaml", plain), tmp_path / "plain")
    assert res.exit_code == 0, res.output
    got, ref = load_dir(tmp_path / "out"), load_dir(tmp_path / "plain")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# ----------------------------------------------------------------------------- vs mergekit

CASES = {
    "default": "merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n"
    "dtype: float32\n",
    "topk_half_base_listed": "merge_method: sce\nbase_model: {base}\nmodels:\n"
    "  - model: {base}\n  - model: {a}\n  - model: {b}\n"
    "parameters: {{select_topk: 0.5}}\ndtype: float32\n",
    "three_topk_0.1_int8": "merge_method: sce\nbase_model: {base}\nmodels:\n"
    "  - model: {a}\n  - model: {b}\n  - model: {c}\n"
    "parameters: {{select_topk: 0.1, int8_mask: true}}\ndtype: float32\n",
    "three_topk_0.7": "merge_method: sce\nbase_model: {base}\nmodels:\n"
    "  - model: {c}\n  - model: {a}\n  - model: {b}\n"
    "parameters: {{select_topk: 0.7}}\ndtype: float32\n",
    "single_model": "merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    "dtype: float32\n",
    "topk_zero": "merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n"
    "parameters: {{select_topk: 0.0}}\ndtype: float32\n",
}


def recipe_file_text(models, dtype: str | None = None) -> str:
    text = (ROOT / "recipes" / "sce.yaml").read_text()
    for name, key in (("base", "base"), ("math_a", "a"), ("math_b", "b")):
        text = text.replace(f"../demo/{name}", str(models[key]))
    if dtype is not None:
        text = text.replace("dtype: bfloat16", f"dtype: {dtype}")
    return text


def run_both(tmp_path, text):
    from test_mergekit_compat import run_mergekit

    recipe = write_recipe(tmp_path / "recipe.yaml", text)
    res = mmath("merge", recipe, tmp_path / "mmath", "-q")
    assert res.exit_code == 0, res.output
    run_mergekit(text, tmp_path / "mergekit")
    got, ref = load_dir(tmp_path / "mmath"), load_dir(tmp_path / "mergekit")
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].dtype == ref[name].dtype, name
        assert got[name].shape == ref[name].shape, name
    return got, ref


@pytest.mark.mergekit
@pytest.mark.parametrize("case", [*sorted(CASES), "recipe_file"])
def test_same_tensors_as_mergekit(tmp_path, models, case):
    pytest.importorskip("mergekit")
    if case == "recipe_file":
        text = recipe_file_text(models, dtype="float32")
    else:
        text = CASES[case].format(**models)
    got, ref = run_both(tmp_path, text)
    worst = max(assert_ulp_close(got[k], ref[k], ulps=1) for k in sorted(ref))
    print(f"sce {case}: max abs diff vs mergekit = {worst:.3g}")


@pytest.mark.mergekit
def test_recipe_file_in_bfloat16_matches_mergekit_layout(tmp_path, models):
    """As shipped (bfloat16): the same tensors; values differ where mergekit's bf16 arithmetic
    rounds (mmath computes in float32), and bf16 variances tie often, which mergekit breaks
    in topk's unspecified order: report, do not compare."""
    pytest.importorskip("mergekit")
    got, ref = run_both(tmp_path, recipe_file_text(models))
    worst = max((got[k].float() - ref[k].float()).abs().max().item() for k in ref)
    differ = sum(int((got[k] != ref[k]).sum()) for k in ref)
    total = sum(ref[k].numel() for k in ref)
    print(
        f"sce recipe_file (bfloat16): max abs diff vs mergekit = {worst:.3g}, "
        f"{differ}/{total} values differ"
    )


@pytest.mark.mergekit
def test_consensus_kernels_match_mergekit_sum_mask():
    """consensus.elect_sign + agreement_mask give mergekit's get_mask(method="sum") bits."""
    pytest.importorskip("mergekit")
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 300, generator=g)
    x[:, :40] = 0.0  # all-zero columns: sum +0
    x[:2, 40:60] = -0.0  # all ±0 columns: the sum is -0 where every entry is -0
    x[2:, 40:60] = -0.0
    x[0, 60:80], x[1, 60:80] = 1.5, -1.5  # cancelling columns: sum +0, + elected
    x[2:, 60:80] = 0.0
    x[1, 80:90] = float("inf")
    x[:, 90:95] = torch.tensor([1e-30, -1e-30, 3e-38, -3e-38]).reshape(4, 1)
    ours = agreement_mask(x, elect_sign(x))
    theirs = get_mask(x, method="sum", mask_dtype=x.dtype).to(x.dtype)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_compiled_variance_is_torch_var(stored, count):
    """The compiled variances are ``torch.var(unbiased=False)`` over the deltas bit for bit,
    with zeros of both signs, subnormal, huge and non-finite deltas, over a length that ends
    in a short block; the counts of nonzero and non-finite variances, and the histogram of
    their top 16 bits made as they are written (the selection's first pass), with them; or
    stored as those bins; and made again at chosen positions."""
    import numpy as np

    from mergekit_math.kernels.sce import variance_bits_at, variance_into

    n = 10_001
    g = torch.Generator().manual_seed(count)
    base = torch.randn(n, generator=g)
    models = [base + torch.randn(n, generator=g) * 10.0 ** -float(j) for j in range(count)]
    base[:8] = torch.tensor([0.0, -0.0, 1e-40, 3e38, -3e38, 1.0, float("inf"), 2.0])
    models[0][:8] = torch.tensor([-0.0, 0.0, -1e-40, -3e38, 3e38, float("nan"), 1.0, 2.0])
    if stored == "bfloat16":
        base, models = base.bfloat16().float(), [m.bfloat16().float() for m in models]

    def as_stored(x: torch.Tensor) -> np.ndarray:
        if stored == "float32":
            return x.numpy()
        return x.bfloat16().view(torch.int16).numpy().view(np.uint16)

    out = np.empty(n, np.float32)
    hist = np.zeros(2**16, np.int32)
    stored_models = tuple(as_stored(m) for m in models)
    nonzero, bad = variance_into(as_stored(base), stored_models, out, hist)
    expected = torch.var(torch.stack([m - base for m in models]), dim=0, unbiased=False)
    finite = expected.isfinite()
    got = torch.from_numpy(out)
    assert torch.equal(got.view(torch.int32)[finite], expected.view(torch.int32)[finite])
    assert torch.equal(got.isnan(), expected.isnan())
    assert nonzero == int((expected != 0).sum())
    assert bad == int((~finite).sum()) > 0
    # the selection's first pass: the variances' top 16 bits (a NaN with its sign bit: last)
    bins = np.minimum(out.view(np.uint32) >> 15, 2**16 - 1)
    assert np.array_equal(hist, np.bincount(bins, minlength=2**16))
    # stored as their bins instead (half the bytes), with the same counts and histogram;
    # the exact values again where asked
    keys = np.empty(n, np.uint16)
    key_hist = np.zeros(2**16, np.int32)
    assert variance_into(as_stored(base), stored_models, keys, key_hist) == (nonzero, bad)
    assert np.array_equal(keys, bins) and np.array_equal(key_hist, hist)
    where = np.array([0, 1, 2, 3, 4, 5, 6, 7, 4095, 4096, n - 1], np.int64)
    again = np.empty(where.shape[0], np.uint32)
    variance_bits_at(as_stored(base), stored_models, where, again)
    assert np.array_equal(again, out.view(np.uint32)[where])


def _patterned(root: Path, ties: tuple[int, ...], big: range, dtype: str) -> dict[str, Path]:
    """A zero base and two models (a one-layer Llama whose larger tensors exceed 32768
    elements) with deltas chosen per flat position ``i`` by ``i % 50``: c and -c (tied
    variances c²) where it is in ``ties``, else c·u and c·u/4 (variance (3cu/8)²) with u in
    [3, 5) where in ``big``, else in [0.01, 0.9). The tied positions weigh more in the second
    model's sum of squares than the others; every value is exact in bfloat16."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=64,
    )
    shapes = {
        "model.embed_tokens.weight": (1024, 256),
        "lm_head.weight": (1024, 256),
        "model.norm.weight": (256,),
        "model.layers.0.input_layernorm.weight": (256,),
        "model.layers.0.post_attention_layernorm.weight": (256,),
        "model.layers.0.mlp.gate_proj.weight": (1024, 256),
        "model.layers.0.mlp.up_proj.weight": (1024, 256),
        "model.layers.0.mlp.down_proj.weight": (256, 1024),
        "model.layers.0.self_attn.q_proj.weight": (256, 256),
        "model.layers.0.self_attn.k_proj.weight": (128, 256),
        "model.layers.0.self_attn.v_proj.weight": (128, 256),
        "model.layers.0.self_attn.o_proj.weight": (256, 256),
    }
    g = torch.Generator().manual_seed(0)
    weights: dict[str, dict[str, torch.Tensor]] = {"base": {}, "a": {}, "b": {}}
    for name, shape in shapes.items():
        n = torch.Size(shape).numel()
        slot = torch.arange(n) % 50
        tied = torch.isin(slot, torch.tensor(ties))
        u = torch.rand(n, generator=g) * 0.89 + 0.01
        u = torch.where(torch.isin(slot, torch.tensor(big)), 3 + 2 * torch.rand(n, generator=g), u)
        a = torch.where(tied, torch.ones(n), u).mul(0.0625).to(getattr(torch, dtype))
        weights["base"][name] = torch.zeros_like(a).reshape(shape)
        weights["a"][name] = a.reshape(shape)
        weights["b"][name] = torch.where(tied, -a, a * 0.25).reshape(shape)
    out = {}
    for label, tensors in weights.items():
        folder = root / label
        folder.mkdir()
        config.save_pretrained(folder)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        out[label] = folder
    return out


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("ties", "big", "path"),
    [
        # the k-th largest variance's bin holds 4 in 100: selection, masks and squares in
        # one pass; half its ties kept, in index order across the 5000-element chunks
        ((7, 33), range(10, 24), "_masks_and_squares"),
        # it holds 60 in 100: the selection's own second pass and tie rules
        (tuple(range(10, 40)), range(0, 10), "_masks_by_rules"),
    ],
)
def test_chunked_selection_with_tied_variances_is_the_whole_path(
    tmp_path, monkeypatch, stored, ties, big, path
):
    """SCE in chunks with the kernels gives the whole-tensor torch path's bits where the
    threshold is a variance many positions share, by whichever way its bin decides."""
    from mergekit_math.merge import build_plan, execute
    from mergekit_math.methods import sce
    from mergekit_math.recipe import load_recipe

    models = _patterned(tmp_path, ties, big, stored)
    text = recipe_text(models, "{select_topk: 0.3}", dtype=stored)
    recipe = write_recipe(tmp_path / "r.yaml", text)
    calls = []
    real = getattr(sce, path)
    monkeypatch.setattr(sce, path, lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("MMATH_FUSED", mode)
        plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
        execute(plan, tmp_path / mode, progress=False, chunk_elements=5000)
        outs[mode] = load_dir(tmp_path / mode)
    assert len(calls) == 7  # the tensors over 32768 elements (k, v: 32768)
    bits = torch.int16 if stored == "bfloat16" else torch.int32
    for name, ref in outs["0"].items():
        assert torch.equal(outs["1"][name].view(bits), ref.view(bits)), name
    # half the tied positions of the fused case, a sixth of the other's, moved from the base
    moved = (outs["0"]["model.layers.0.mlp.up_proj.weight"] != 0).float().mean().item()
    assert moved == pytest.approx(0.3, abs=0.001)
