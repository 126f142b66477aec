"""Chunked SLERP, NuSLERP, Model Stock, Multi-SLERP, RAM, DELLA, SCE and Arcee Fusion: the
preparation's compiled whole-tensor sums (mergekit_math/kernels/stats.py) against torch's, and
whole merges through the engine in chunks with the kernels against the whole-tensor torch
path, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergekit_math.merge.fused import _as_numpy
from mergekit_math.methods.base import reduce_norm, reduce_sum


def _pair(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    model = base + 0.01 * torch.randn(n, generator=g)
    return base.to(dtype), model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [32769, 100_003, 1_000_000])
def test_compiled_sums_equal_torch_float64_sums(dtype, n):
    """Norms and scaled dot products of arrays and of (base, model) deltas, summed over
    ranges by the compiled passes, round to torch's float64 sums rounded to float32."""
    from mergekit_math.kernels.stats import sum_products, sum_squares
    from mergekit_math.methods import statistics

    base, model = _pair(n, dtype, seed=n)
    b, m = _as_numpy(base), _as_numpy(model)
    cut = n // 3
    ranges = [(0, cut), (cut, n)]
    wide_base, wide_model = base.float(), model.float()
    delta = wide_model - wide_base

    def summed(fn, *sources):
        parts = [fn(*[_cut(s, lo, hi) for s in sources]) for lo, hi in ranges]
        return statistics.rounded(np.sum(parts, dtype=np.float64))

    assert torch.equal(summed(sum_squares, m), reduce_sum(wide_model.square()))
    assert torch.equal(summed(sum_squares, (b, m)), reduce_sum(delta.square()))
    na, nb = reduce_norm(wide_base), reduce_norm(delta)
    scales = (np.float32(na.item()), np.float32(nb.item()))
    got = summed(lambda x, y: sum_products(x, y, *scales), b, (b, m))
    assert torch.equal(got, reduce_sum((wide_base / na) * (delta / nb)))


@pytest.mark.parametrize("size", [1, 7, 8, 9, 4095, 4096])
def test_block_sums_are_float64_sums_of_the_block(size):
    """The kernels' block helpers (float64 sums over float32 buffers, vectorised in the
    compiler's order) give the exact sum of the block's terms (each square or product exact
    in float64) to within a few float64 ulps of their magnitudes' sum, the same bits on
    every call, and from inside another compiled function."""
    import math

    from numba import njit

    from mergekit_math.kernels.stats import block_dot, block_squares, block_sum

    rng = np.random.default_rng(size)

    def block() -> np.ndarray:
        scale = 10.0 ** rng.integers(-3, 3, size)
        return (rng.standard_normal(size) * scale).astype(np.float32)

    a, b = block(), block()
    wa, wb = a.astype(np.float64), b.astype(np.float64)
    inside = njit(lambda x, y: (block_sum(x), block_squares(x), block_dot(x, y)))
    got = inside(a, b)
    assert got == (block_sum(a), block_squares(a), block_dot(a, b))
    assert got == inside(a.copy(), b.copy())
    for total, terms in zip(got, (wa, wa * wa, wa * wb)):
        exact = math.fsum(terms)  # (a float32 sum would miss this bound by ~10^8)
        assert abs(total - exact) <= 4 * np.spacing(np.abs(terms).sum())


def _cut(source, lo, hi):
    if isinstance(source, tuple):
        return tuple(a[lo:hi] for a in source)
    return source[lo:hi]


# ------------------------------------------------------------------- one chunk


def _states(method: str, variant: str, numel: int) -> list[torch.Tensor]:
    f32 = torch.float32
    if method == "karcher":
        from mergekit_math.methods.karcher import KarcherState

        mean = np.linspace(-1.0, 1.0, numel, dtype=np.float32)
        mean[:5] = [0.0, -0.0, np.nan, np.inf, 1e-40]
        return [KarcherState(mean, torch.tensor(0.93, dtype=f32), torch.tensor(41.5, dtype=f32))]
    if method == "arcee_fusion":  # rows of 100 (or the whole chunk as one row)
        from mergekit_math.methods.arcee_fusion import FusionState

        rows = 1 if numel % 100 else numel // 100
        kl = np.linspace(0.0, 3.0, rows, dtype=np.float32)
        return [FusionState({0: kl}, torch.tensor(0.004, dtype=f32))]
    if method == "sce":
        from mergekit_math.methods.sce import SceState

        weights = torch.tensor([0.55, 0.3, 0.15][: 2 + (variant == "three")], dtype=f32)
        if variant == "all":
            return [SceState(None, weights)]
        mask = (np.arange(numel) % 3 != 1).astype(np.uint8)
        return [SceState({0: mask}, weights)]
    if method == "slerp":
        return [torch.tensor(0.61, dtype=f32), torch.tensor(0.43, dtype=f32)]
    if method == "model_stock":
        return [torch.tensor([0.83], dtype=f32)]
    if method in ("nearswap", "ram"):
        return None
    if method == "ramplus_tl":
        return [torch.tensor([[1.25], [1.0], [1.5]], dtype=f32)]
    colinear = torch.tensor([variant == "colinear"])
    # NuSLERP's terms, then whether the inputs are known finite (no: these hold NaN and inf)
    return [colinear, *(torch.tensor([v], dtype=f32) for v in (0.37, 0.91, 0.99)), False]


