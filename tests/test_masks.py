"""The DARE/DELLA keep masks (definition version 2, ``mergekit_math.methods.masks``): the
vectorised torch code against the definition written out in Python integers, Philox's known
answers, independence of chunking, thread count and device, and the statistics."""

from __future__ import annotations

import math
import random

import pytest
import torch
from mask_reference import keep, key_of, philox4x32_10, word

from mergekit_math.methods.masks import MASK_VERSION, MaskStream, keep_threshold, mask_key
from mergekit_math.methods.sparsify import KeepMask, della_drop, random_drop

# Random123's kat_vectors for philox4x32 with 10 rounds: (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ((2**32 - 1,) * 4, (2**32 - 1,) * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]


@pytest.mark.parametrize("counter,key,expect", KAT)
def test_reference_philox_gives_the_known_answers(counter, key, expect):
    assert philox4x32_10(counter, key) == expect


def test_stream_gives_the_known_answer_for_counter_zero():
    words = MaskStream(0).words(0, 4 * 2**14)
    assert [int(words[j * 2**14]) for j in range(4)] == KAT[0][2]


def test_key_is_the_documented_hash():
    assert mask_key(3, 1, "model.layers.0.mlp.up_proj.weight") == key_of(
        3, 1, "model.layers.0.mlp.up_proj.weight"
    )
    assert MaskStream.of(3, 1, "w").key == key_of(3, 1, "w") != key_of(3, 2, "w")
    assert MASK_VERSION == 2


@pytest.mark.parametrize(
    "start,count",
    [(0, 100), (5, 70_001), (16_380, 9), (65_530, 40), (2**46 - 7, 3000), (2**50 - 3, 9)],
)
def test_words_match_the_definition(start, count):
    """Sampled elements, including lane and group boundaries and counters past 2**32."""
    rng = random.Random(start)
    key = rng.getrandbits(64)
    words = MaskStream(key).words(start, count)
    picks = set(rng.sample(range(count), min(count, 60))) | {0, count - 1}
    for i in sorted(picks):
        assert int(words[i]) == word(key, start + i), start + i


@pytest.mark.parametrize("density", [0.1, 0.3, 1 / 3, 0.999])
def test_keep_matches_the_definition(density):
    key = key_of(0, 0, "x")
    mask = MaskStream(key).keep(0, 3000, density)
    assert mask.tolist() == [keep(key, e, density) for e in range(3000)]


def test_threshold_is_exact():
    assert keep_threshold(0.5) == 2**31 and keep_threshold(1.0) == 2**32
    assert keep_threshold(0.3) == math.ceil(0.3 * 2**32)
    # u = x / 2**32 < d for x = T - 1, not for x = T
    for d in (0.1, 1 / 3, 0.7):
        t = keep_threshold(d)
        assert (t - 1) / 2**32 < d <= t / 2**32
    assert bool(MaskStream(1).keep(0, 1000, 1 - 2**-40).all())


@pytest.mark.parametrize("density", [0.1, 0.5, 1 / 3])
def test_chunks_at_odd_offsets_give_the_whole_mask(density):
    n = 200_003
    stream = MaskStream(key_of(9, 0, "t"))
    whole = stream.keep(0, n, density)
    bounds = [0, 1, 7, 16_383, 16_385, 65_535, 65_537, 99_999, 131_072, n]
    ranges = list(zip(bounds, bounds[1:]))
    mask = KeepMask(stream, density)
    parts = {a: mask.take(a, b) for a, b in reversed(ranges)}  # any order
    assert torch.equal(torch.cat([parts[a] for a, _ in ranges]), whole)
    words = stream.words(0, n)
    assert torch.equal(torch.cat([stream.words(a, b - a) for a, b in ranges]), words)


def test_mask_does_not_depend_on_the_thread_count():
    before = torch.get_num_threads()
    try:
        masks = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            masks.append(MaskStream(5).keep(0, 300_000, 0.3))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(masks[0], masks[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_bits():
    stream = MaskStream(key_of(1, 2, "w"))
    for start, count in ((0, 1_000_003), (12_345, 77_777)):
        cpu = stream.words(start, count)
        gpu = stream.words(start, count, "cuda")
        assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
        assert torch.equal(stream.keep(start, count, 0.3, "cuda").cpu(), cpu < 0.3 * 2**32)
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
    u = [word(stream.key, e) / 2**32 for e in range(delta.numel())]
    expect = torch.tensor(u, dtype=torch.float64).reshape(30, 40) < probs.double()
    assert torch.equal(kept != 0, expect & (delta != 0))


def test_bits_are_uniform():
    """Each of the 32 bits is set half the time (4 sigma), and the mask of one element does
    not predict its neighbour's (lag-1 and lag-2**14 agreement at chance)."""
    words = MaskStream(key_of(0, 0, "u")).words(0, 1 << 20)
    n = words.numel()
    bits = torch.stack([(words >> b) & 1 for b in range(32)]).double().mean(dim=1)
    assert ((bits - 0.5).abs() < 4 * math.sqrt(0.25 / n)).all()
    mask = words < keep_threshold(0.3)
    for lag in (1, 2**14, 2**16):
        both = (mask[:-lag] & mask[lag:]).double().mean().item()
        assert abs(both - 0.09) < 4 * math.sqrt(0.09 * 0.91 / (n - lag))
