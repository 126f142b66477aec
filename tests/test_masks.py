"""The DARE/DELLA keep masks (definition version 2, ``mergekit_math.methods.masks``): the
vectorised code against the definition written out in Python integers, Philox's known
answers, independence of chunking, thread count, backend and device, and the statistics."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from mask_reference import BLOCK, keeps, key_of, philox4x64_10, spare

from mergekit_math.methods import masks
from mergekit_math.methods.masks import MASK_VERSION, MaskStream, keep_threshold, mask_key
from mergekit_math.methods.sparsify import KeepMask, della_drop, random_drop

M64 = 2**64 - 1
# Random123's kat_vectors for philox4x64 with 10 rounds: (counter, key) -> output.
KAT = [
    (
        (0, 0, 0, 0),
        (0, 0),
        [0x16554D9ECA36314C, 0xDB20FE9D672D0FDC, 0xD7E772CEE186176B, 0x7E68B68AEC7BA23B],
    ),  # noqa: E501
    (
        (M64,) * 4,
        (M64,) * 2,
        [0x87B092C3013FE90B, 0x438C3C67BE8D0224, 0x9CC7D7C69CD777B6, 0xA09CAEBF594F0BA0],
    ),  # noqa: E501
    (
        (0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0, 0x082EFA98EC4E6C89),
        (0x452821E638D01377, 0xBE5466CF34E90C6C),
        [0xA528F45403E61D95, 0x38C72DBD566E9788, 0xA5A1610E72FD18B5, 0x57BD43B5E52B7FE6],
    ),
]


@pytest.fixture
def torch_ops(monkeypatch):
    """Compute the words with the torch ops (the GPU path) on the CPU."""
    monkeypatch.setattr(masks, "_numpy_backend", lambda device: False)


@pytest.mark.parametrize("counter,key,expect", KAT)
def test_philox_gives_the_known_answers(counter, key, expect):
    k = key[0] | key[1] << 64
    assert philox4x64_10(counter, key) == expect == masks.philox4x64(counter, k)


@pytest.mark.parametrize("first", [0, 1, 2**32 - 3, 2**62 + 5])
def test_numpy_and_torch_words_are_philox(first):
    key = random.Random(first).getrandbits(128)
    words = masks.raw_numpy(key, first, 5)
    assert torch.equal(masks.raw_torch(key, first, 5, "cpu"), torch.from_numpy(words.view("i8")))
    expect = [
        w
        for c in range(first, first + 5)
        for w in philox4x64_10((c, 0, 0, 0), (key & M64, key >> 64))
    ]  # noqa: E501
    assert words.tolist() == expect


def test_key_is_the_documented_hash():
    assert mask_key(3, 1, "model.layers.0.mlp.up_proj.weight") == key_of(
        3, 1, "model.layers.0.mlp.up_proj.weight"
    )
    assert MaskStream.of(3, 1, "w").key == key_of(3, 1, "w") != key_of(3, 2, "w")
    assert MASK_VERSION == 2


@pytest.mark.parametrize("density", [0.1, 1 / 3, 0.999, 1 - 2**-40])
@pytest.mark.parametrize("numpy_backend", [True, False])
def test_keep_matches_the_definition(density, numpy_backend, monkeypatch):
    """Two blocks' worth of elements (so ranks restart), sampled past the first 3000."""
    monkeypatch.setattr(masks, "_numpy_backend", lambda device: numpy_backend)
    key = key_of(0, 0, "x")
    n = BLOCK + 3000
    mask = MaskStream(key).keep(0, n, density)
    expect = keeps(key, 0, [density] * n)
    assert mask.tolist() == expect
    assert mask[:BLOCK].sum() > 0


def test_tied_entries_use_the_spare_words_in_order():
    """Where the byte equals floor(256·density), the r-th such entry of its block is kept iff
    spare word r is below the fractional part (checked on the CPU and torch paths)."""
    key, density = key_of(0, 0, "x"), 77.5 / 256  # floor(t) = 77, keep iff y < 2**31
    stream = MaskStream(key)
    primary, _ = stream._numpy_blocks(3, 4)
    tied = np.flatnonzero(primary.reshape(-1) == 77)
    mask = stream.keep(3 * BLOCK, BLOCK, density)
    assert [bool(mask[i]) for i in tied] == [spare(key, 3, r) < 2**31 for r in range(len(tied))]
    assert 150 < len(tied) < 400


def test_overflow_words_follow_the_definition(monkeypatch):
    """Past the block's spare words, rank r takes Philox at (q, r, 1, 0): force it with a tiny
    capacity (the layout of the others is unchanged)."""
    monkeypatch.setattr(masks, "CAPACITY", 4)
    key = key_of(2, 0, "o")
    stream = MaskStream(key)
    ranks = np.arange(8)
    rows = np.zeros(8, dtype=np.int64)
    spare_words = np.arange(8, dtype=np.int64) + 100
    got = stream._spare_numpy(spare_words[None, :], 5, rows, ranks).tolist()
    assert got[:4] == [100, 101, 102, 103]
    key_words = (key & M64, key >> 64)
    assert got[4:] == [philox4x64_10((5, r, 1, 0), key_words)[0] & 0xFFFFFFFF for r in range(4, 8)]
    t = stream._spare_torch(
        torch.from_numpy(spare_words[None, :]),
        5,
        torch.zeros(8, dtype=torch.int64),
        torch.arange(8),
    )  # noqa: E501
    assert t.tolist() == got


