"""The math of each method on small seeded tensors: references written out in full here,
and properties (kept fraction ≈ density, zero deltas return the base, expectation preserved)."""

from __future__ import annotations

import math

import pytest
import torch
from mask_reference import keeps as reference_keeps

from mergekit_math.methods import MergeInputs, get_method
from mergekit_math.methods.masks import MaskStream
from mergekit_math.methods.sparsify import (
    della_drop,
    magnitude_outliers_prune,
    magnitude_prune,
    random_drop,
)


def _inputs(name: str, base, tensors, per_model: list[dict], shared: dict | None = None, seed=0):
    m = get_method(name)
    gens = None
    if m.random:
        gens = [MaskStream(seed + i) for i in range(len(tensors))]
    return m, MergeInputs(
        base=base,
        tensors=tensors,
        params=[m.model_params.model_validate(p) for p in per_model],
        shared=m.shared_params.model_validate(shared or {}),
        generators=gens,
    )


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- sparsification


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.9])
def test_random_drop_kept_fraction_within_3_sigma(density):
    delta = _rand(400, 250, seed=1)
    n = delta.numel()
    kept = random_drop(delta, density, None, MaskStream(7))
    frac = (kept != 0).float().mean().item()
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(frac - density) < 3 * sigma
    # dropped-only: kept entries are untouched
    mask = kept != 0
    assert torch.equal(kept[mask], delta[mask])


def test_random_drop_paper_rescale_preserves_expectation():
    delta = _rand(64, 64, seed=2)
    density = 0.25
    draws = torch.stack([random_drop(delta, density, "paper", MaskStream(s)) for s in range(400)])
    mean = draws.mean(dim=0)
    # each entry is delta/p with prob p: mean error std = |delta|*sqrt((1-p)/p)/sqrt(400)
    stderr = delta.abs() * math.sqrt((1 - density) / density) / math.sqrt(400)
    assert ((mean - delta).abs() <= 4 * stderr + 1e-6).float().mean() > 0.999
    kept = draws[0] != 0
    assert torch.allclose(draws[0][kept], delta[kept] / density)


def test_random_drop_l1_rescale_matches_l1_norm():
    delta = _rand(50, 40, seed=3)
    kept = random_drop(delta, 0.3, "l1", MaskStream(0))
    assert torch.isclose(kept.abs().sum(), delta.abs().sum(), rtol=1e-5)


def test_random_drop_is_deterministic_per_stream():
    delta = _rand(30, 30)
    a = random_drop(delta, 0.5, "paper", MaskStream(11))
    b = random_drop(delta, 0.5, "paper", MaskStream(11))
    c = random_drop(delta, 0.5, "paper", MaskStream(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.77])
def test_magnitude_prune_keeps_exactly_the_top_k(density):
    delta = _rand(37, 53, seed=4)
    kept = magnitude_prune(delta, density, None)
    k = max(1, int(density * delta.numel()))
    assert int((kept != 0).sum()) == k
    threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
    assert torch.equal(kept != 0, delta.abs() >= threshold)


def test_magnitude_outliers_drops_top_gamma_and_bottom():
    delta = _rand(100, 10, seed=5)
    kept = magnitude_outliers_prune(delta, 0.5, 0.1, None)
    order = delta.abs().flatten().argsort()
    n = delta.numel()
    expect = torch.zeros(n, dtype=torch.bool)
    expect[order[n - 500 - 100 : n - 100]] = True
    assert torch.equal((kept != 0).flatten(), expect)


def test_della_keep_probability_grows_with_magnitude():
    delta = _rand(200, 500, seed=6)
    kept = della_drop(delta, 0.5, 0.4, None, MaskStream(0))
    small = delta.abs() < delta.abs().quantile(0.2)
    large = delta.abs() > delta.abs().quantile(0.8)
    assert (kept[small] != 0).float().mean() < 0.3
    assert (kept[large] != 0).float().mean() > 0.7
    assert abs((kept != 0).float().mean().item() - 0.5) < 0.01


def test_della_rejects_epsilon_outside_density():
    with pytest.raises(ValueError, match="density ± epsilon"):
        della_drop(_rand(4, 4), 0.1, 0.2, None, MaskStream(0))


# ------------------------------------------------------------------------- merges vs reference


def test_linear_reference():
    xs = [_rand(8, 5, seed=s) for s in range(3)]
    w = [0.2, 0.5, 1.3]
    m, inp = _inputs("linear", None, xs, [{"weight": v} for v in w])
    expect = sum(wi * xi for wi, xi in zip(w, xs)) / sum(w)
    torch.testing.assert_close(m.merge(inp), expect)
    m, inp = _inputs("linear", None, xs, [{"weight": v} for v in w], {"normalize": False})
    torch.testing.assert_close(m.merge(inp), sum(wi * xi for wi, xi in zip(w, xs)))


def test_task_arithmetic_reference_with_lambda():
    base = _rand(6, 7, seed=0)
    deltas = [_rand(6, 7, seed=s) * 0.1 for s in (1, 2)]
    m, inp = _inputs(
        "task_arithmetic", base, deltas, [{"weight": 0.7}, {"weight": -0.4}], {"lambda": 0.5}
    )
    torch.testing.assert_close(m.merge(inp), base + 0.5 * (0.7 * deltas[0] - 0.4 * deltas[1]))