_SHARED = {
    "slerp": {"t": 0.4},
    "nearswap": {"t": 0.004},
    "ram": {"epsilon": 0.008},
    "ramplus_tl": {"epsilon": 0.008, "r": 0.3},
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "method,variant,count,base",
    [
        ("slerp", "", 1, True),
        ("nuslerp", "colinear", 2, True),
        ("nuslerp", "spherical", 2, True),
        ("nuslerp", "spherical", 2, False),
        ("nuslerp", "colinear", 2, False),
        ("model_stock", "", 2, True),
        ("model_stock", "", 4, True),
        ("nearswap", "", 1, True),
        ("ram", "", 2, True),
        ("ram", "", 3, True),
        ("ramplus_tl", "", 3, True),
        ("sce", "", 2, True),
        ("sce", "three", 3, True),
        ("sce", "all", 2, True),
        ("arcee_fusion", "", 1, True),
        ("karcher", "", 2, False),
    ],
)
def test_chunk_kernels_equal_the_torch_chunk_path(dtype, method, variant, count, base):
    """Given a tensor's states, a chunk's fused kernel gives the torch path's bits, on
    inputs with signed zeros, NaN, inf and subnormals, and counts each input's non-finite
    elements."""
    from test_kernels import _inputs, _same

    from mergekit_math.methods import FusedInputs, MergeInputs, get_method

    m = get_method(method)
    raw = _inputs(count, dtype, seed=count)
    raw = raw if base else raw[1:]
    weights = [{"weight": 0.3 + 0.4 * k} for k in range(count)]
    params = (
        [m.model_params(**w) for w in weights]
        if method == "nuslerp"
        else [m.model_params() for _ in range(count)]
    )
    shared = m.shared_params(**_SHARED.get(method, {}))
    states = _states(method, variant, raw[0].numel())
    wide = [t.float() for t in raw]
    tensors = wide[1:] if base else wide
    if m.kind == "delta":
        tensors = [t - wide[0] for t in tensors]
    ref = m.merge(
        MergeInputs(wide[0] if base else None, tensors, params, shared, None, 0, states)
    ).to(dtype)
    out = torch.empty(ref.numel(), dtype=dtype)
    view = out.view(torch.int16).numpy().view("uint16") if dtype == torch.bfloat16 else out.numpy()
    arrays = [_as_numpy(t) for t in raw]
    bad = np.zeros(len(arrays), np.int64)
    done = m.fused(
        FusedInputs(
            base=arrays[0] if base else None,
            tensors=arrays[1:] if base else arrays,
            params=params,
            shared=shared,
            generators=None,
            offset=0,
            states=states,
            out=view,
            bad=bad,
        )
    )
    assert done
    _same(out, ref)
    assert bad.tolist() == [int((~torch.isfinite(t.float())).sum()) for t in raw]


# ------------------------------------------------------------------- through the engine


