"""The fused kernels (mergekit_math/kernels) against the torch path of the same methods:
the same bits, on inputs with signed zeros, NaN, inf, ties at the TIES threshold and
values that round differently, in bfloat16 and float32, for every variant with a kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergekit_math.merge.fused import _as_numpy
from mergekit_math.methods import FusedInputs, MergeInputs, get_method
from mergekit_math.methods.masks import MaskStream
from mergekit_math.methods.selection import Selection
from mergekit_math.methods.sparsify import KeepMask, MagnitudeTrim

N = 5000  # not a multiple of any vector width: the loops' tails run too
TAIL = 64


def _inputs(k: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Base then k models: small moves from the base, with special values sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=g)
    out = [base]
    for _ in range(k):
        out.append(base + 0.01 * torch.randn(N, generator=g))
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40])
    for j, t in enumerate(out):
        at = torch.randint(0, N, (12,), generator=g)
        t[at] = specials[torch.randint(0, len(specials), (12,), generator=g)]
        t[7 * j : 7 * j + 5] = 0.0 if j % 2 else -0.0  # zeros against zeros
    for t in out[1:]:  # equal deltas: ties at any threshold
        t[100:140] = out[0][100:140] + 0.25
    return [t.to(dtype) for t in out]


def _same(fused: torch.Tensor, ref: torch.Tensor) -> None:
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(fused), nan)
    a = fused[~nan].view(torch.int16 if fused.dtype == torch.bfloat16 else torch.int32)
    b = ref[~nan].view(torch.int16 if ref.dtype == torch.bfloat16 else torch.int32)
    differ = (a != b).nonzero().flatten()
    assert differ.numel() == 0, (differ[:5], fused[~nan][differ[:5]], ref[~nan][differ[:5]])


def _run(method_name: str, models: list[dict], shared: dict, dtype, states_of=None, seed=0):
    method = get_method(method_name)
    has_base = method.kind == "delta"
    raw = _inputs(len(models), dtype, seed)[0 if has_base else 1 :]
    params = [method.model_params(**m) for m in models]
    shared_params = method.shared_params(**shared)
    generators = [MaskStream.of(3, i, "t") for i in range(len(models))] if method.random else None
    wide = [t.float() for t in raw]
    if has_base:
        base, tensors = wide[0], [t - wide[0] for t in wide[1:]]
    else:
        base, tensors = None, wide
    states = states_of(tensors, params, generators) if states_of else None
    ref = method.merge(MergeInputs(base, tensors, params, shared_params, generators, 0, states))
    ref = ref.to(dtype)
    out = torch.empty(N, dtype=dtype)
    view = out.view(torch.int16).numpy().view("uint16") if dtype == torch.bfloat16 else out.numpy()
    arrays = [_as_numpy(t) for t in raw]
    bad = np.zeros(len(arrays), np.int64)
    done = method.fused(
        FusedInputs(
            base=arrays[0] if has_base else None,
            tensors=arrays[1:] if has_base else arrays,
            params=params,
            shared=shared_params,
            generators=generators,
            offset=0,
            states=states,
            out=view,
            bad=bad,
        )
    )
    assert done
    if method_name == "linear":
        # torch's scalar loop for a tensor's last elements does not fuse the multiply-add
        _same(out[:-TAIL], ref[:-TAIL])
        torch.testing.assert_close(out[-TAIL:], ref[-TAIL:], equal_nan=True, rtol=2**-7, atol=0)
    else:
        _same(out, ref)
    expected = [int((~torch.isfinite(t.float())).sum()) for t in raw]
    assert bad.tolist() == expected


DTYPES = [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_linear(dtype, normalize, k):
    models = [{"weight": w} for w in (0.3, 0.7, -0.2, 0.45, 1.3)[:k]]
    _run("linear", models, {"normalize": normalize}, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [{}, {"lambda": 0.7}, {"normalize": True, "lambda": 1.3}])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_task_arithmetic(dtype, shared, k):
    models = [{"weight": w} for w in (0.5, 0.6, -0.3, 0.9)[:k]]
    _run("task_arithmetic", models, shared, dtype)


def _trims(tensors, params, generators):
    return [MagnitudeTrim(t.abs(), p.density) for t, p in zip(tensors, params)]


def _keeps(tensors, params, generators):
    return [KeepMask(g, p.density) for g, p in zip(generators, params)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [{}, {"normalize": False}, {"lambda": 0.8}])
@pytest.mark.parametrize("densities", [(0.3, 0.5), (0.2, 1.0, 0.6)])
def test_ties(dtype, shared, densities):
    models = [{"weight": 0.4 + 0.3 * i, "density": d} for i, d in enumerate(densities)]
    _run("ties", models, shared, dtype, _trims)


def _windows(tensors, params, generators):
    from mergekit_math.methods.sparsify import RankWindow, breadcrumbs_window

    out = []
    for t, p in zip(tensors, params):
        if p.density >= 1:
            out.append(None)  # kept whole, as the engine's prepare leaves it
            continue
        first, count = breadcrumbs_window(t.numel(), p.density, p.gamma)
        out.append(RankWindow(t.abs(), first, count))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("shared", [{}, {"normalize": True, "lambda": 0.8}])
@pytest.mark.parametrize(
    "models",
    [
        ((0.3, 0.05), (0.5, 0.1)),
        ((0.2, 0.01), (1.0, 0.0), (0.6, 0.3)),  # one input kept whole
        ((0.9, 0.1), (0.0001, 0.0)),  # a window of nothing (count 0)
    ],
)
def test_breadcrumbs(dtype, method, shared, models):
    """Windows between two thresholds, ties at both ends chosen in index order, dropped
    entries +0.0 (NaN and -0.0 too), as ``torch.where`` leaves them."""
    params = [
        {"weight": 0.4 + 0.3 * i, "density": d, "gamma": g} for i, (d, g) in enumerate(models)
    ]
    _run(method, params, shared, dtype, _windows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale", [{}, {"rescale": False}, {"rescale": "paper"}])
@pytest.mark.parametrize("chunked", [True, False])
def test_dare(dtype, method, rescale, chunked):
    models = [{"weight": 0.5, "density": 0.3}, {"weight": 0.7, "density": 0.9}]
    _run(method, models, rescale, dtype, _keeps if chunked else None, seed=1)


def test_ties_kernel_keeps_exactly_k_with_ties():
    """All deltas equal: the threshold ties everywhere and exactly int(density·n) entries
    per input are kept, the first ones in index order, as the torch path keeps them."""
    method = get_method("ties")
    base = torch.zeros(N)
    raw = [base, base + 0.5, base - 0.5]
    params = [method.model_params(weight=1.0, density=0.3)] * 2
    tensors = [t - base for t in raw[1:]]
    states = _trims(tensors, params, None)
    shared = method.shared_params()
    out = torch.empty(N)
    method.fused(
        FusedInputs(
            raw[0].numpy(),
            [t.numpy() for t in raw[1:]],
            params,
            shared,
            None,
            0,
            states,
            out.numpy(),
            np.zeros(3, np.int64),
        )
    )
    ref = method.merge(MergeInputs(base, tensors, params, shared, None, 0, states))
    _same(out, ref)
    k = int(0.3 * N)  # both keep their first k entries; the sum +0 elects +, so +0.5 wins
    assert torch.equal(out[:k], torch.full((k,), 0.5)) and torch.equal(out[k:], torch.zeros(N - k))


@pytest.mark.parametrize("n,density", [(3_000_000, 0.3), (1_500_001, 0.01), (1_200_000, 1.0)])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("quarters", [(), (1, 2, 3)])
def test_compiled_selection_equals_the_torch_selection(monkeypatch, n, density, signed, quarters):
    """Threshold, count above and ties per range: the same from the radix selection as from
    the torch ops, on values with many ties (bfloat16-rounded) and NaN, for two ``k`` at
    once (a Breadcrumbs window's ends), three and four at once (Arcee Fusion's quartiles: more
    bins than one low pass counts) and ranges that cut the task grid anywhere."""
    from mergekit_math.methods.selection import kth_selects

    g = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=g).to(torch.bfloat16).float()
    values = values if signed else values.abs()
    values[:1000] = 0.0
    values[5000:5003] = float("nan")
    ks = [max(1, int(density * n)), max(1, n // 7), *[n - q * (n - 1) // 4 for q in quarters]]
    bounds = [0, 1, 999, 1001, 262_143, 262_145, n // 2, n - 5, n]
    ranges = list(zip(bounds, bounds[1:]))
    monkeypatch.setenv("MMATH_FUSED", "1")  # the kernels at any size (these are < 32M)
    fast = kth_selects(values, ks, ranges=ranges)
    monkeypatch.setenv("MMATH_FUSED", "0")
    slow = kth_selects(values, ks, ranges=ranges)
    assert fast == slow
    for k, selection in zip(ks, slow):  # the counts are the positions' counts
        tied = (values == selection.threshold).nonzero().flatten()
        assert selection.tied == tied.numel()
        assert selection.above < k <= selection.above + tied.numel()
        assert selection.ties[0] == int((values[:1] == selection.threshold).sum())
    if not signed:  # the radix selection itself answered (it declines signed values)
        from mergekit_math.kernels.select import kth_largest_bits, tensor_parts

        found = kth_largest_bits(tensor_parts(values, ranges), ks, map, len(ranges))
        assert [Selection(*f) for f in found] == slow


@pytest.mark.parametrize("full_share", [0.02, 0.5, 1.0])
def test_compiled_selection_counts_values_with_low_bits(monkeypatch, full_share):
    """Values whose low 15 bits are not all zero (differences of bfloat16 numbers across a
    power of two, float32 inputs) next to many that are: the second pass counts the first
    kind by packing them, the second by a count, and both agree with the torch ops, for one
    bin and for two at once (quartiles)."""
    from mergekit_math.kernels.select import kth_largest_bits, tensor_parts
    from mergekit_math.methods.selection import kth_selects

    n = 1_000_003
    g = torch.Generator().manual_seed(7)
    full = torch.randn(n, generator=g).abs()
    values = full.to(torch.bfloat16).float()
    pick = torch.rand(n, generator=g) < full_share
    values[pick] = full[pick]
    assert bool((values.view(torch.int32) & (2**15 - 1) != 0).any())
    ks = [int(0.3 * n), n // 7, *[n - q * (n - 1) // 4 for q in (1, 2, 3)]]
    ranges = [(0, 1), (1, 262_145), (262_145, n - 5), (n - 5, n)]
    monkeypatch.setenv("MMATH_FUSED", "0")
    slow = kth_selects(values, ks, ranges=ranges)
    found = kth_largest_bits(tensor_parts(values, ranges), ks, map, len(ranges))
    assert [Selection(*f) for f in found] == slow


def test_compiled_selection_answers_from_the_collected_values(monkeypatch):
    """Where the k-th largest has low bits set (and is repeated across ranges), or is the
    bin's clean value just below such values, the answer comes from the values the first
    pass collected, without a second pass, and equals the torch selection's."""
    from mergekit_math.kernels import select
    from mergekit_math.methods.selection import kth_selects

    n = 600_001
    g = torch.Generator().manual_seed(11)
    full = torch.randn(n, generator=g).abs()
    values = full.to(torch.bfloat16).float()
    pick = torch.rand(n, generator=g) < 0.01
    values[pick] = full[pick]
    dirty = values.view(torch.int32) & (2**15 - 1) != 0
    chosen = float(values[dirty][123])
    values[[5, 300_000, 599_999]] = chosen  # its ties in three ranges
    order = values.sort(descending=True).values
    k_dirty = int((order > chosen).sum()) + 2  # the second of its four copies
    clean = order[~(order.view(torch.int32) & (2**15 - 1) != 0)]
    k_clean = int((order > clean[len(clean) // 3]).sum()) + 1
    ks = [k_dirty, k_clean]
    ranges = [(0, 6), (6, 300_001), (300_001, n)]

    def no_second_pass(*args: object) -> None:
        raise AssertionError("the second pass ran")

    monkeypatch.setattr(select, "histogram_low2", no_second_pass)
    monkeypatch.setattr(select, "histogram_low", no_second_pass)
    found = select.kth_largest_bits(select.tensor_parts(values, ranges), ks, map, len(ranges))
    monkeypatch.setenv("MMATH_FUSED", "0")
    slow = kth_selects(values, ks, ranges=ranges)
    assert [Selection(*f) for f in found] == slow
    # the original (range 1) and the copies at 5, 300_000 and 599_999
    assert slow[0].threshold == chosen and slow[0].ties == [1, 2, 1]


@pytest.mark.parametrize("stored", ["bfloat16", "float32"])
def test_models_of_one_base_are_counted_in_one_pass(stored):
    """Several models' deltas of one base range are histogrammed together (the base read once
    per block) into split bins, each bin's clean and dirty values counted apart: the same
    bins as one pass per model; kth_largest_bits_of groups them that way
    (one job per base range) and gives the answers of one model at a time."""
    import numpy as np

    from mergekit_math.kernels import select

    n = 300_001
    g = torch.Generator().manual_seed(5)
    base = torch.randn(n, generator=g)
    models = [base + 0.01 * torch.randn(n, generator=g) for _ in range(3)]
    if stored == "bfloat16":

        def stored_of(x: torch.Tensor) -> np.ndarray:
            return x.bfloat16().view(torch.int16).numpy().view(np.uint16)
    else:

        def stored_of(x: torch.Tensor) -> np.ndarray:
            return x.numpy()

    b, ms = stored_of(base), [stored_of(m) for m in models]
    together = select._count_pairs([(b, m) for m in ms])
    for m, model, counted in zip(ms, models, together):
        alone = select._count((b, m))
        assert alone is not None and np.array_equal(counted.bins(), alone.hist)
        assert (alone.found is None) == (stored == "float32")
        # the split bins: clean (low 15 bits all zero) and dirty counts of each bin apart
        rounded = model.bfloat16().float() if stored == "bfloat16" else model
        below = base.bfloat16().float() if stored == "bfloat16" else base
        bits = (rounded - below).abs().numpy().view(np.uint32)
        top, dirty = bits >> 15, (bits & (2**15 - 1)) != 0
        assert dirty.any() and (~dirty).any()
        split = np.zeros(2 * select.BINS, np.int64)
        counted.add_to(split)
        assert np.array_equal(split[0::2], np.bincount(top[~dirty], minlength=2**16))
        assert np.array_equal(split[1::2], np.bincount(top[dirty], minlength=2**16))
        filled = np.flatnonzero(split[2:]) + 2  # kept: the bins filled, zeros apart
        assert (counted.low, counted.low + len(counted.filled)) == (filled[0], filled[-1] + 1)
    # the thread's histograms come back zeroed: a second pass counts the same
    again = select._count_pairs([(b, m) for m in ms])
    assert all(np.array_equal(x.bins(), y.bins()) for x, y in zip(together, again))
    zeros = select._count_pairs([(b, b)])[0]
    assert zeros.filled.shape == (0,) and zeros.zeros == (n, 0)

    ranges = [(0, 1000), (1000, 200_000), (200_000, n)]
    parts = [[(r, (b[s:e], m[s:e])) for r, (s, e) in enumerate(ranges)] for m in ms]
    jobs = []

    def spy(fn, items):  # noqa: ANN001, ANN202
        items = list(items)
        jobs.append(len(items))
        return [fn(x) for x in items]

    ks = [n // 10, n // 3]
    grouped = select.kth_largest_bits_of([(p, ks, len(ranges)) for p in parts], spy)
    assert jobs[0] == len(ranges)  # one histogram job per base range, not per model
    assert grouped == [select.kth_largest_bits(p, ks, map, len(ranges)) for p in parts]


def test_pairs_answer_from_split_bins_or_collect_the_dirty_answers_bin(monkeypatch):
    """A bfloat16 model's deltas: where the k-th largest is its bin's clean value (tied in
    every range) the split histograms answer alone; where it is a value with low bits, one
    more pass collects the values with low bits of the answers' bins (not the bins whole).
    Both equal the torch selection of the magnitudes,
    ties per range included."""
    from mergekit_math.kernels import select
    from mergekit_math.methods.selection import kth_selects

    n = 400_003
    g = torch.Generator().manual_seed(17)
    base = torch.randn(n, generator=g).bfloat16()
    model = (base.float() + 0.02 * torch.randn(n, generator=g)).bfloat16()
    values = (model.float() - base.float()).abs()
    bits = values.view(torch.int32)
    dirty = bits & (2**15 - 1) != 0
    assert 0 < int(dirty.sum()) < n // 10
    top_dirty = float(values[dirty].max())
    k_dirty = int((values > top_dirty).sum()) + 1
    k_clean = n // 3
    assert int(values.sort(descending=True).values[k_clean - 1].view(torch.int32)) % 2**15 == 0
    ranges = [(0, 7), (7, 200_001), (200_001, n)]

    def stored(x: torch.Tensor) -> np.ndarray:
        return x.view(torch.int16).numpy().view(np.uint16)

    parts = [(r, (stored(base)[s:e], stored(model)[s:e])) for r, (s, e) in enumerate(ranges)]
    calls, dirty_only = [], []
    for name in ("collect_bins", "histogram_low", "histogram_low2"):
        real = getattr(select, name)
        monkeypatch.setattr(select, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    collect = select.collect_bins  # the spy: whether only values with low bits are collected
    monkeypatch.setattr(select, "collect_bins", lambda *a: dirty_only.append(a[5]) or collect(*a))
    clean_ks = [k_clean, n // 5, n - 3]  # the last among the zeros (unchanged entries)
    clean = select.kth_largest_bits(parts, clean_ks, map, len(ranges))
    assert calls == []
    both = select.kth_largest_bits(parts, [k_dirty, k_clean], map, len(ranges))
    assert set(calls) == {"collect_bins"} and dirty_only == [True] * len(ranges)
    monkeypatch.setenv("MMATH_FUSED", "0")
    assert [Selection(*f) for f in clean] == kth_selects(values, clean_ks, ranges=ranges)
    assert clean[2][0] == 0.0 and all(t > 0 for t in clean[2][2][1:])
    slow = kth_selects(values, [k_dirty, k_clean], ranges=ranges)
    assert [Selection(*f) for f in both] == slow
    assert slow[0].threshold == top_dirty and all(t > 0 for t in slow[1].ties[1:])


@pytest.mark.parametrize("spread", [True, False])
def test_float32_selection_collects_the_answers_bins(monkeypatch, spread):
    """float32 values (low bits everywhere): with up to three answers whose bins hold at
    most an eighth of the values, one more pass collects those bins whole (the low-bits
    passes do not run); with the values crowded into the answers' bins, the low-bits
    passes answer. Both equal the torch selection, ties per range included."""
    from mergekit_math.kernels import select
    from mergekit_math.methods.selection import kth_selects

    n = 500_003
    g = torch.Generator().manual_seed(13)
    values = torch.randn(n, generator=g).abs()
    if not spread:  # every value in one bin: [1, 1 + 2^-7)
        values = 1 + torch.rand(n, generator=g) / 256
    values[[3, 250_000, n - 2]] = float(values[77])  # ties of one value in three ranges
    ks = [n - q * (n - 1) // 4 for q in (1, 2, 3)]
    ks[1] = int((values > values[77]).sum()) + 2
    ranges = [(0, 4), (4, 250_001), (250_001, n)]
    calls = []

    def spy(name: str) -> object:
        real = getattr(select, name)
        monkeypatch.setattr(select, name, lambda *a: calls.append(name) or real(*a))

    for name in ("collect_bins", "histogram_low", "histogram_low2"):
        spy(name)
    found = select.kth_largest_bits(select.tensor_parts(values, ranges), ks, map, len(ranges))
    monkeypatch.setenv("MMATH_FUSED", "0")
    slow = kth_selects(values, ks, ranges=ranges)
    assert [Selection(*f) for f in found] == slow
    assert slow[1].threshold == float(values[77])
    if spread:  # (crowded, the value has more copies)
        assert slow[1].ties == [1, 2, 1]
    if spread:
        assert set(calls) == {"collect_bins"}
    else:
        assert calls and "collect_bins" not in calls


# ------------------------------------------------------------------- through the engine

_RECIPES = {
    "linear": "parameters: {weight: 0.3}",
    "breadcrumbs": "parameters: {weight: 0.8, density: 0.6, gamma: 0.05}",
    "breadcrumbs_ties": "parameters: {weight: 1.0, density: 0.5, gamma: 0.1}",
    "task_arithmetic": "parameters: {weight: 0.7}",
    "ties": "parameters: {weight: 1.0, density: 0.4}",
    "dare_ties": "parameters: {weight: 1.0, density: 0.5}",
    "dare_linear": "parameters: {weight: 0.6, density: 0.3}",
}


@pytest.mark.parametrize("method", sorted(_RECIPES))
@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_merges_through_the_engine_equal_the_torch_path(
    tmp_path, monkeypatch, zoo, bf16_zoo, method, stored
):
    """A whole merge in small chunks (so TIES prepares its thresholds over several ranges)
    with the kernels forced on equals the same merge on the torch path, tensor by tensor;
    a small merge does not load the kernels unless told to."""
    from conftest import load_dir, write_recipe

    from mergekit_math import kernels
    from mergekit_math.merge import build_plan, execute
    from mergekit_math.recipe import load_recipe

    models = zoo if stored == "float32" else bf16_zoo
    params = _RECIPES[method]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: {method}\n"
        + ("" if method == "linear" else f"base_model: {models['base']}\n")
        + "models:\n"
        f"  - model: {models['a']}\n    {params}\n  - model: {models['b']}\n    {params}\n",
    )
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    assert plan.output_elements < kernels.MIN_ELEMENTS and not kernels.enabled(
        "cpu", plan.output_elements
    )
    from mergekit_math.merge.fused import FusedRange

    calls = []
    call = FusedRange.__call__

    def counted(*a):
        out = call(*a)
        calls.append(out is not None)  # the kernel ran (None: it declined)
        return out

    monkeypatch.setattr(FusedRange, "__call__", counted)
    outs = {}
    for mode in ("1", "0"):
        calls.clear()
        monkeypatch.setenv("MMATH_FUSED", mode)
        assert kernels.enabled("cpu", plan.output_elements) == (mode == "1")
        plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
        execute(plan, tmp_path / mode, progress=False, chunk_elements=1500)
        outs[mode] = load_dir(tmp_path / mode)
        assert any(calls) == (mode == "1")  # the kernels ran, or did not
    assert outs["1"].keys() == outs["0"].keys()
    for name, ref in outs["0"].items():
        got = outs["1"][name]
        if method == "linear":  # the kernel's fma may round the loop tail one ulp apart
            torch.testing.assert_close(
                got, ref, rtol=2**-7 if stored == "bfloat16" else 1e-6, atol=0
            )
        else:
            _same(got.flatten(), ref.flatten())


@pytest.mark.parametrize("dtype", DTYPES)
def test_mark_ties_marks_the_run_of_ties_in_index_order(dtype):
    """Runs that begin and end inside blocks, on block edges, cover all ties or none."""
    from mergekit_math.kernels.elementwise import mark_ties

    n = 5000
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, generator=g).to(dtype)
    model = (base.float() + torch.randint(-1, 2, (n,), generator=g) * 0.25).to(dtype)
    magnitude = (model.float() - base.float()).abs()
    values, counts = magnitude.unique(return_counts=True)
    value = float(values[counts.argmax()])  # the commonest magnitude
    tied = (magnitude == value).nonzero().flatten()
    count = tied.numel()
    assert count > 1500
    as_np = [t.view(torch.int16).numpy().view(np.uint16) for t in (base, model)]
    if dtype == torch.float32:
        as_np = [base.numpy(), model.numpy()]
    runs = [(0, count), (0, 0), (1, 1), (37, 512), (511, 513), (count - 3, 3), (700, count - 700)]
    for skip, take in runs:
        sel = np.zeros(n, np.uint8)
        sel[::97] = 1  # marks already there stay
        mark_ties(*as_np, np.float32(value), skip, take, sel)
        expect = np.zeros(n, np.uint8)
        expect[::97] = 1
        expect[tied[skip : skip + take].numpy()] = 1
        assert np.array_equal(sel, expect), (skip, take)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_selection_merges_read_each_range_once_with_the_kernels(
    tmp_path, monkeypatch, bf16_zoo, method
):
    """With the kernels, the ranges read for a tensor's threshold selection are the ones
    merged (no second read); the torch path assembles each input's magnitude by reading
    its ranges again."""
    from collections import Counter

    from conftest import write_recipe

    from mergekit_math.io.reader import Checkpoint
    from mergekit_math.merge import build_plan, execute
    from mergekit_math.recipe import load_recipe

    reads: Counter = Counter()

    def counting(read):
        def counted(self, name, start, end, *args, **kwargs):
            reads[(id(self), name, start, end)] += 1
            return read(self, name, start, end, *args, **kwargs)

        return counted

    # into tensors, or into numpy arrays where the merge runs without torch
    monkeypatch.setattr(Checkpoint, "read_range", counting(Checkpoint.read_range))
    monkeypatch.setattr(Checkpoint, "read_host", counting(Checkpoint.read_host))
    monkeypatch.setattr(Checkpoint, "map_host", counting(Checkpoint.map_host))
    params = _RECIPES[method]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: {method}\nbase_model: {bf16_zoo['base']}\nmodels:\n"
        f"  - model: {bf16_zoo['a']}\n    {params}\n  - model: {bf16_zoo['b']}\n    {params}\n",
    )
    for mode in ("1", "0"):
        reads.clear()
        monkeypatch.setenv("MMATH_FUSED", mode)
        plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
        execute(plan, tmp_path / mode, progress=False, chunk_elements=1500)
        assert reads and (max(reads.values()) == 1) == (mode == "1"), mode


def test_picks_find_the_bin_of_each_kth_largest():
    """select.picks (one sum from the top over the filled bins) gives, for each k, the bin
    of the k-th largest of the values a histogram counts and how many lie in higher bins,
    as sorting those values does; bins at both ends and empty gaps included."""
    from mergekit_math.kernels.select import pick, picks

    rng = np.random.default_rng(5)
    for trial in range(300):
        hist = np.zeros(1 << 16, np.int32)
        spots = rng.integers(0, 1 << 16, rng.integers(1, 40))
        np.add.at(hist, spots, rng.integers(1, 6, spots.shape[0]).astype(np.int32))
        hist[0] += trial % 3 == 0
        hist[-1] += trial % 5 == 0
        values = np.repeat(np.arange(1 << 16), hist)[::-1]  # descending bins
        ks = [1, values.shape[0], *rng.integers(1, values.shape[0] + 1, 4).tolist()]
        want = [(int(values[k - 1]), int((values > values[k - 1]).sum())) for k in ks]
        assert picks(hist, ks) == want, trial
        assert pick(hist, ks[-1]) == want[-1]


def test_any_nonfinite_finds_each_kind_at_any_place():
    """scalar.any_nonfinite (the check before _count_bad counts): NaN, -NaN, inf and -inf at
    any place of bfloat16 bits or float32, and not the largest finite values or -0."""
    from numba import njit

    from mergekit_math.kernels.scalar import any_nonfinite

    @njit
    def check(a):  # noqa: ANN001, ANN202
        return any_nonfinite(a)

    for dtype, bits, finite in (
        (np.uint16, [0x7F80, 0xFF80, 0x7FC0, 0xFFC1], [0x7F7F, 0xFF7F, 0x8000, 0x0001]),
        (np.float32, [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001], [0x7F7FFFFF, 0xFF7FFFFF]),
    ):
        view = np.uint16 if dtype == np.uint16 else np.uint32
        for n in (1, 17, 100):
            clean = np.resize(np.array(finite, view), n)
            assert not check(clean.view(dtype)), (dtype, n)
            for b in bits:
                for at in {0, n // 2, n - 1}:
                    x = clean.copy()
                    x[at] = b
                    assert check(x.view(dtype)), (dtype, hex(b), at, n)


def test_importance_flags_only_where_some_importance_is_not_finite_or_signed():
    """fusion.importances' flags (bit 0: NaN or inf, bit 1: sign bit set), which its loop
    counts only where the largest bit pattern reaches the exponent's all-ones, and its
    histogram of the importances' top 16 bits."""
    from mergekit_math.kernels.fusion import importances
    from mergekit_math.kernels.select import BINS

    rng = np.random.default_rng(2)
    row = 37
    base = rng.standard_normal(4 * row).astype(np.float32)
    model = base + rng.standard_normal(4 * row).astype(np.float32) * 0.01
    kl = np.array([0.5, 2.0, 1e-3, 7.0], np.float32)
    for change, want in (
        (None, 0),
        (("model", 5, np.inf), 1),
        (("model", 80, np.nan), 1),
        (("kl", 2, -0.25), 2),
        (("kl", 3, -0.0), 2),
        (("both", 0, np.nan), 3),
    ):
        b, m, k = base.copy(), model.copy(), kl.copy()
        if change is not None:
            where, at, value = change
            if where in ("model", "both"):
                m[at] = value
            if where in ("kl", "both"):
                k[2 if where == "both" else at] = -1.0 if where == "both" else value
        out, hist = np.empty_like(b), np.zeros(BINS, np.int32)
        assert importances(b, m, k, np.int64(row), out, hist) == want, change
        expect = np.abs(m - b) * np.repeat(k, row)
        nan = np.isnan(expect)
        assert (np.isnan(out) == nan).all()
        assert (out[~nan].view(np.uint32) == expect[~nan].view(np.uint32)).all()
        if want == 0:
            bins = np.minimum(out.view(np.uint32) >> 15, BINS - 1)
            assert np.array_equal(hist, np.bincount(bins, minlength=BINS))
