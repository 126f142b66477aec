"""Generalized task arithmetic: one function, variants as data.

    out = base + λ · combine_i( w_i · sparsify_i(δ_i) )

with ``sparsify`` ∈ {none, magnitude (TIES), random (DARE), magnitude_outliers (Breadcrumbs),
della (DELLA)} and ``combine`` ∈ {sum, TIES sign election + disjoint mean}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from mergekit_math.methods.base import (
    MergeInputs,
    MergeMethod,
    Params,
    PrepareInputs,
    Problem,
    reduce_sum,
    register,
)

if TYPE_CHECKING:
    import torch

Sparsification = Literal["none", "magnitude", "random", "magnitude_outliers", "della"]
Rescale = Literal["paper", "l1"]


class DeltaShared(Params):
    normalize: bool | None = Field(
        None, description="Divide the combined delta by the sum of the (kept) weights."
    )
    lambda_: float = Field(1.0, alias="lambda", description="Scale of the combined delta.")
    rescale: Rescale | bool | None = Field(
        None,
        description="After dropping: 'paper' divides kept entries by their keep probability, "
        "'l1' matches the L1 norm of the un-dropped delta (mergekit 0.1.5), false drops only.",
    )
    int8_mask: bool = Field(False, description="Accepted for mergekit compatibility; no effect.")


class DeltaModel(Params):
    weight: float = Field(description="Coefficient of this model's delta.")
    density: float = Field(1.0, gt=0.0, le=1.0, description="Fraction of delta entries kept.")


class BreadcrumbsModel(DeltaModel):
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="Fraction of largest entries removed.")


class DellaModel(DeltaModel):
    epsilon: float = Field(0.15, ge=0.0, lt=1.0, description="Spread of keep probabilities.")


# ----------------------------------------------------------------------------- sparsification


def _rescale_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``kept`` so its L1 norm equals that of ``delta`` (mergekit's ``rescale``)."""
    before = reduce_sum(delta.abs())
    after = reduce_sum(kept.abs())
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


# Tensors up to this many elements get their threshold from one kthvalue; larger ones from a
# sample-bracketed selection (exact, and about 10x cheaper on embedding-sized tensors).
_DIRECT_SELECT = 1 << 20
_SELECT_CHUNK = 1 << 18
_SAMPLE = 1 << 16


@dataclass(frozen=True)
class Selection:
    threshold: float  # the k-th largest value
    above: int  # how many values are larger
    ties: torch.Tensor  # ascending positions of the values equal to the threshold


def _select_directly(values: torch.Tensor, k: int) -> Selection:
    import torch

    n = values.numel()
    threshold = float(torch.kthvalue(values, n - k + 1).values)
    above, ties = 0, []
    for start in range(0, n, _SELECT_CHUNK):
        part = values[start : start + _SELECT_CHUNK]
        above += int(torch.count_nonzero(part > threshold))
        ties.append((part == threshold).nonzero().flatten() + start)
    return Selection(threshold, above, torch.cat(ties))