def _wide_model(folder, *, seed: int, base=None, dtype: str = "bfloat16"):
    """A one-layer Llama whose larger tensors exceed 32768 elements (long reductions; four
    65536-element mask blocks for DELLA's row-and-block chunks), whose k/v projections hold
    32768 and norms 256 (short ones); with ``base``, base + N(0, 0.02)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    if base is None:
        config = LlamaConfig(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
            max_position_embeddings=64,
        )
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape) * 0.02)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wide_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("widezoo")
    base32 = _wide_model(root / "base32", seed=0, dtype="float32")
    out = {"float32": {"base": base32}, "bfloat16": {"base": _wide_model(root / "base", seed=0)}}
    for i, name in enumerate(("a", "b", "c"), 1):
        out["float32"][name] = _wide_model(root / f"{name}32", seed=i, base=base32, dtype="float32")
        out["bfloat16"][name] = _wide_model(root / name, seed=i, base=base32)
    return out


# method -> (recipe-level parameters, per-model weights or None, number of models)
_RECIPES = {
    "slerp": ("parameters: {t: 0.3}", None, 1),
    "slerp-far": ("parameters: {t: 0.7}", None, 1),
    "nuslerp": ("", (0.3, 0.7), 2),
    "nuslerp-nobase": ("", (1.0, 2.0), 2),
    "model_stock": ("", None, 2),
    "model_stock-3": ("", None, 3),
    "nearswap": ("parameters: {t: 0.001}", None, 1),
    "ram": ("parameters: {epsilon: 0.01}", None, 3),
    "ramplus_tl": ("parameters: {epsilon: 0.015, r: 0.5, alpha: 0.8}", None, 3),
    "ramplus_tl-2": ("", None, 2),
    "multislerp": ("", (0.5, 0.3, 0.2), 3),
    "multislerp-nobase": ("", (1.0, 2.0), 2),
    "multislerp-raw": ("parameters: {normalize_weights: false, eps: 1.0e-6}", (0.7, 0.6), 2),
    "sce": ("parameters: {select_topk: 0.3}", None, 3),
    "sce-all": ("", None, 2),
    "sce-half": ("parameters: {select_topk: 0.5}", None, 2),
    "sce-one": ("parameters: {select_topk: 0.6}", None, 1),
    "arcee_fusion": ("", None, 1),
    "karcher": ("parameters: {max_iter: 10, tol: 1.0e-5}", None, 3),
    "karcher-nobase": ("parameters: {max_iter: 3}", None, 2),
    "karcher-loose": ("parameters: {max_iter: 1, tol: 0.5}", None, 2),
    # the bench-like models converge at the start; a tolerance under float32's noise makes
    # every step run
    "karcher-tight": ("parameters: {max_iter: 4, tol: 1.0e-12}", None, 3),
    "della": ("parameters: {density: 0.5, epsilon: 0.1, weight: 1.0}", None, 2),
    "della_linear": ("parameters: {density: 0.3, epsilon: 0.2, weight: 0.7}", None, 3),
    "della_linear-norescale": (
        "parameters: {density: 0.4, epsilon: 0.1, weight: 0.5, rescale: false}",
        None,
        2,
    ),
    "della-paper": (
        "parameters: {density: 0.4, epsilon: 0.1, weight: 1.0, rescale: paper}",
        None,
        2,
    ),
}


def _recipe(method: str, models: dict, dtype: str) -> str:
    shared, weights, count = _RECIPES[method]
    lines = [f"merge_method: {method.split('-')[0]}", f"dtype: {dtype}", shared, "models:"]
    if not method.endswith("nobase"):
        lines.insert(1, f"base_model: {models['base']}")
    for k, name in enumerate(["a", "b", "c"][:count]):
        lines.append(f"  - model: {models[name]}")
        if weights:
            lines.append(f"    parameters: {{weight: {weights[k]}}}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("method", sorted(_RECIPES))
@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_chunked_interpolations_equal_the_whole_tensor_path(
    tmp_path, monkeypatch, wide_zoo, method, stored
):
    """With the kernels forced on, the merge runs in chunks (statistics prepared from the
    held inputs, compiled where a tensor is longer than 32768 elements) and gives the bits
    of the whole-tensor torch path, tensor by tensor."""
    from conftest import load_dir, write_recipe

    from mergekit_math.merge import build_plan, execute
    from mergekit_math.merge.memory import is_chunked, item_ranges
    from mergekit_math.recipe import load_recipe

    models = wide_zoo[stored]
    text = _recipe(method, models, stored)
    recipe = write_recipe(tmp_path / "r.yaml", text)
    outs = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("MMATH_FUSED", mode)
        plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
        chunked = [is_chunked(plan, item) for item in plan.items if not item.copy_only]
        # (nearswap and ram run on chunks either way: elementwise; DELLA's paper rescale
        # divides by each entry's probability: whole tensors)
        expected = (mode == "1" and method != "della-paper") or method in ("nearswap", "ram")
        assert any(chunked) == expected
        if mode == "1" and method.startswith("della") and method != "della-paper":
            # whole rows that start on mask blocks: 65536-element chunks, not 5000
            ranges = [item_ranges(plan, item, "cpu", 5000) for item in plan.items]
            assert max(len(r) for r in ranges) == 4
            assert {e - s for r in ranges if len(r) > 1 for s, e in r} == {65536}
        execute(plan, tmp_path / mode, progress=False, chunk_elements=5000)
        outs[mode] = load_dir(tmp_path / mode)
    assert outs["1"].keys() == outs["0"].keys()
    sizes = [t.numel() for t in outs["0"].values()]
    assert max(sizes) >= 4 * 65536 and min(sizes) <= 5000  # long and short reductions
    for name, ref in outs["0"].items():
        got = outs["1"][name]
        assert got.dtype == ref.dtype
        assert torch.equal(
            got.view(torch.int16 if stored == "bfloat16" else torch.int32),
            ref.view(torch.int16 if stored == "bfloat16" else torch.int32),
        ), name


def _fused_and_whole(tmp_path, monkeypatch, recipe) -> dict:
    """The merge of ``recipe`` with the kernels ("1": in chunks of 5000 elements) and without
    ("0": the whole-tensor torch path), each output's tensors."""
    from conftest import load_dir

    from mergekit_math.merge import build_plan, execute
    from mergekit_math.recipe import load_recipe

    outs = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("MMATH_FUSED", mode)
        plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
        execute(plan, tmp_path / mode, progress=False, chunk_elements=5000)
        outs[mode] = load_dir(tmp_path / mode)
    return outs


