"""The denoisers as pure functions of a token list and a ``numpy.random.Generator``.

An :class:`Example` is what a decoder-only model trains on: ``inputs`` (the mode token, then
the corrupted text) followed by ``targets``. Under prefix-LM attention the inputs are attended
bidirectionally; the loss is always on the targets only.

- span corruption follows T5's ``random_spans_noise_mask`` (which UL2's code calls): exactly
  ``round(L·r)`` tokens are corrupted, in spans whose lengths are a uniformly random
  composition, alternating with kept spans and starting with a kept one. One change: the number
  of spans ``noise/μ`` is rounded stochastically (down or up with the fractional part as
  probability) instead of to the nearest integer, so the mean span length over examples is μ;
  T5's rounding gives 38 instead of 32 for μ=32, r=0.15 at 512 tokens, and 76 instead of 64
  for μ=64. Span ``k`` is replaced by sentinel ``k`` in the inputs; the targets are
  ``sentinel_0 span_0 sentinel_1 span_1 …``, so putting each span back in place of its
  sentinel restores the text exactly.
- prefix LM splits once, as T5's ``random_prefix_noise_mask``: the target is a suffix whose
  length is uniform between 1 and ``2·r`` of the sequence (mean ``r``).
- causal LM: no inputs besides the mode token; every token is a target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mergekit_math.ul2r.config import Denoiser, max_span_count, noise_count, raw_length


@dataclass(frozen=True)
class Example:
    """One training example: ``inputs + targets`` tokens, loss on the targets."""

    inputs: list[int]
    targets: list[int]
    denoiser: int
    spans: int = 0

    @property
    def tokens(self) -> list[int]:
        """The row the model reads."""
        return self.inputs + self.targets

    @property
    def prefix_length(self) -> int:
        """Positions attended bidirectionally under prefix-LM attention."""
        return len(self.inputs)

    @property
    def loss_mask(self) -> list[int]:
        """1 on every target token, 0 on the inputs."""
        return [0] * len(self.inputs) + [1] * len(self.targets)


def random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of ``num_segments`` positive parts summing to ``num_items``, uniformly at random
    over all such compositions (T5's ``_random_segmentation``)."""
    if not 1 <= num_segments <= num_items:
        raise ValueError(f"cannot split {num_items} items into {num_segments} non-empty segments")
    cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate(([0], cuts, [num_items])))


def draw_span_count(length: int, rate: float, mean_span: float, rng: np.random.Generator) -> int:
    """Noise spans of one example: ``noise/μ`` rounded down or up at random (up with the
    fractional part as probability), within ``1..max_span_count``."""
    expected = noise_count(length, rate) / mean_span
    spans = math.floor(expected) + int(rng.random() < expected - math.floor(expected))
    return min(max(spans, 1), max_span_count(length, rate, mean_span))


def noise_spans(
    length: int, rate: float, mean_span: float, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """``(start, end)`` of each corrupted span of a ``length``-token sequence, in order."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    noise = noise_count(length, rate)
    spans = draw_span_count(length, rate, mean_span, rng)
    noise_lengths = random_segmentation(noise, spans, rng)
    kept_lengths = random_segmentation(length - noise, spans, rng)
    out: list[tuple[int, int]] = []
    pos = 0
    for kept, corrupted in zip(kept_lengths.tolist(), noise_lengths.tolist()):
        pos += kept
        out.append((pos, pos + corrupted))
        pos += corrupted
    return out


def span_corrupt(
    tokens: Sequence[int],
    rate: float,
    mean_span: float,
    sentinels: Sequence[int],
    rng: np.random.Generator,
) -> tuple[list[int], list[int]]:
    """``(inputs, targets)``: span ``k`` becomes ``sentinels[k]`` in the inputs; the targets are
    ``sentinels[k]`` followed by span ``k``, for every span in order."""
    spans = noise_spans(len(tokens), rate, mean_span, rng)
    if len(spans) > len(sentinels):
        raise ValueError(f"{len(spans)} spans but only {len(sentinels)} sentinels")
    inputs: list[int] = []
    targets: list[int] = []
    pos = 0
    for k, (start, end) in enumerate(spans):
        inputs.extend(tokens[pos:start])
        inputs.append(sentinels[k])
        targets.append(sentinels[k])
        targets.extend(tokens[start:end])
        pos = end
    inputs.extend(tokens[pos:])
    return inputs, targets


def reconstruct(
    inputs: Sequence[int], targets: Sequence[int], sentinels: Sequence[int]
) -> list[int]:
    """The original tokens from a span-corrupted pair: each sentinel of the inputs is replaced by
    the tokens that follow the same sentinel in the targets."""
    index = {s: k for k, s in enumerate(sentinels)}
    spans: dict[int, list[int]] = {}
    current: int | None = None
    for t in targets:
        if t in index:
            current = index[t]
            spans[current] = []
        elif current is None:
            raise ValueError("targets do not start with a sentinel")
        else:
            spans[current].append(t)
    out: list[int] = []
    for t in inputs:
        if t in index:
            out.extend(spans.pop(index[t]))
        else:
            out.append(t)
    if spans:
        raise ValueError(
            f"targets hold spans for sentinels missing from the inputs: {sorted(spans)}"
        )
    return out


def prefix_split(length: int, target_fraction: float, rng: np.random.Generator) -> int:
    """Tokens kept as the prefix (T5's ``random_prefix_noise_mask``): uniform between
    ``round((1 - 2·f)·(length - 1))`` (at least 1) and ``length - 1``."""
    if length < 2:
        raise ValueError(f"a prefix-LM split needs at least 2 tokens, got {length}")
    most = length - 1
    least = min(most, max(1, round((1 - 2 * target_fraction) * most)))
    return int(rng.integers(least, most + 1))


@dataclass(frozen=True)
class DenoiserRuntime:
    """A configured denoiser with its token ids resolved."""

    index: int
    config: Denoiser
    mode_id: int | None
    sentinels: tuple[int, ...]
    raw_length: int

    @classmethod
    def build(
        cls,
        index: int,
        config: Denoiser,
        sequence_length: int,
        mode_id: int | None,
        sentinels: Sequence[int],
    ) -> DenoiserRuntime:
        return cls(index, config, mode_id, tuple(sentinels), raw_length(config, sequence_length))

    def apply(self, tokens: Sequence[int], rng: np.random.Generator) -> Example:
        """The example this denoiser makes of ``tokens`` (at most ``raw_length`` of them)."""
        if len(tokens) > self.raw_length:
            raise ValueError(f"{len(tokens)} tokens; this denoiser takes at most {self.raw_length}")
        mode = [self.mode_id] if self.mode_id is not None else []
        c = self.config
        if c.kind == "span":
            inputs, targets = span_corrupt(
                tokens,
                c.corruption_rate,  # type: ignore[arg-type]
                c.mean_span_length,  # type: ignore[arg-type]
                self.sentinels,
                rng,
            )
            spans = (len(inputs) + len(targets) - len(tokens)) // 2  # one sentinel in each
            return Example(mode + inputs, targets, self.index, spans)
        if c.kind == "prefix_lm":
            cut = prefix_split(len(tokens), c.target_fraction, rng)
            return Example(mode + list(tokens[:cut]), list(tokens[cut:]), self.index)
        return Example(mode, list(tokens), self.index)