def test_threshold_is_exact():
    assert keep_threshold(0.5) == 2**39 and keep_threshold(1.0) == 2**40
    assert keep_threshold(0.3) == math.ceil(0.3 * 2**40)
    for d in (0.1, 1 / 3, 0.7):
        t = keep_threshold(d)
        assert (t - 1) / 2**40 < d <= t / 2**40
    assert bool(MaskStream(1).keep(0, 1000, 1.0).all())
    assert not bool(MaskStream(1).keep(0, 1000, 0.0).any())


@pytest.mark.parametrize("density", [0.1, 0.5, 1 / 3])
def test_chunks_at_odd_offsets_give_the_whole_mask(density, monkeypatch):
    n = 200_003
    stream = MaskStream(key_of(9, 0, "t"))
    whole = stream.keep(0, n, density)
    bounds = [0, 1, 7, 16_383, 16_385, 65_535, 65_537, 99_999, 131_072, n]
    ranges = list(zip(bounds, bounds[1:]))
    mask = KeepMask(stream, density)
    parts = {a: mask.take(a, b) for a, b in reversed(ranges)}  # any order
    assert torch.equal(torch.cat([parts[a] for a, _ in ranges]), whole)
    monkeypatch.setattr(masks, "_numpy_backend", lambda device: False)
    assert torch.equal(torch.cat([stream.keep(a, b - a, density) for a, b in ranges]), whole)