@pytest.mark.parametrize("max_iter", [0, 3])
def test_chunked_karcher_of_opposite_inputs_keeps_the_first_direction(
    tmp_path, monkeypatch, wide_zoo, max_iter
):
    """x and -x cancel in the start (its length is below tol): the compiled descent starts
    from the first direction, as the torch path does, bit for bit (with no steps, x comes
    back; the steps' long dot products need not give cos = -1 exactly, so x need not)."""
    import shutil

    from conftest import load_dir, write_recipe
    from safetensors.torch import load_file, save_file

    x = wide_zoo["float32"]["base"]
    negated = tmp_path / "negated"
    shutil.copytree(x, negated)
    for shard in negated.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({k: -v for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    text = (
        f"merge_method: karcher\ndtype: float32\nparameters: {{max_iter: {max_iter}}}\n"
        f"models:\n  - model: {x}\n  - model: {negated}\n"
    )
    outs = _fused_and_whole(tmp_path, monkeypatch, write_recipe(tmp_path / "r.yaml", text))
    ref = load_dir(x)
    for name, want in outs["0"].items():
        assert torch.equal(outs["1"][name].view(torch.int32), want.view(torch.int32)), name
        if max_iter == 0:
            torch.testing.assert_close(want, ref[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_importances_histogram_as_made_and_flag_nonfinite_and_negative(dtype):
    """Arcee Fusion's importances |m - b|·KL_row are torch's float32 steps; their top-16-bit
    histogram is added as rows are made (the quartile selection's first pass); bit 0 of the
    result flags a non-finite importance, bit 1 a negative one (a KL rounded below 0)."""
    from mergekit_math.kernels.fusion import importances
    from mergekit_math.kernels.select import BINS, SHIFT

    row, rows = 300, 7
    base, model = _pair(row * rows, dtype, 3)
    kl = torch.rand(rows) * 1e-3
    negative = kl.clone().index_fill_(0, torch.tensor([4]), -1e-9)
    infinite = kl.clone().index_fill_(0, torch.tensor([2]), float("inf"))
    cases = {0: kl, 2: negative, 1: infinite}
    for want, k in cases.items():
        ref = (model.float() - base.float()).abs().reshape(rows, row) * k[:, None]
        if want == 1:  # inf, and NaN where m == b (0·inf: x86's NaN has its sign bit set)
            want |= 2 * bool((ref.view(torch.int32) < 0).any())
        out = np.empty(row * rows, np.float32)
        hist = np.full(BINS, 3, np.int32)  # added to, not overwritten
        b, m = _as_numpy(base), _as_numpy(model)
        got = importances(b, m, k.numpy(), row, out, hist)
        assert got == want
        assert torch.equal(
            torch.from_numpy(out).view(torch.int32), ref.reshape(-1).view(torch.int32)
        )
        bins = np.minimum(out.view(np.uint32) >> SHIFT, BINS - 1)
        assert np.array_equal(hist - 3, np.bincount(bins, minlength=BINS))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_importances_recomputed_by_the_selection_passes_are_the_stored_ones(dtype):
    """``importance_bins`` gives ``importances``' histogram and flags without keeping them,
    and the selection's second passes over a ``(base, model, kl, row)`` source (the
    importances computed again, row by row, across blocks that start inside rows) see the
    stored importances' values: the same bins collected, the same low-bit histograms, the
    same quartiles."""
    from mergekit_math.kernels.fusion import importance_bins, importances
    from mergekit_math.kernels.select import BINS, SHIFT, kth_largest_bits_from
    from mergekit_math.kernels.select_passes import collect_bins, histogram_low2

    row, rows = 3000, 5  # rows longer than a block (2048) and not a multiple of it
    base, model = _pair(row * rows, dtype, 11)
    kl = torch.rand(rows) * 1e-3
    b, m, k = _as_numpy(base), _as_numpy(model), kl.numpy()
    stored = np.empty(row * rows, np.float32)
    want_hist = np.zeros(BINS, np.int32)
    want_flags = importances(b, m, k, row, stored, want_hist)
    hist = np.zeros(BINS, np.int32)
    assert importance_bins(b, m, k, row, hist) == want_flags == 0
    assert np.array_equal(hist, want_hist)
    source = (b, m, k, np.int64(row))
    bits = stored.view(np.uint32) >> SHIFT
    top = np.unique(bits, return_counts=True)
    first, second, third = (np.uint32(v) for v in top[0][np.argsort(-top[1])[:3]])
    for dirty in (False, True):
        want = np.empty(row * rows, np.uint32)
        got = np.empty(row * rows, np.uint32)
        n = collect_bins(stored, first, second, third, want, dirty)
        assert collect_bins(source, first, second, third, got, dirty) == n > 0
        assert np.array_equal(got[:n], want[:n])
    want_low = np.zeros((2, 1 << SHIFT), np.int32)
    got_low = np.zeros((2, 1 << SHIFT), np.int32)
    histogram_low2(stored, first, second, want_low)
    histogram_low2(source, first, second, got_low)
    assert np.array_equal(got_low, want_low) and want_low.sum() > 0
    ks = [row * rows // 4, row * rows // 2, 3 * row * rows // 4]

    def run(jobs, items):
        return [jobs(x) for x in items]

    halves = [(0, stored[: 2 * row]), (1, stored[2 * row :])]
    recomputed = [
        (0, (b[: 2 * row], m[: 2 * row], k[:2], np.int64(row))),
        (1, (b[2 * row :], m[2 * row :], k[2:], np.int64(row))),
    ]
    hists = [np.bincount(stored[: 2 * row].view(np.uint32) >> SHIFT, minlength=BINS)]
    hists.append(np.bincount(stored[2 * row :].view(np.uint32) >> SHIFT, minlength=BINS))
    hists = [h.astype(np.int32) for h in hists]
    want_q = kth_largest_bits_from(halves, hists, ks, run, 2)
    assert kth_largest_bits_from(recomputed, hists, ks, run, 2) == want_q
    ordered = np.sort(stored)[::-1]
    assert [q[0] for q in want_q] == [float(ordered[k - 1]) for k in ks]


def test_chunked_arcee_fusion_with_a_kl_below_zero_selects_signed_importances(
    tmp_path, monkeypatch, wide_zoo
):
    """A row whose KL rounds below zero makes its importances negative: the preparation
    then selects the quartiles among signed values (not from its histogram of bits), and the
    chunked merge still gives the whole-tensor path's bits."""
    from conftest import load_dir, write_recipe

    from mergekit_math.methods import arcee_fusion

    kl_of_ratio = arcee_fusion._kl_of_ratio  # the last step of every path's KLs

    def shifted(p, q):  # KLs with an odd last bit < 0 (half)
        kl = kl_of_ratio(p, q)
        odd = (kl.view(torch.int32) & 1) == 1
        kl[odd] = -kl[odd] - 1e-9
        return kl

    monkeypatch.setattr(arcee_fusion, "_kl_of_ratio", shifted)
    # the KLs through torch's steps (the compiled pass computes them itself: its signed
    # KLs are held to torch's in tests/test_torch_log.py)
    monkeypatch.setattr(arcee_fusion, "prepares_without_torch", lambda: False)
    models = wide_zoo["bfloat16"]
    text = _recipe("arcee_fusion", models, "bfloat16")
    outs = _fused_and_whole(tmp_path, monkeypatch, write_recipe(tmp_path / "r.yaml", text))
    base = load_dir(models["base"])
    changed = 0
    for name, ref in outs["0"].items():
        assert torch.equal(outs["1"][name].view(torch.int16), ref.view(torch.int16)), name
        changed += int((ref != base[name]).sum())
    assert changed  # some changes were taken


def test_chunked_arcee_fusion_of_a_model_with_nan_and_inf_is_the_whole_path(
    tmp_path, monkeypatch, wide_zoo
):
    """Ranges whose inputs hold NaN or inf leave the compiled pass (which reports them) for
    torch's steps: the chunked merge still gives the whole path's bits."""
    import shutil

    from conftest import load_dir, write_recipe
    from safetensors.torch import load_file, save_file

    from mergekit_math.kernels import fusion
    from mergekit_math.methods import arcee_fusion

    models = dict(wide_zoo["bfloat16"])
    bad = shutil.copytree(models["a"], tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    name = max(tensors, key=lambda k: tensors[k].numel())
    flat = tensors[name].view(-1)
    flat[11], flat[70000], flat[-3] = float("nan"), float("inf"), -float("inf")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    models["a"] = bad
    declined = []
    compiled = fusion.kl_importance_bins

    def spy(*args):  # noqa: ANN002, ANN202
        flags = compiled(*args)
        declined.append(flags < 0)
        return flags

    monkeypatch.setattr(fusion, "kl_importance_bins", spy)
    text = _recipe("arcee_fusion", models, "bfloat16")
    outs = _fused_and_whole(tmp_path, monkeypatch, write_recipe(tmp_path / "r.yaml", text))
    for key, ref in outs["0"].items():  # NaN where the whole path has NaN (its bits may
        got = outs["1"][key]  # differ: torch's and the kernel's NaN), the same bits elsewhere
        nan = ref.isnan()
        assert torch.equal(got.isnan(), nan), key
        assert torch.equal(got[~nan].view(torch.int16), ref[~nan].view(torch.int16)), key
    assert load_dir(bad)[name].isnan().sum() == 1
    if arcee_fusion.prepares_without_torch():
        assert True in declined and False in declined


@pytest.mark.parametrize("shape", [(7, 300), (3, 40000), (1, 5)])
def test_compiled_row_kl_is_the_torch_steps(shape):
    """``row_kl(..., compiled=True)`` (the ε-smoothing and the division in one compiled pass)
    gives the KLs of torch's steps bit for bit, rows longer than 32768 included, and with
    probabilities that underflow (a row with one huge logit)."""
    from mergekit_math.methods.arcee_fusion import row_kl

    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=g)
    model = base + 0.05 * torch.randn(shape, generator=g)
    model[0, 0] = 80.0  # softmax underflows to 0 elsewhere in the row: p + ε, q + ε matter
    want = row_kl(model, base)
    got = row_kl(model, base, compiled=True)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert bool((want != 0).all())
    # the softmaxes written into given arrays (the preparation's reused ones): the same bits
    work = (torch.full(shape, float("nan")), torch.full(shape, float("nan")))
    into = row_kl(model, base, compiled=True, work=work)
    assert torch.equal(into.view(torch.int32), want.view(torch.int32))
    assert torch.equal(work[0], torch.softmax(model, -1) + 1e-8)  # p + ε, in place


def test_thread_float32_arrays_are_reused_per_thread_and_grow():
    """The preparation's per-range temporaries: the same memory on the next call of the
    thread (no fresh pages per range), grown when a range is longer, distinct arrays that do
    not overlap, and another thread's arrays of its own."""
    import threading

    from mergekit_math.methods.statistics import thread_float32

    a = thread_float32(4, 1000)
    assert [x.shape for x in a] == [(1000,)] * 4
    ends = sorted((x.ctypes.data, x.ctypes.data + x.nbytes) for x in a)
    assert all(e <= s for (_, e), (s, _) in zip(ends, ends[1:]))  # no overlap
    b = thread_float32(2, 500)
    assert [x.ctypes.data for x in b] == [x.ctypes.data for x in a[:2]]
    c = thread_float32(4, 5000)
    assert [x.shape for x in c] == [(5000,)] * 4
    assert thread_float32(4, 3000)[3].ctypes.data == c[3].ctypes.data
    other = []
    t = threading.Thread(target=lambda: other.append(thread_float32(1, 10)[0].ctypes.data))
    t.start()
    t.join()
    assert other[0] not in {x.ctypes.data for x in c}
