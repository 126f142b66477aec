"""Generalized task arithmetic: one function, variants as data.

    out = base + λ · combine_i( w_i · sparsify_i(δ_i) )

with ``sparsify`` ∈ {none, magnitude (TIES), random (DARE), magnitude_outliers (Breadcrumbs),
della (DELLA)} and ``combine`` ∈ {sum, TIES sign election + disjoint mean}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, Field

from mergekit_math.methods import (
    MergeInputs,
    MergeMethod,
    Params,
    Problem,
    reduce_sum,
    register,
)

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


def magnitude_prune(delta: torch.Tensor, density: float, rescale: Rescale | None) -> torch.Tensor:
    """Keep the ``max(1, int(density·n))`` entries of largest magnitude (TIES trim)."""
    if density >= 1:
        return delta
    n = delta.numel()
    k = max(1, int(density * n))
    flat = delta.reshape(-1)
    magnitude = flat.abs()
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    keep = magnitude > threshold
    # Entries equal to the threshold fill the remaining places in index order, so exactly k
    # are kept and the choice does not depend on the sort algorithm or the thread count.
    missing = k - int(keep.sum())
    if missing > 0:
        keep[(magnitude == threshold).nonzero().flatten()[:missing]] = True
    kept = (flat * keep).reshape(delta.shape)
    return _rescale_l1(delta, kept) if rescale == "l1" else kept


def magnitude_outliers_prune(
    delta: torch.Tensor, density: float, gamma: float, rescale: Rescale | None
) -> torch.Tensor:
    """Drop the ``gamma`` fraction of largest entries, then the smallest, keeping ``density``."""
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


def random_drop(
    delta: torch.Tensor, density: float, rescale: Rescale | None, generator: torch.Generator
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (Bernoulli), zero the rest.

    ``paper`` divides the kept entries by ``density`` so the expected delta is unchanged.
    """
    if density >= 1:
        return delta
    mask = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    kept = delta * mask
    if rescale == "paper":
        return kept.div_(density)
    if rescale == "l1":
        return _rescale_l1(delta, kept)
    return kept


def della_drop(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: Rescale | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """DELLA MagPrune: per row, keep probability rises linearly with magnitude rank from
    ``density - epsilon`` to ``density + epsilon``."""
    if density >= 1:
        return delta
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise ValueError(f"della needs density ± epsilon inside (0, 1), got {density} ± {epsilon}")
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
    span = (rows.shape[1] - 1) or 1
    probs = (density - epsilon) + (ranks / span) * (2 * epsilon)
    mask = torch.rand(rows.shape, generator=generator, dtype=torch.float32) < probs
    kept = (rows * mask).reshape(delta.shape)
    if rescale == "paper":
        return kept.div_(probs.reshape(delta.shape).to(kept.dtype))
    if rescale == "l1":
        return _rescale_l1(delta, kept)
    return kept


# ----------------------------------------------------------------------------- consensus


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """TIES: the sign of the summed weighted deltas (+1 where the sum is zero)."""
    return torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)


def agreement_mask(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Entries whose sign equals the elected sign (zeros never agree)."""
    return weighted.sign() == sign


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
        base = inputs.base
        assert base is not None
        if not inputs.tensors:
            return base
        shared = inputs.shared
        rescale = _rescale_mode(variant, shared.rescale)  # type: ignore[attr-defined]
        deltas = []
        for i, (delta, p) in enumerate(zip(inputs.tensors, inputs.params)):
            density = p.density  # type: ignore[attr-defined]
            if variant.sparsification == "magnitude":
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
        if variant.consensus:
            mask = agreement_mask(stacked, elect_sign(stacked))
            mixed = (stacked * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = stacked.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        normalize = shared.normalize  # type: ignore[attr-defined]
        if normalize is None:
            normalize = variant.default_normalize
        if normalize:
            mixed /= divisor
        lam = shared.lambda_  # type: ignore[attr-defined]
        if lam != 1:
            mixed *= lam
        return base + mixed

    return merge


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
