"""DELLA's compiled keep pass (``kernels.ranks.della_decisions``: decisions from bins of
the magnitudes' top bits, exact ranks for the uncertain entries or a radix sort, the mask
stream's decisions and the L1 sums in one call) against a reference written with torch:
stable ranks of each row's magnitudes (``sparsify.row_ranks``), the probabilities in
float32 steps, ``MaskStream.keep_with``'s numpy decisions, float64 sums."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from mask_reference import BLOCK, key_of

from mergekit_math.kernels import ranks as kernel
from mergekit_math.kernels.target import has_avx512
from mergekit_math.methods import magprune
from mergekit_math.methods.masks import MaskStream
from mergekit_math.methods.sparsify import row_ranks

LOW, STEP = np.float32(0.35), np.float32(0.3)


def _bf16(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _pair(rows: int, row: int, rel: float, seed: int, same: float = 0.0) -> tuple:
    """A bfloat16 (base, fine-tune) pair of ``rows × row``: deltas ``rel`` of the weights,
    a fraction ``same`` of the entries left equal (zero deltas)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows * row, generator=g) * 0.02
    ft = base + torch.randn(rows * row, generator=g) * 0.02 * rel
    ft = torch.where(torch.rand(rows * row, generator=g) < same, base, ft)
    return _bf16(base), _bf16(ft)


def _values(src) -> torch.Tensor:
    if isinstance(src, tuple):
        b, m = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float() for a in src)
        return m - b
    return torch.from_numpy(src)


def _reference(src, row: int, stream: MaskStream, start: int) -> tuple:
    x = _values(src)
    ranks = row_ranks(x.abs().reshape(-1, row)).reshape(-1).to(torch.float32)
    probs = LOW + (ranks / np.float32(max(row - 1, 1))) * STEP
    kept = stream.keep_with(start, probs)
    before = x.abs().double().sum().item()
    after = (x * kept).abs().double().sum().item()
    return kept.numpy(), before, after


def _run(src, row: int, stream: MaskStream, start: int, spare_words: int | None = None):
    n = _values(src).numel()
    primary, spare = stream.words(start, n)
    if spare_words is not None:
        spare = spare[:, :spare_words]
    kept, sums = np.empty(n, np.bool_), np.zeros(2)
    done = kernel.della_decisions(src, row, LOW, STEP, primary, spare, kept, sums)
    return done, kept, sums


def _check(src, row: int, start: int = 0) -> None:
    """The ranks (radix-sorted), decisions and sums against the reference."""
    x = _values(src)
    ranks = np.empty(x.numel(), np.int32)
    kernel.della_ranks(src, row, ranks)
    assert np.array_equal(ranks, row_ranks(x.abs().reshape(-1, row)).reshape(-1).numpy())
    stream = MaskStream(key_of(5, 1, "t"))
    done, kept, sums = _run(src, row, stream, start)
    assert done
    expect, before, after = _reference(src, row, stream, start)
    assert np.array_equal(kept, expect)
    assert sums[0] == pytest.approx(before, rel=1e-12, nan_ok=True)
    assert sums[1] == pytest.approx(after, rel=1e-12, nan_ok=True)
    assert np.float32(sums[1]) == np.float32(after) or np.isnan(after)


@pytest.mark.parametrize("start", [0, 3 * BLOCK])
@pytest.mark.parametrize("rows,row,rel,same", [(40, 5632, 0.1, 0.0), (96, 2048, 0.01, 0.3)])
def test_bfloat16_deltas_across_blocks(start, rows, row, rel, same):
    """Rows that straddle mask blocks, from a later block too; deltas with and without
    lower bits and many exact zeros (the binned decisions)."""
    _check(_pair(rows, row, rel, seed=rows, same=same), row, start)


def test_float32_values():
    """Stored float32 values: nearly every magnitude has lower bits, so the uncertain
    entries are placed in their bins by counts over the row."""
    x = torch.randn(30 * 1000, generator=torch.Generator().manual_seed(1)).numpy()
    _check(x, 1000)


def test_bfloat16_rows_of_few_magnitudes():
    """Rows whose deltas take a handful of values (bins of hundreds of equal magnitudes,
    a third of their entries uncertain): each ranks by its count of equal ones before it.
    One row holds a single magnitude, one a few with lower bits among them."""
    g = torch.Generator().manual_seed(7)
    levels = torch.tensor([0.0, 1e-3, 2e-3, 4e-3, 8e-3, 1.5e-2]).to(torch.bfloat16).float()
    x = levels[torch.randint(0, 6, (8, 2048), generator=g)]
    x = x * torch.where(torch.rand(8, 2048, generator=g) < 0.5, -1.0, 1.0)
    x[2] = 3e-3
    x[5, ::97] = x[5, ::97] + 1e-7  # lower bits set in bins of equal magnitudes
    _check(x.reshape(-1).numpy(), 2048)