def test_far_elements_match_the_definition():
    """A block past 2**40 elements (counters past 2**32), both paths."""
    key = key_of(4, 1, "far")
    start = (2**40 // BLOCK + 3) * BLOCK
    expect = keeps(key, start, [0.3] * 5000)
    assert MaskStream(key).keep(start, 5000, 0.3).tolist() == expect
    assert MaskStream(key).keep(start + 17, 100, 0.3).tolist() == expect[17:117]


def test_mask_does_not_depend_on_the_thread_count():
    before = torch.get_num_threads()
    try:
        masks_ = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            masks_.append(MaskStream(5).keep(0, 300_000, 0.3))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(masks_[0], masks_[1])


def test_della_torch_path_gives_the_numpy_bits(monkeypatch):
    delta = torch.randn(300, 500, generator=torch.Generator().manual_seed(0))
    stream = MaskStream(key_of(1, 2, "w"))
    cpu = della_drop(delta, 0.4, 0.2, "paper", stream)
    monkeypatch.setattr(masks, "_numpy_backend", lambda device: False)
    assert torch.equal(della_drop(delta, 0.4, 0.2, "paper", stream), cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_bits():
    stream = MaskStream(key_of(1, 2, "w"))
    for start, count in ((0, 1_000_003), (12_345, 77_777)):
        cpu = stream.keep(start, count, 0.3)
        gpu = stream.keep(start, count, 0.3, "cuda")
        assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    delta = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    for fn in (
        lambda d: random_drop(d, 0.3, "paper", stream),
        lambda d: della_drop(d, 0.4, 0.2, "paper", stream),
    ):
        assert torch.equal(fn(delta.cuda()).cpu(), fn(delta))


def test_della_keeps_where_the_uniform_is_below_the_probability():
    delta = torch.randn(30, 40, generator=torch.Generator().manual_seed(1))
    stream = MaskStream(key_of(0, 0, "d"))
    kept = della_drop(delta, 0.5, 0.3, None, stream)
    ranks = delta.abs().argsort(dim=1, stable=True).argsort(dim=1).float()
    probs = (0.5 - 0.3) + (ranks / 39) * 0.6
    expect = torch.tensor(keeps(stream.key, 0, probs.reshape(-1).tolist())).reshape(30, 40)
    assert torch.equal(kept != 0, expect & (delta != 0))


def test_della_ties_use_the_fraction():
    """Probabilities on the byte grid plus a fraction: only the tied entries' spare words
    decide, compared with the exact float64 fraction."""
    stream = MaskStream(key_of(0, 0, "g"))
    probs = torch.tensor([(k % 256 + 0.25 + (k % 3) * 0.25) / 256 for k in range(BLOCK + 500)])
    got = stream.keep_with(0, probs)
    assert got.tolist() == keeps(stream.key, 0, probs.double().tolist())
    with pytest.raises(ValueError):
        stream.keep_with(5, probs)


@pytest.mark.parametrize("start", [0, 3 * BLOCK])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_keep_with_gives_the_same_decisions(start, dtype):
    """DELLA's compiled byte comparison (kernels.ranks.keep_bytes) against the reference
    decisions: probabilities on the byte grid (every entry whose byte equals it is tied),
    between grid points, at 0, and above 1, over blocks and a partial last block."""
    g = torch.Generator().manual_seed(start)
    n = 2 * BLOCK + 777
    probs = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    probs[:600] = torch.tensor([(k % 257) / 256 for k in range(600)], dtype=dtype)
    probs[600:700] = 0.0
    probs[700:800] = 1.5
    probs[BLOCK : BLOCK + 5000] = 0.5  # one in 256 tied, all in one block: ranks in it
    stream = MaskStream(key_of(3, 1, "w"))
    got = stream.keep_with(start, probs, compiled=True)
    assert torch.equal(got, stream.keep_with(start, probs))
    assert got.tolist() == keeps(stream.key, start, probs.double().tolist())


@pytest.mark.parametrize("density", [0.3, 77.5 / 256])
def test_keep_rate_and_independence(density):
    """The kept fraction is the density (4 sigma), and one element's decision does not
    predict its neighbour's (lag 1, 8, 32 and a block apart at chance)."""
    mask = MaskStream(key_of(0, 0, "u")).keep(0, 1 << 20, density)
    n = mask.numel()
    assert abs(mask.double().mean().item() - density) < 4 * math.sqrt(density * (1 - density) / n)
    for lag in (1, 8, 32, BLOCK):
        both = (mask[:-lag] & mask[lag:]).double().mean().item()
        p = density**2
        assert abs(both - p) < 4 * math.sqrt(p * (1 - p) / (n - lag))


# ------------------------------------------------------------------ compiled (kernels.philox)


@pytest.mark.parametrize("counter,key,expect", KAT)
def test_compiled_philox_gives_the_known_answers(counter, key, expect):
    from mergekit_math.kernels.philox import philox

    words = philox(*(np.uint64(c) for c in counter), np.uint64(key[0]), np.uint64(key[1]))
    assert [int(w) for w in words] == expect


@pytest.mark.parametrize("first", [0, 1, 2**32 - 3, 2**62 + 5])
def test_compiled_words_are_numpys(first):
    from mergekit_math.kernels.philox import raw_into

    key = random.Random(first).getrandbits(128)
    out = np.empty(4 * 5, np.uint64)
    raw_into(np.uint64(key & M64), np.uint64(key >> 64), first, out)
    assert out.tolist() == masks.raw_numpy(key, first, 5).tolist()
    stream = MaskStream(key)
    for a, b in zip(stream._numpy_blocks(2, 4, compiled=True), stream._numpy_blocks(2, 4)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("density", [0.1, 0.5, 1 / 3, 77.5 / 256, 0.999, 1 - 2**-40])
def test_compiled_keep_matches_the_definition_in_any_chunks(density):
    """keep_into (the fused DARE path) against the definition in Python integers, whole and
    in chunks that start inside blocks (a tie's spare word counts the ties before it)."""
    key = key_of(7, 1, "c")
    n = BLOCK + 3000
    expect = keeps(key, 0, [density] * n)
    stream = MaskStream(key)
    whole = np.empty(n, np.uint8)
    stream.keep_into(0, density, whole)
    assert whole.tolist() == [int(k) for k in expect]
    bounds = [0, 1, 31, 4_097, 65_535, 65_537, 66_000, n]
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        part = np.full(b - a, 7, np.uint8)
        stream.keep_into(a, density, part)
        parts.append(part)
    assert np.concatenate(parts).tolist() == whole.tolist()


def test_compiled_keep_at_the_extremes_and_far_away():
    stream = MaskStream(key_of(4, 1, "far"))
    out = np.full(1000, 7, np.uint8)
    stream.keep_into(5, 1.0, out)
    assert out.tolist() == [1] * 1000
    stream.keep_into(5, 0.0, out)
    assert out.tolist() == [0] * 1000
    start = (2**40 // BLOCK + 3) * BLOCK
    far = np.empty(5000, np.uint8)
    stream.keep_into(start, 0.3, far)
    assert far.tolist() == [int(k) for k in keeps(stream.key, start, [0.3] * 5000)]


def test_compiled_overflow_words_follow_the_definition():
    """Rank r past the block's 512 spare words takes Philox at (q, r, 1, 0)."""
    from numba import njit

    from mergekit_math.kernels.philox import _spare

    @njit
    def spare_word(words, q, r, k0, k1):
        return _spare(words, q, r, k0, k1)

    key = key_of(2, 0, "o")
    words = np.empty(256, np.uint64)
    from mergekit_math.kernels.philox import raw_into

    raw_into(np.uint64(key & M64), np.uint64(key >> 64), 5 * masks.PER_BLOCK + 2048, words)
    halves = (np.uint64(key & M64), np.uint64(key >> 64))
    got = [int(spare_word(words, 5, r, *halves)) for r in (0, 1, 511, 512, 700)]
    assert got == [spare(key, 5, r) for r in (0, 1, 511, 512, 700)]