def kth_select(values: torch.Tensor, k: int) -> Selection:
    """The exact ``k``-th largest element of a flat float tensor (``1 <= k <= n``), with how
    many elements exceed it and where the elements equal to it are.

    For large tensors a strided sample brackets the answer; one chunked pass counts the
    elements above the bracket and collects those inside it (about 2 %, with positions), and
    a kthvalue over those finishes. Should the bracket miss (the counts say so), it falls back
    to a kthvalue over everything, so the result is always exact.
    """
    import torch

    n = values.numel()
    if n <= _DIRECT_SELECT:
        return _select_directly(values, k)
    stride = n // _SAMPLE
    sample = values[::stride][:_SAMPLE].contiguous()
    size = sample.numel()
    below = (n - k) / n  # fraction of elements below the answer
    margin = 8 * math.sqrt(size * below * (1 - below)) + 16
    lo_rank, hi_rank = int(size * below - margin), int(size * below + margin) + 1
    lo = float(torch.kthvalue(sample, lo_rank).values) if lo_rank >= 1 else -math.inf
    hi = float(torch.kthvalue(sample, hi_rank).values) if hi_rank <= size else math.inf
    above = 0
    positions, inside = [], []
    for start in range(0, n, _SELECT_CHUNK):
        part = values[start : start + _SELECT_CHUNK]
        not_above = part <= hi
        above += part.numel() - int(torch.count_nonzero(not_above))
        where = (not_above & (part >= lo)).nonzero().flatten()
        inside.append(part[where])
        positions.append(where + start)
    candidates = torch.cat(inside)
    if not (above < k <= above + candidates.numel()):
        return _select_directly(values, k)
    rank = k - above  # rank from the top among the candidates
    threshold = float(torch.kthvalue(candidates, candidates.numel() - rank + 1).values)
    above += int(torch.count_nonzero(candidates > threshold))
    return Selection(threshold, above, torch.cat(positions)[candidates == threshold])


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The exact ``k``-th largest element of a flat float tensor (``1 <= k <= n``)."""
    return kth_select(values, k).threshold


class MagnitudeTrim:
    """TIES trim of one tensor's delta: keep its ``k`` largest magnitudes.

    Entries equal to the threshold fill the remaining places in index order, so exactly ``k``
    are kept and the choice depends neither on the selection algorithm nor on the thread
    count. ``ranges`` are the chunks :meth:`apply` will get (any order, any thread); each
    chunk's share of the tied entries is fixed here.
    """

    def __init__(
        self, magnitude: torch.Tensor, density: float, ranges: list[tuple[int, int]] | None = None
    ):
        import torch

        n = magnitude.numel()
        k = max(1, int(density * n))
        selection = kth_select(magnitude, k)
        self.threshold = selection.threshold
        kept_ties = selection.ties[: k - selection.above]
        self.ties: dict[int, torch.Tensor] = {}
        for start, end in ranges or [(0, n)]:
            lo, hi = torch.searchsorted(
                kept_ties, torch.tensor([start, end], device=kept_ties.device)
            ).tolist()
            self.ties[start] = kept_ties[lo:hi] - start

    def apply(self, delta: torch.Tensor, start: int = 0) -> torch.Tensor:
        flat = delta.reshape(-1)
        magnitude = flat.abs()
        # 1.0 above the threshold, else 0.0: sign(|d| - t) ∈ {-1, 0, 1} -> {0, 0, 1}
        keep = (magnitude - self.threshold).sign_().add_(1).mul_(0.5).floor_()
        ties = self.ties[start]
        if ties.numel():
            keep[ties] = 1.0
        return (flat * keep).reshape(delta.shape)


def magnitude_prune(delta: torch.Tensor, density: float, rescale: Rescale | None) -> torch.Tensor:
    """Keep the ``max(1, int(density·n))`` entries of largest magnitude (TIES trim)."""
    if density >= 1:
        return delta
    kept = MagnitudeTrim(delta.reshape(-1).abs(), density).apply(delta)
    return _rescale_l1(delta, kept) if rescale == "l1" else kept


def magnitude_outliers_prune(
    delta: torch.Tensor, density: float, gamma: float, rescale: Rescale | None
) -> torch.Tensor:
    """Drop the ``gamma`` fraction of largest entries, then the smallest, keeping ``density``."""
    import torch

    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    flat = delta.reshape(-1)
    order = torch.sort(flat.abs(), descending=False, stable=True).indices
    keep = order[n_bottom : n_bottom + target]
    kept = torch.zeros_like(flat)
    kept[keep] = flat[keep]
    kept = kept.reshape(delta.shape)
    return _rescale_l1(delta, kept) if rescale == "l1" else kept


def _numpy_stream(generator: torch.Generator) -> Any:
    """A numpy ``Generator`` continuing ``generator``'s Mersenne Twister stream, or None.

    torch's CPU generator is MT19937 and its float32 ``rand`` is ``(x & 0xFFFFFF) · 2**-24``
    for consecutive 32-bit outputs ``x``; numpy's MT19937 makes the same outputs about twice
    as fast. The state is copied from ``get_state()`` (layout: initial seed u64, ``left``
    i32, ``seeded`` i32, ``next`` u64, 624 words as u64) and the copy is checked against
    torch on a few draws; any mismatch (another torch layout) returns None.
    """
    import struct

    import numpy as np
    import torch

    raw = generator.get_state().numpy().tobytes()
    if len(raw) < 24 + 624 * 8:
        return None
    (left,) = struct.unpack_from("<i", raw, 8)
    (position,) = struct.unpack_from("<Q", raw, 16)
    key = np.frombuffer(raw, dtype="<u8", count=624, offset=24).astype(np.uint32)
    bits = np.random.MT19937()
    try:
        bits.state = {
            "bit_generator": "MT19937",
            "state": {"key": key, "pos": 624 if left == 1 else int(position)},
        }
    except (ValueError, TypeError):
        return None
    probe = torch.Generator()
    probe.set_state(generator.get_state())
    expected = torch.rand(8, generator=probe)
    check = np.random.Generator(np.random.MT19937())
    check.bit_generator.state = bits.state
    got = check.integers(0, 2**32, size=8, dtype=np.uint32) & 0xFFFFFF
    if not torch.equal(torch.from_numpy(got.astype(np.float32) * 2.0**-24), expected):
        return None
    return np.random.Generator(bits)


class KeepMask:
    """DARE's keep decisions for one tensor, as a 0/1 float mask: exactly
    ``torch.rand(numel, generator) < density``
    drawn lazily for the chunks ``ranges``, so a tensor processed in chunks gets the mask it
    would get whole. :meth:`take` may be called from several threads in any order: the
    stream is drawn in range order under a lock and masks drawn early wait in a cache.
    """

    def __init__(
        self,
        numel: int,
        density: float,
        generator: torch.Generator,
        ranges: list[tuple[int, int]] | None = None,
    ):
        import threading

        import torch

        self.density = density
        self.generator = generator
        # rand() < density  <=>  (x & 0xFFFFFF) < ceil(float32(density) · 2**24)
        scaled = float(torch.tensor(density, dtype=torch.float32)) * 2.0**24
        self.limit = math.ceil(scaled)
        self.stream = _numpy_stream(generator)
        self.ranges = ranges or [(0, numel)]
        self._next = 0  # index into ranges of the next range to draw
        self._ready: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def _draw(self, count: int) -> torch.Tensor:
        import torch

        if self.stream is None:
            return (torch.rand(count, generator=self.generator) < self.density).float()
        import numpy as np

        words = self.stream.integers(0, 2**32, size=count, dtype=np.uint32)
        words &= 0xFFFFFF
        return torch.from_numpy((words < self.limit).astype(np.float32))

    def take(self, start: int, end: int) -> torch.Tensor:
        """Boolean keep mask for the flat range ``[start, end)``, one of ``ranges``."""
        with self._lock:
            while start not in self._ready:
                if self._next >= len(self.ranges):
                    raise ValueError(f"KeepMask.take: {start}:{end} is not an undrawn range")
                a, b = self.ranges[self._next]
                self._next += 1
                self._ready[a] = self._draw(b - a)
            mask = self._ready.pop(start)
        if mask.numel() != end - start:
            raise ValueError(f"KeepMask.take: {start}:{end} is not one of the ranges")
        return mask


def apply_keep(
    delta: torch.Tensor, mask: torch.Tensor, density: float, rescale: Rescale | None
) -> torch.Tensor:
    kept = delta * mask.to(delta.device).reshape(delta.shape)
    if rescale == "paper":
        return kept.div_(density)
    if rescale == "l1":
        return _rescale_l1(delta, kept)
    return kept


def random_drop(
    delta: torch.Tensor, density: float, rescale: Rescale | None, generator: torch.Generator
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (Bernoulli), zero the rest.

    ``paper`` divides the kept entries by ``density`` so the expected delta is unchanged.
    """
    import torch

    if density >= 1:
        return delta
    mask = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    return apply_keep(delta, mask.to(delta.device), density, rescale)


