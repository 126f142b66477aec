"""The sort-free selections of sparsify.py (Breadcrumbs' rank window, DELLA's row ranks)
against plain sort-based references, on tensors with many ties, at odd sizes and on both
sides of the sampled-selection cut-over (``_DIRECT_SELECT``)."""

from __future__ import annotations

import pytest
import torch

from mergekit_math.methods.masks import MaskStream
from mergekit_math.methods.selection import _DIRECT_SELECT
from mergekit_math.methods.sparsify import (
    RankWindow,
    della_drop,
    magnitude_outliers_prune,
    rank_window,
    row_ranks,
)


def _quantised(n: int, levels: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Values on a grid of ``levels`` steps (so each value repeats n/levels times)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * levels / 4).round().div(levels).to(dtype)


def _window_reference(values: torch.Tensor, first: int, count: int) -> torch.Tensor:
    order = torch.sort(values, stable=True).indices
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order[first : first + count]] = True
    return mask


@pytest.mark.parametrize("n", [1, 7, 1001, 65_537, _DIRECT_SELECT + 12_345])
@pytest.mark.parametrize("levels", [3, 50, 4000])
def test_rank_window_matches_a_stable_sort(n, levels):
    values = _quantised(n, levels, seed=n + levels).abs()
    g = torch.Generator().manual_seed(levels)
    for _ in range(4 if n < _DIRECT_SELECT else 2):
        first = int(torch.randint(0, n, (1,), generator=g))
        count = int(torch.randint(0, n - first + 1, (1,), generator=g))
        got = rank_window(values, first, count)
        assert torch.equal(got, _window_reference(values, first, count)), (first, count)
        assert int(got.sum()) == count


def test_rank_window_edges_and_bfloat16():
    values = _quantised(30_011, 20, seed=3, dtype=torch.bfloat16).abs()
    n = values.numel()
    for first, count in [(0, n), (0, 1), (n - 1, 1), (0, 0), (n // 2, 0), (123, n - 123)]:
        expect = _window_reference(values, first, count)
        assert torch.equal(rank_window(values, first, count), expect)
    same = torch.full((1001,), 0.25)  # one value: the window is a run of indices
    assert torch.equal(rank_window(same, 100, 300), _window_reference(same, 100, 300))


@pytest.mark.parametrize("first,count", [(9_000, 80_000), (0, 100_003), (50_000, 1), (7, 0)])
def test_rank_window_in_chunks_any_order_equals_the_whole(first, count):
    values = _quantised(100_003, 40, seed=first).abs()
    edges = [0, 1, 997, 40_000, 40_001, 99_000, 100_003]
    ranges = list(zip(edges[:-1], edges[1:]))
    window = RankWindow(values, first, count, ranges)
    parts = {s: window.keep(values[s:e], s) for s, e in reversed(ranges)}
    got = torch.cat([parts[s] for s, _ in ranges])
    assert torch.equal(got, _window_reference(values, first, count))


def _breadcrumbs_reference(delta, density, gamma):
    """mergekit 0.1.5's magnitude_outliers with equal magnitudes in index order."""
    n = delta.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    flat = delta.reshape(-1)
    keep = torch.sort(flat.abs(), stable=True).indices[n_bottom : n_bottom + target]
    kept = torch.zeros_like(flat)
    kept[keep] = flat[keep]
    return kept.reshape(delta.shape)


@pytest.mark.parametrize(
    "shape,density,gamma",
    [((37, 29), 0.5, 0.1), ((1031, 1033), 0.9, 0.01), ((1, 5), 0.4, 0.0), ((3, 1), 0.1, 0.5)],
)
def test_breadcrumbs_matches_a_sort_reference_bit_for_bit(shape, density, gamma):
    n = shape[0] * shape[1]
    delta = _quantised(n, 64, seed=n).reshape(shape)
    got = magnitude_outliers_prune(delta, density, gamma, None)
    expect = _breadcrumbs_reference(delta, density, gamma)
    assert torch.equal(got.view(torch.int32), expect.view(torch.int32))  # -0.0 included
    got_l1 = magnitude_outliers_prune(delta, density, gamma, "l1")
    assert torch.equal(got_l1 != 0, expect != 0)


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (129, 1001), (4097,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_row_ranks_are_the_stable_argsort_ranks(shape, dtype):
    n = int(torch.tensor(shape).prod())
    rows = _quantised(n, 8, seed=len(shape), dtype=dtype).abs()
    rows[..., :3] = torch.tensor([0.0, float("inf"), 1e-30]).to(dtype)[: rows.shape[-1]]
    rows = rows.reshape(1, -1) if len(shape) == 1 else rows.reshape(shape)
    expect = rows.argsort(dim=1, stable=True).argsort(dim=1)
    assert torch.equal(row_ranks(rows), expect)


def _della_reference(delta, density, epsilon, stream):
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).to(torch.float32)
    span = (rows.shape[1] - 1) or 1
    probs = (density - epsilon) + (ranks / span) * (2 * epsilon)
    mask = stream.keep_with(0, probs).reshape(rows.shape)
    return (rows * mask).reshape(delta.shape), probs


def test_della_matches_the_double_argsort_reference():
    delta = _quantised(211 * 333, 16, seed=9).reshape(211, 333)
    stream = MaskStream.of(3, 1, "model.layers.0.mlp.up_proj.weight")
    expect, probs = _della_reference(delta, 0.5, 0.3, stream)
    got = della_drop(delta, 0.5, 0.3, None, stream)
    assert torch.equal(got.view(torch.int32), expect.view(torch.int32))
    paper = della_drop(delta, 0.5, 0.3, "paper", stream)
    assert torch.equal(paper, expect.div(probs.reshape(delta.shape)))


def test_tie_rules_widen_whole_chunks_and_run_only_where_kept_ties_end():
    """A trim's ties are kept in index order: the chunks before the one where they run out
    keep every tie by a bound moved one float32 below the threshold, that one chunk gets a
    run, the chunks after keep none (strict bound)."""
    from mergekit_math.methods.sparsify import MagnitudeTrim

    values = torch.full((10_000,), 0.5)
    values[::7] = 1.0  # 1429 above the threshold, 8571 equal to it
    ranges = [(s, min(s + 1000, 10_000)) for s in range(0, 10_000, 1000)]
    trim = MagnitudeTrim(values, 0.5, ranges)
    assert trim.threshold == 0.5
    with_runs = [s for s, rule in trim.rules.items() if rule.runs]
    assert len(with_runs) == 1
    widened = [s for s, rule in trim.rules.items() if rule.low < 0.5]
    assert widened == [s for s, _ in ranges if s < with_runs[0]]
    assert all(trim.rules[s].low == 0.5 for s, _ in ranges if s > with_runs[0])
    keep = torch.cat([trim.rules[s].keep(values[s:e]) for s, e in ranges])
    tied = (values == 0.5).nonzero().flatten()
    assert int(keep.sum()) == 5000 and bool(keep[values == 1.0].all())
    assert torch.equal((keep & (values == 0.5)).nonzero().flatten(), tied[: 5000 - 1429])


def test_rank_window_with_both_ends_partial_in_one_chunk():
    """Ties at both ends of a window cut inside the same chunk: two runs in one rule."""
    values = torch.tensor([0.1, 0.2, 0.3] * 100)
    window = RankWindow(values, 50, 120, [(0, 300)])
    (rule,) = window.rules.values()
    assert len(rule.runs) == 2
    assert torch.equal(window.keep(values), _window_reference(values, 50, 120))