def test_float32_magnitudes_alike_take_the_radix_sort():
    """A float32 row whose magnitudes share their top 16 bits (hundreds of uncertain
    entries with lower bits) is radix-sorted, between rows that are not; equal values
    among them rank in index order."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 4096, generator=g)
    x[1] = 0.5 + torch.rand(4096, generator=g) * 1e-3
    x[1, 100:200] = x[1, 50]
    x[3] = -(0.25 + torch.rand(4096, generator=g) * 1e-4)
    _check(x.reshape(-1).numpy(), 4096)


def test_rows_the_bins_give_up_on():
    """A row whose magnitudes span more binary exponents than the bins hold, one with a
    subnormal (top bits zero), one with inf and NaN, one all zeros, between binned rows."""
    x = torch.randn(6, 4096, generator=torch.Generator().manual_seed(2)) * 0.01
    x = x.to(torch.bfloat16).float()
    x[1, 7] = 1e-30
    x[2, 9] = 1e-45
    x[3, 3], x[3, 4], x[3, 5] = float("inf"), float("nan"), -float("inf")
    x[2, 100:110] = 0.0
    x[4] = 0.0
    _check(x.reshape(-1).numpy(), 4096)


def test_rows_at_the_edge_of_the_bins_16_bit_counts():
    """Rows of 65,535 entries, 80% of one magnitude (a bin's counts past 32,767: the
    packed counts are unsigned), zero (the scalar step's bin) or not (the vector step's),
    are binned; a row of 65,536 takes the radix sort."""
    g = torch.Generator().manual_seed(9)
    for row, common in ((65535, 0.0), (65535, 2e-3), (65536, 2e-3)):
        x = torch.randn(row, generator=g) * 0.01
        x[torch.rand(row, generator=g) < 0.8] = common
        _check(x.to(torch.bfloat16).float().numpy(), row)


def test_a_bin_with_many_entries_with_lower_bits():
    """40 magnitudes sharing their top 16 bits (and some equal) with distinct lower bits, in
    a row of bfloat16 values: uncertain entries with lower bits placed among many of their
    bin (``_place``), equal ones among them in index order."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 2048, generator=g) * 0.01).to(torch.bfloat16).float()
    low_bits = torch.randint(1, 1 << 16, (40,), generator=g, dtype=torch.int32)
    low_bits[5:9] = low_bits[0]
    x[1, 100:140] = ((torch.tensor(0.5).view(torch.int32) | low_bits).view(torch.float32)) * -1
    x[1, 20:25] = (torch.tensor(0.25).view(torch.int32) | low_bits[:5]).view(torch.float32)
    x[2, 10:15] = x[1, 20:25]
    _check(x.reshape(-1).numpy(), 2048)


@pytest.mark.parametrize("row", [1, 777])
def test_short_and_odd_rows(row):
    _check(_pair(300, row, 0.1, seed=row), row)


def test_ties_beyond_the_spare_words_are_refused():
    """A block whose ties outgrow the spare words given: False, not a wrong decision."""
    src = _pair(20, 5632, 0.1, seed=4)
    stream = MaskStream(key_of(5, 1, "t"))
    assert not _run(src, 5632, stream, 0, spare_words=3)[0]
    assert _run(src, 5632, stream, 0)[0]


def test_magprune_falls_back_when_ties_overflow(monkeypatch):
    """``magprune._decisions`` takes the stream's general path (probabilities, then
    ``keep_with``) when the compiled pass refuses, with the same decisions and sums."""
    src = _pair(24, 2048, 0.1, seed=5)
    stream = MaskStream(key_of(2, 0, "w"))
    n = 24 * 2048
    kept, sums = magprune._decisions(src, 0, n, 2048, LOW, STEP, stream)
    monkeypatch.setattr(kernel, "della_decisions", lambda *args: False)
    again, sums_again = magprune._decisions(src, 0, n, 2048, LOW, STEP, stream)
    assert np.array_equal(kept, again)
    assert sums == pytest.approx(sums_again, rel=1e-12)
    assert np.float32(sums[1]) == np.float32(sums_again[1])


def test_l1_sums_are_float64_at_every_length():
    """DELLA's L1 factor comes from float64 sums rounded once to float32 also on a tensor
    short enough for ``reduce_sum``'s float32 sum (here it differs: the test can fail); the
    compiled decisions give the same sums (the chunked merge equals this whole path:
    test_contract.py)."""
    from mergekit_math.methods.base import reduce_sum
    from mergekit_math.methods.sparsify import della_drop

    src = _pair(4, 2048, 0.1, seed=6)
    x = _values(src).reshape(4, 2048)
    stream = MaskStream(key_of(5, 1, "t"))
    kept = della_drop(x, 0.5, 0.15, None, stream)
    before = np.float32(x.abs().double().sum().item())
    after = np.float32(kept.abs().double().sum().item())
    assert reduce_sum(x.abs()).item() != before or reduce_sum(kept.abs()).item() != after
    assert torch.equal(della_drop(x, 0.5, 0.15, "l1", stream), kept * float(before / after))
    _, (got_before, got_after) = magprune._decisions(
        src, 0, x.numel(), 2048, np.float32(0.35), np.float32(0.3), stream
    )
    assert (np.float32(got_before), np.float32(got_after)) == (before, after)


@pytest.mark.skipif(not has_avx512(), reason="the generic path is the one the tests above take")
def test_the_same_decisions_compiled_without_avx512(tmp_path):
    """Without AVX-512 the vector steps (kernels.della_lanes) take LLVM's generic gather:
    this file's checks, compiled for this CPU with its AVX-512 features turned off."""
    from numba.core.codegen import get_host_cpu_features

    features = ",".join(
        "-" + f[1:] if f.startswith("+avx512") else f for f in get_host_cpu_features().split(",")
    )
    env = {**os.environ, "NUMBA_CPU_FEATURES": features, "NUMBA_CACHE_DIR": str(tmp_path)}
    picked = "bfloat16_deltas or float32_values or short_and_odd or few_magnitudes"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", picked],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


def test_blocks_must_be_a_power_of_two_wide():
    """The uncertain entries' blocks are found by shifts: rows of bytes of another width
    are refused, not misread."""
    x = torch.randn(4, 64)
    primary, spare = np.zeros((1, 1000), np.uint8), np.zeros((1, 512), np.int64)
    kept, sums = np.empty(x.numel(), np.bool_), np.zeros(2)
    with pytest.raises(ValueError, match="power of two"):
        kernel.della_decisions(x.numpy().reshape(-1), 64, LOW, STEP, primary, spare, kept, sums)