def _ties_reference(base, deltas, weights, density):
    """TIES written out entry by entry from the paper (trim, elect, disjoint mean)."""
    trimmed = []
    for d in deltas:
        k = max(1, int(density * d.numel()))
        thr = d.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(d.abs() >= thr, d, torch.zeros_like(d)))
    weighted = [w * t for w, t in zip(weights, trimmed)]
    out = base.clone()
    for idx in range(base.numel()):
        vals = [float(x.flatten()[idx]) for x in weighted]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [(v, w) for v, w in zip(vals, weights) if v != 0 and math.copysign(1, v) == sign]
        if agree:
            out.view(-1)[idx] += sum(v for v, _ in agree) / sum(w for _, w in agree)
    return out


def test_ties_reference():
    base = _rand(9, 11, seed=0)
    deltas = [_rand(9, 11, seed=s) for s in (1, 2, 3)]
    weights = [0.3, 0.5, 0.9]
    m, inp = _inputs("ties", base, deltas, [{"weight": w, "density": 0.4} for w in weights])
    torch.testing.assert_close(m.merge(inp), _ties_reference(base, deltas, weights, 0.4))


def test_dare_linear_matches_manual_mask():
    base = _rand(20, 20, seed=0)
    deltas = [_rand(20, 20, seed=s) for s in (1, 2)]
    m, inp = _inputs("dare_linear", base, deltas, [{"weight": 0.5, "density": 0.3}] * 2, seed=5)
    out = m.merge(inp)
    expect = base.clone()
    for i, d in enumerate(deltas):
        # the mask definition, element by element (tests/mask_reference.py)
        mask = torch.tensor(reference_keeps(5 + i, 0, [0.3] * d.numel()))
        mask = mask.reshape(d.shape)
        expect += 0.5 * d * mask / 0.3
    torch.testing.assert_close(out, expect)


def test_slerp_reference_and_endpoints():
    a, b = _rand(10, 6, seed=0), _rand(10, 6, seed=1)
    m, inp = _inputs("slerp", a, [b], [{}], {"t": 0.3})
    ua, ub = a.flatten() / a.norm(), b.flatten() / b.norm()
    theta = torch.acos((ua * ub).sum())
    expect = (torch.sin(0.7 * theta) * a + torch.sin(0.3 * theta) * b) / torch.sin(theta)
    torch.testing.assert_close(m.merge(inp), expect)
    for t, target in ((0.0, a), (1.0, b)):
        m, inp = _inputs("slerp", a, [b], [{}], {"t": t})
        torch.testing.assert_close(m.merge(inp), target)
    # (anti)parallel inputs fall back to linear interpolation
    m, inp = _inputs("slerp", a, [2 * a], [{}], {"t": 0.5})
    torch.testing.assert_close(m.merge(inp), 1.5 * a)


def test_model_stock_reference():
    base = _rand(12, 8, seed=0)
    ws = [base + _rand(12, 8, seed=s) * 0.1 for s in (1, 2, 3)]
    m, inp = _inputs("model_stock", base, ws, [{}, {}, {}])
    offs = [(w - base).flatten() for w in ws]
    cos = [
        torch.dot(offs[i], offs[j]) / (offs[i].norm() * offs[j].norm())
        for i in range(3)
        for j in range(i + 1, 3)
    ]
    c = sum(cos) / 3
    t = 3 * c / (1 + 2 * c)
    torch.testing.assert_close(m.merge(inp), t * sum(ws) / 3 + (1 - t) * base)


# Zero deltas return the base, for every method: tests/test_contract.py.


def test_paper_rescale_refused_for_magnitude_methods():
    m = get_method("ties")
    shared = m.shared_params.model_validate({"rescale": "paper"})
    assert "random drops" in m.check(shared, [])[2]
    assert get_method("dare_ties").check(shared, []) is None


def test_density_out_of_range_is_a_validation_error():
    from pydantic import ValidationError

    m = get_method("ties")
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValidationError):
            m.model_params.model_validate({"weight": 1, "density": bad})


def test_magnitude_prune_ties_at_threshold_keep_exactly_k_in_index_order():
    delta = torch.tensor([0.5, -0.5, 0.5, 0.1, 0.9, -0.5])
    kept = magnitude_prune(delta, 0.5, None)  # k = 3: 0.9 and the first two 0.5s
    assert torch.equal(kept, torch.tensor([0.5, -0.5, 0.0, 0.0, 0.9, 0.0]))


# Results do not depend on the thread count, for every method: tests/test_contract.py.


def test_reduce_sum_is_thread_independent():
    from mergekit_math.methods import reduce_norm, reduce_sum

    x = _rand(3_000_000, seed=9)
    before = torch.get_num_threads()
    try:
        vals = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            vals.append((reduce_sum(x.abs()).item(), reduce_norm(x).item()))
    finally:
        torch.set_num_threads(before)
    assert vals[0] == vals[1] == vals[2]
