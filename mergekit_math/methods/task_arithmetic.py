"""Generalized task arithmetic: one function, variants as data.

    out = base + λ · combine_i( w_i · sparsify_i(δ_i) )

with ``sparsify`` ∈ {none, magnitude (TIES), random (DARE), magnitude_outliers (Breadcrumbs),
della (DELLA)} and ``combine`` ∈ {sum, TIES sign election + disjoint mean}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from mergekit_math.methods.base import (
    Chunking,
    Example,
    FusedInputs,
    MergeInputs,
    MergeMethod,
    Params,
    PrepareInputs,
    Problem,
    register,
)
from mergekit_math.methods.consensus import agreement_mask, elect_sign, zero_to_one
from mergekit_math.methods.magprune import DellaKeep, della_keeps, della_unit, row_length
from mergekit_math.methods.selection import StoredMagnitude, kth_selects_of
from mergekit_math.methods.sparsify import (
    KeepMask,
    MagnitudeTrim,
    RankWindow,
    Rescale,
    apply_keep,
    breadcrumbs_window,
    della_drop,
    magnitude_outliers_prune,
    magnitude_prune,
    random_drop,
)

if TYPE_CHECKING:
    import torch

    from mergekit_math.methods.selection import Selection

Sparsification = Literal["none", "magnitude", "random", "magnitude_outliers", "della"]


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


Inputs = MergeInputs[DeltaShared, DeltaModel]


def _check(variant: Variant):
    def check(shared: DeltaShared, params: list[DeltaModel]) -> Problem | None:
        if shared.rescale == "paper" and variant.sparsification not in ("random", "della"):
            return (
                None,
                "rescale",
                "'paper' applies to random drops (DARE, DELLA); use 'l1' or false",
            )
        for i, p in enumerate(params):
            if isinstance(p, DellaModel):
                d, e = p.density, p.epsilon
                if d < 1 and not (0 < d - e and d + e < 1):
                    return i, "epsilon", f"density ± epsilon must lie inside (0, 1), got {d} ± {e}"
        return None

    return check


def _sparsify(
    variant: Variant, inputs: Inputs, i: int, delta: torch.Tensor, rescale: Rescale | None
) -> torch.Tensor:
    """Input ``i``'s delta after the variant's sparsification (whole tensor or one chunk)."""
    p = inputs.params[i]
    state = inputs.states[i] if inputs.states is not None else None
    if isinstance(state, (MagnitudeTrim, RankWindow, DellaKeep)):
        return state.apply(delta, inputs.offset)
    if isinstance(state, KeepMask):
        start = inputs.offset
        keep = state.take(start, start + delta.numel(), delta.device)
        return apply_keep(delta, keep, p.density, rescale)
    if variant.sparsification == "magnitude":
        return magnitude_prune(delta, p.density, rescale)
    if variant.sparsification == "magnitude_outliers":
        assert isinstance(p, BreadcrumbsModel)
        return magnitude_outliers_prune(delta, p.density, p.gamma, rescale)
    if variant.sparsification == "random":
        assert inputs.generators is not None
        return random_drop(delta, p.density, rescale, inputs.generators[i])
    if variant.sparsification == "della":
        assert inputs.generators is not None and isinstance(p, DellaModel)
        return della_drop(delta, p.density, p.epsilon, rescale, inputs.generators[i])
    return delta


def _merge(variant: Variant):
    def merge(inputs: Inputs) -> torch.Tensor:
        import torch

        base = inputs.base
        assert base is not None
        if not inputs.tensors:
            return base
        shared = inputs.shared
        rescale = _rescale_mode(variant, shared.rescale)
        deltas = [_sparsify(variant, inputs, i, d, rescale) for i, d in enumerate(inputs.tensors)]
        stacked = torch.stack(deltas)
        del deltas
        coefficients = [p.weight for p in inputs.params]
        weights = torch.tensor(coefficients, dtype=stacked.dtype, device=stacked.device).reshape(
            (-1,) + (1,) * base.dim()
        )
        stacked.mul_(weights)
        normalize = shared.normalize
        if normalize is None:
            normalize = variant.default_normalize
        if variant.consensus:
            mask = agreement_mask(stacked, elect_sign(stacked))
            mixed = stacked.mul_(mask).sum(dim=0)
            if normalize:
                mixed /= zero_to_one((weights * mask).sum(dim=0))
        else:
            mixed = stacked.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
            if normalize:
                mixed /= divisor
        if shared.lambda_ != 1:
            mixed *= shared.lambda_
        return base + mixed

    return merge


def _fused(variant: Variant):
    """:func:`_merge` as one fused kernel for no sparsification, TIES trims and Breadcrumbs
    windows (thresholds from ``prepare``) and DARE keep masks; other variants decline."""

    def fused(inputs: FusedInputs[DeltaShared, DeltaModel]) -> bool:
        import numpy as np

        from mergekit_math.kernels import elementwise

        if inputs.base is None or not inputs.tensors:
            return False
        shared = inputs.shared
        rescale = _rescale_mode(variant, shared.rescale)
        masked = variant.sparsification == "random"
        if masked and rescale == "l1":
            return False
        kernel_args = _kernel_args(variant, inputs, rescale)
        if kernel_args is None:
            return False
        weights = tuple(np.float32(p.weight) for p in inputs.params)
        lam = np.float32(shared.lambda_)
        normalize = variant.default_normalize if shared.normalize is None else shared.normalize
        args = (inputs.base, tuple(inputs.tensors), *kernel_args)
        # inputs whose selections saw every magnitude finite need no count (zeros)
        bad = None if _all_finite(inputs) else inputs.bad
        if variant.consensus:
            elementwise.delta_ties(*args, weights, normalize, lam, inputs.out, bad)
        else:
            divisor = float(sum(weights, np.float32(0.0)))
            divisor = divisor if normalize and abs(divisor) >= 1e-8 else 1.0
            elementwise.delta_sum(*args, weights, np.float32(divisor), lam, inputs.out, bad)
        return True

    return fused


def _all_finite(inputs: FusedInputs[DeltaShared, DeltaModel]) -> bool:
    """Whether every input of the tensor is known finite: each model's trim or window
    histogrammed all its magnitudes |model - base|, or its DELLA decisions summed them, and
    found them finite (so the base is finite too); a model kept whole or a DARE mask says
    nothing."""
    states = inputs.states
    if not states or len(states) != len(inputs.tensors):
        return False
    return all(isinstance(s, (MagnitudeTrim, RankWindow, DellaKeep)) and s.finite for s in states)


def _kernel_args(
    variant: Variant, inputs: FusedInputs[DeltaShared, DeltaModel], rescale: Rescale | None
):
    """The kernels' ``thr, hi, sel, scale`` for this chunk (see ``elementwise.kept``: which
    are None picks the variant), or None where some input's state has no kernel."""
    import numpy as np

    from mergekit_math.kernels import elementwise

    masked = variant.sparsification == "random"
    k, n = len(inputs.tensors), inputs.out.shape[0]
    window = variant.sparsification == "magnitude_outliers"
    thresholds = np.full(k, -np.inf, np.float32)
    highs = np.full(k, np.inf, np.float32)
    # a window keeps what ``sel`` marks besides its range: everything, for an input kept whole
    sel, scale = np.empty((k, 0), np.uint8), np.ones(k, np.float32)
    drawn: list[int] = []  # inputs whose row of ``sel`` is a mask (set whole, not marked)
    for i, p in enumerate(inputs.params):
        state = inputs.states[i] if inputs.states is not None else None
        if p.density >= 1 or variant.sparsification == "none":
            if window:
                sel = sel if sel.shape[1] == n else np.zeros((k, n), np.uint8)
                sel[i] = 1
            continue
        if isinstance(state, (MagnitudeTrim, RankWindow)):
            rule = state.rules[inputs.offset]
            thresholds[i], highs[i] = rule.low, rule.high
            for value, skip, take in rule.runs:  # some of the chunk's ties, not all
                sel = sel if sel.shape[1] == n else np.zeros((k, n), np.uint8)
                tensor = inputs.tensors[i]
                elementwise.mark_ties(inputs.base, tensor, np.float32(value), skip, take, sel[i])
        elif masked:
            assert inputs.generators is not None
            sel = sel if sel.shape[1] == n else np.empty((k, n), np.uint8)
            inputs.generators[i].keep_into(inputs.offset, p.density, sel[i])
            scale[i] = p.density if rescale == "paper" else 1.0
            drawn.append(i)
        elif isinstance(state, DellaKeep):
            rows = state.rows.get(inputs.offset) if state.rows else None
            if rows is not None and rows.shape == (k, n) and (not sel.shape[1] or sel is rows):
                sel = rows  # every input's row as it is (ones for those kept whole)
                drawn = list(range(k))
            else:
                sel = sel if sel.shape[1] == n else np.empty((k, n), np.uint8)
                sel[i] = state.masks[inputs.offset]
                drawn.append(i)
            scale[i] = 1.0 if state.factor is None else state.factor
        else:
            return None
    if drawn:  # the rows of inputs kept whole keep everything
        for i in set(range(k)) - set(drawn):
            sel[i] = 1
    if not sel.shape[1]:  # no marks here: trims or windows without ties, or nothing to drop
        return thresholds, highs if window else None, None, None
    if window:
        return thresholds, highs, sel, None
    if variant.sparsification == "della":  # the kept entries multiplied by the L1 factor
        return thresholds, None, sel, (scale,)
    return thresholds, None, sel, scale if masked else None