def della_drop(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: Rescale | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """DELLA MagPrune: per row, keep probability rises linearly with magnitude rank from
    ``density - epsilon`` to ``density + epsilon``."""
    import torch

    if density >= 1:
        return delta
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise ValueError(f"della needs density ± epsilon inside (0, 1), got {density} ± {epsilon}")
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    # stable: equal magnitudes rank in index order, the same on every device
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).to(torch.float32)
    span = (rows.shape[1] - 1) or 1
    probs = (density - epsilon) + (ranks / span) * (2 * epsilon)
    mask = torch.rand(rows.shape, generator=generator, dtype=torch.float32).to(rows.device) < probs
    kept = (rows * mask).reshape(delta.shape)
    if rescale == "paper":
        return kept.div_(probs.reshape(delta.shape).to(kept.dtype))
    if rescale == "l1":
        return _rescale_l1(delta, kept)
    return kept


# ----------------------------------------------------------------------------- consensus


# Written with float arithmetic only: on the CPU, comparisons, ``where`` and bool-to-float
# casts cost several times more per element than multiplying, so the masks are 0/1 floats.


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """TIES: the sign (±1) of the summed weighted deltas, +1 where the sum is +0.

    (A sum of -0 only arises when every entry is ±0, which agrees with no sign.)
    """
    import torch

    total = weighted.sum(dim=0)
    return torch.copysign(torch.ones_like(total), total)


def agreement_mask(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """1.0 for entries whose sign equals the elected sign, else 0.0 (zeros never agree)."""
    # sign(w·s) ∈ {-1, 0, 1} -> (x + 1) / 2 rounded down ∈ {0, 0, 1}, always +0 for no
    return (weighted * sign).sign_().add_(1).mul_(0.5).floor_()


def _zero_to_one(divisor: torch.Tensor) -> torch.Tensor:
    """``divisor`` with its zeros replaced by 1 (in place): d + (1 - sign|d|)."""
    return divisor.add_(divisor.abs().sign_().neg_().add_(1))


# ----------------------------------------------------------------------------- the merge


@dataclass(frozen=True)
class Variant:
    sparsification: Sparsification
    consensus: bool
    default_normalize: bool
    default_rescale: Rescale | None


def _rescale_mode(variant: Variant, value: Rescale | bool | None) -> Rescale | None:
    """None: the method's default; true: that default, or L1 where it has none; false: drop."""
    if value is None:
        return variant.default_rescale
    if value is True:
        return variant.default_rescale or "l1"
    if value is False:
        return None
    return value


def check_params(variant: Variant):
    def check(shared: BaseModel, params: list[BaseModel]) -> Problem | None:
        if shared.rescale == "paper" and variant.sparsification not in ("random", "della"):  # type: ignore[attr-defined]
            return (
                None,
                "rescale",
                "'paper' applies to random drops (DARE, DELLA); use 'l1' or false",
            )
        if variant.sparsification == "della":
            for i, p in enumerate(params):
                d, e = p.density, p.epsilon  # type: ignore[attr-defined]
                if d < 1 and not (0 < d - e and d + e < 1):
                    return i, "epsilon", f"density ± epsilon must lie inside (0, 1), got {d} ± {e}"
        return None

    return check


def make_merge(variant: Variant):
    def merge(inputs: MergeInputs) -> torch.Tensor:
        import torch

        base = inputs.base
        assert base is not None
        if not inputs.tensors:
            return base
        shared = inputs.shared
        rescale = _rescale_mode(variant, shared.rescale)  # type: ignore[attr-defined]
        deltas = []
        for i, (delta, p) in enumerate(zip(inputs.tensors, inputs.params)):
            density = p.density  # type: ignore[attr-defined]
            state = inputs.states[i] if inputs.states is not None else None
            if isinstance(state, MagnitudeTrim):
                delta = state.apply(delta, inputs.offset)
            elif isinstance(state, KeepMask):
                start = inputs.offset
                delta = apply_keep(
                    delta, state.take(start, start + delta.numel()), density, rescale
                )
            elif variant.sparsification == "magnitude":
                delta = magnitude_prune(delta, density, rescale)
            elif variant.sparsification == "magnitude_outliers":
                delta = magnitude_outliers_prune(delta, density, p.gamma, rescale)  # type: ignore[attr-defined]
            elif variant.sparsification == "random":
                assert inputs.generators is not None
                delta = random_drop(delta, density, rescale, inputs.generators[i])
            elif variant.sparsification == "della":
                assert inputs.generators is not None
                delta = della_drop(delta, density, p.epsilon, rescale, inputs.generators[i])  # type: ignore[attr-defined]
            deltas.append(delta)
        stacked = torch.stack(deltas)
        del deltas
        coefficients = [p.weight for p in inputs.params]  # type: ignore[attr-defined]
        weights = torch.tensor(coefficients, dtype=stacked.dtype, device=stacked.device).reshape(
            (-1,) + (1,) * base.dim()
        )
        stacked.mul_(weights)
        normalize = shared.normalize  # type: ignore[attr-defined]
        if normalize is None:
            normalize = variant.default_normalize
        if variant.consensus:
            mask = agreement_mask(stacked, elect_sign(stacked))
            mixed = stacked.mul_(mask).sum(dim=0)
            if normalize:
                mixed /= _zero_to_one((weights * mask).sum(dim=0))
        else:
            mixed = stacked.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
            if normalize:
                mixed /= divisor
        lam = shared.lambda_  # type: ignore[attr-defined]
        if lam != 1:
            mixed *= lam
        return base + mixed

    return merge


def make_chunkable(variant: Variant):
    def chunkable(shared: BaseModel, params: list[BaseModel]) -> bool:
        rescale = _rescale_mode(variant, shared.rescale)  # type: ignore[attr-defined]
        if variant.sparsification == "none":
            return True
        if variant.sparsification == "magnitude":
            return rescale is None
        if variant.sparsification == "random":
            return rescale != "l1"
        return False

    return chunkable


def make_prepare(variant: Variant):
    def prepare(inputs: PrepareInputs) -> list[Any]:
        states: list[Any] = []
        for i, p in enumerate(inputs.params):
            density = p.density  # type: ignore[attr-defined]
            if density >= 1 or variant.sparsification == "none":
                states.append(None)
            elif variant.sparsification == "magnitude":
                states.append(MagnitudeTrim(inputs.delta(i).abs_(), density, inputs.ranges))
            elif variant.sparsification == "random":
                assert inputs.generators is not None
                states.append(KeepMask(inputs.numel, density, inputs.generators[i], inputs.ranges))
            else:
                raise ValueError(f"{variant.sparsification} cannot run on chunks")
        return states

    return prepare


def _register(
    name: str,
    pretty: str,
    url: str,
    variant: Variant,
    model_params: type[DeltaModel] = DeltaModel,
    description: str = "",
    ignored: tuple[str, ...] = (),
) -> None:
    register(
        MergeMethod(
            name=name,
            pretty_name=pretty,
            paper_url=url,
            merge=make_merge(variant),
            check=check_params(variant),
            shared_defaults={
                "normalize": variant.default_normalize,
                "rescale": variant.default_rescale or False,
            },
            ignored=ignored,
            shared_params=DeltaShared,
            model_params=model_params,
            kind="delta",
            base="required",
            random=variant.sparsification in ("random", "della"),
            description=description,
            chunkable=make_chunkable(variant),
            prepare=make_prepare(variant),
            prepare_buffers=lambda shared, params: int(
                variant.sparsification == "magnitude" and any(p.density < 1 for p in params)  # type: ignore[attr-defined]
            ),
        )
    )


_TA = "https://arxiv.org/abs/2212.04089"
_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"
_BREAD = "https://arxiv.org/abs/2312.06795"
_DELLA = "https://arxiv.org/abs/2406.11617"

_register(
    "task_arithmetic",
    "Task Arithmetic",
    _TA,
    Variant("none", False, False, None),
    description="base + λ·Σ w_i·(model_i − origin_i).",
    ignored=("density", "rescale"),
)
_register(
    "ties",
    "TIES",
    _TIES,
    Variant("magnitude", True, True, None),
    description="Trim to top-density magnitudes, elect sign, disjoint mean.",
)
_register(
    "dare_linear",
    "Linear DARE",
    _DARE,
    Variant("random", False, False, "paper"),
    description="Drop delta entries with probability 1−density, rescale, add.",
)
_register(
    "dare_ties",
    "DARE TIES",
    _DARE,
    Variant("random", True, False, "paper"),
    description="DARE drop and rescale, then TIES sign election.",
)
_register(
    "breadcrumbs",
    "Model Breadcrumbs",
    _BREAD,
    Variant("magnitude_outliers", False, False, None),
    BreadcrumbsModel,
    description="Drop the largest (gamma) and smallest entries of each delta.",
)
_register(
    "breadcrumbs_ties",
    "Model Breadcrumbs with TIES",
    _BREAD,
    Variant("magnitude_outliers", True, False, None),
    BreadcrumbsModel,
    description="Breadcrumbs sparsification with TIES sign election.",
)
_register(
    "della",
    "DELLA",
    _DELLA,
    Variant("della", True, True, "l1"),
    DellaModel,
    description="Magnitude-ranked stochastic drop (MagPrune), sign election.",
)
_register(
    "della_linear",
    "Linear DELLA",
    _DELLA,
    Variant("della", False, False, "l1"),
    DellaModel,
    description="Magnitude-ranked stochastic drop (MagPrune), summed.",
)