def _selection_states(
    variant: Variant, inputs: PrepareInputs[DeltaShared, DeltaModel]
) -> list[Any]:
    """TIES trims or Breadcrumbs windows (None: an input kept whole). Magnitudes the engine
    holds as read (``StoredMagnitude``) are selected together, every input's histogram
    passes in one map; a magnitude in the reused buffer is selected before the next."""
    window = variant.sparsification == "magnitude_outliers"

    def ks(p: DeltaModel) -> list[int]:
        if not window:
            return MagnitudeTrim.ks(inputs.numel, p.density)
        assert isinstance(p, BreadcrumbsModel)
        return RankWindow.ks(inputs.numel, *breadcrumbs_window(inputs.numel, p.density, p.gamma))

    def state(p: DeltaModel, magnitude: Any, found: list[Selection] | None) -> Any:
        args = (inputs.ranges, inputs.map, inputs.compiled)
        if not window:
            return MagnitudeTrim(magnitude, p.density, *args, found[0] if found else None)
        assert isinstance(p, BreadcrumbsModel)
        first, count = breadcrumbs_window(inputs.numel, p.density, p.gamma)
        return RankWindow(magnitude, first, count, *args, found or None)

    states: list[Any] = [None] * len(inputs.params)
    stored = []
    for i, p in enumerate(inputs.params):
        if p.density < 1:
            magnitude = inputs.magnitude(i)
            if isinstance(magnitude, StoredMagnitude) and ks(p):
                stored.append((i, p, magnitude))
            else:
                states[i] = state(p, magnitude, None)
    items = [(magnitude, ks(p)) for _, p, magnitude in stored]
    found = kth_selects_of(items, inputs.map, inputs.compiled, inputs.ranges)
    for (i, p, magnitude), selections in zip(stored, found):
        states[i] = state(p, magnitude, selections)
    return states


def _della_states(variant: Variant, inputs: PrepareInputs[DeltaShared, DeltaModel]) -> list[Any]:
    """DELLA's keep decisions (None: an input kept whole), every input's in one map."""
    assert inputs.generators is not None
    drops = {}
    for i, p in enumerate(inputs.params):
        if p.density < 1:
            assert isinstance(p, DellaModel)
            drops[i] = (p.density, p.epsilon, inputs.generators[i])
    l1 = _rescale_mode(variant, inputs.shared.rescale) == "l1"
    keeps = della_keeps(inputs, drops, l1, row_length(inputs.shape))
    return [keeps.get(i) for i in range(len(inputs.params))]


def _chunking(variant: Variant) -> Chunking[DeltaShared, DeltaModel]:
    """Chunks for no sparsification, TIES trims and Breadcrumbs windows without L1 rescale
    (whole-tensor thresholds computed once) and DARE drops without L1 rescale (masks computed
    per chunk)."""

    def applies(shared: DeltaShared, params: list[DeltaModel]) -> bool:
        rescale = _rescale_mode(variant, shared.rescale)
        if variant.sparsification == "none":
            return True
        if variant.sparsification in ("magnitude", "magnitude_outliers"):
            return rescale is None
        if variant.sparsification == "random":
            return rescale != "l1"
        # DELLA: keep decisions and L1 factors by compiled passes (magprune.py)
        return rescale != "paper"

    def prepare(inputs: PrepareInputs[DeltaShared, DeltaModel]) -> list[Any]:
        if variant.sparsification == "della":
            return _della_states(variant, inputs)
        if variant.sparsification in ("magnitude", "magnitude_outliers"):
            return _selection_states(variant, inputs)
        states: list[Any] = []
        for i, p in enumerate(inputs.params):
            if p.density >= 1 or variant.sparsification == "none":
                states.append(None)
            elif variant.sparsification == "random":
                assert inputs.generators is not None
                states.append(KeepMask(inputs.generators[i], p.density))
            else:
                raise ValueError(f"{variant.sparsification} cannot run on chunks")
        return states

    def buffers(shared: DeltaShared, params: list[DeltaModel]) -> int:
        if variant.sparsification == "della":  # a 1-byte keep mask per dropping input
            return -(-sum(p.density < 1 for p in params) // 4)
        selects = variant.sparsification in ("magnitude", "magnitude_outliers")
        return int(selects and any(p.density < 1 for p in params))

    della = variant.sparsification == "della"
    unit = della_unit if della else None
    return Chunking(applies, prepare, buffers, compiled=della, host=True, unit=unit)


def _examples(variant: Variant) -> tuple[Example, ...]:
    extra: dict[str, Any] = {}
    if variant.sparsification != "none":
        extra["density"] = 0.4
    if variant.sparsification == "magnitude_outliers":
        extra["gamma"] = 0.05
    if variant.sparsification == "della":
        extra["epsilon"] = 0.1
    first, second = {"weight": 0.6, **extra}, {"weight": 0.5, **extra}
    examples = [
        Example((first, second)),
        Example((first, second), {"lambda": 0.8, "normalize": True}),
    ]
    if variant.sparsification != "none":
        examples.append(Example((first, second), {"rescale": "l1"}))
    if variant.sparsification in ("random", "della"):  # one input kept whole, one dropped
        examples.append(Example((first, {"weight": 0.5, "density": 1.0})))
    return tuple(examples)


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
        MergeMethod[DeltaShared, DeltaModel](
            name=name,
            pretty_name=pretty,
            paper_url=url,
            merge=_merge(variant),
            fused=_fused(variant),
            check=_check(variant),
            shared_defaults={
                "normalize": variant.default_normalize,
                "rescale": variant.default_rescale or False,
            },
            ignored=ignored,
            shared_params=DeltaShared,
            model_params=model_params,
            examples=_examples(variant),
            kind="delta",
            base="required",
            inputs=(1, None),
            random=variant.sparsification in ("random", "della"),
            description=description,
            chunking=_chunking(variant),
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
