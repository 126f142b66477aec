"""Arcee Fusion: take a fine-tune's changes only where they stand out from the rest.

For a base tensor ``B`` and one other model's tensor ``M`` (mergekit 0.1.5's
``arcee_fusion``), with softmax and the sum over the last dimension (a 1-D tensor is one
row):

    p = softmax(M) + ε,   q = softmax(B) + ε,   ε = 1e-8
    KL_row = Σ_last p · log(p / q)                  (one value per row)
    s = |M − B| · KL_row                            (importance of each entry)
    τ = Q₂(s) + 1.5 · (Q₃(s) − Q₁(s))               (median + 1.5 · IQR: Tukey's outlier fence)
    out = B + (M − B) · [s ≥ τ]

The quantiles use mergekit's rule without interpolation: ``Q(q) = sorted(s)[⌊q · (n − 1)⌋]``
over all ``n`` entries. mergekit applies that rule to the whole tensor only up to 1,000,000
entries; above that it sorts a sample of 1,000,000 entries drawn with the global RNG
(``torch.randint``), so its result on large tensors is random. Here the rule is applied to
the whole tensor at every size, exactly and deterministically, with an exact k-th selection
instead of a sort (:func:`~mergekit_math.methods.selection.kth_largest`). Up to 1,000,000
entries the output is mergekit's, bit for bit, when rows have at most 32768 entries; longer
rows are summed in float64 (see :func:`row_kl`), so their KL may differ from mergekit's in the
last bit.

Where the fused kernels run, a tensor merges in chunks of whole rows: :func:`fusion_prepare`
computes the row KLs and τ from the inputs the engine holds, with the same float32 steps per
row (bit-identical to the whole path; the softmaxes compiled where torch's are known here,
:mod:`~mergekit_math.kernels.torch_softmax`), and :func:`fusion_fused` merges each chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergekit_math.methods.base import (
    Chunking,
    Example,
    FusedInputs,
    MergeInputs,
    MergeMethod,
    Params,
    PrepareInputs,
    reduce_sum,
    register,
)
from mergekit_math.methods.selection import Selection, kth_largest, kth_selects

if TYPE_CHECKING:
    import torch

# Added to both softmaxes so the log ratio stays finite where a probability underflows to 0.
EPS = 1e-8
# The fence: entries with importance at least median + FENCE · IQR are taken from the model.
FENCE = 1.5
# (numerator, denominator) of the quartiles: Q₁, the median, Q₃.
QUARTILES = ((1, 4), (1, 2), (3, 4))


class ArceeFusionShared(Params):
    pass


class ArceeFusionModel(Params):
    pass


def row_kl(
    model: torch.Tensor,
    base: torch.Tensor,
    compiled: bool = False,
    work: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """KL(softmax(model) ‖ softmax(base)) over the last dimension, ε-smoothed, keeping that
    dimension (size 1) so it broadcasts over the row.

    The operations are mergekit's, in its order, so rows match it bit for bit; rows longer
    than 32768 are summed with :func:`reduce_sum` (thread-count independent). ``compiled``
    (contiguous CPU float32 inputs): the two ``+ ε`` and the division in one compiled pass
    (:func:`~mergekit_math.kernels.fusion.smoothed_ratio`, the same float32 steps), where
    torch took three. ``work``: two float32 tensors of the inputs' shape the softmaxes are
    written into (reused memory: fresh arrays fault in zeroed pages)."""
    import torch

    if work is None:
        p = torch.softmax(model, dim=-1)
        q = torch.softmax(base, dim=-1)
    else:
        p = torch.softmax(model, dim=-1, out=work[0])
        q = torch.softmax(base, dim=-1, out=work[1])
    if compiled:
        import numpy as np

        from mergekit_math.kernels.fusion import smoothed_ratio

        smoothed_ratio(p.reshape(-1).numpy(), q.reshape(-1).numpy(), np.float32(EPS))
    else:
        p.add_(EPS)
        torch.div(p, q.add_(EPS), out=q)
    return _kl_of_ratio(p, q)


def _kl_of_ratio(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_last p · log(q) for the smoothed ``p`` and the ratio ``q`` = p / (softmax(base) +
    ε), in q's storage, keeping the last dimension (size 1)."""
    terms = q.log_().mul_(p)
    return reduce_sum(terms, dim=-1).unsqueeze(-1)


def _range_kl(base: Any, model: Any, row: int) -> Any:
    """The row KLs (float32 numpy) of a range of whole rows of stored arrays, by the whole
    path's steps, bit for bit: where torch's softmax is known here
    (:func:`~mergekit_math.kernels.softmax_lanes`), the softmaxes, ``+ ε`` and the ratio in
    one compiled pass per row while it is in cache
    (:func:`~mergekit_math.kernels.torch_softmax.smoothed_softmax_ratio`), then torch's log,
    product and sums; otherwise the inputs widened and torch's softmaxes (a range with a
    non-finite input takes that path too)."""
    import numpy as np
    import torch

    from mergekit_math.kernels import softmax_lanes
    from mergekit_math.kernels.elementwise import widen_into
    from mergekit_math.kernels.torch_softmax import smoothed_softmax_ratio
    from mergekit_math.methods.statistics import thread_float32

    n = base.shape[0]
    lanes = softmax_lanes()
    if lanes:
        p, q = thread_float32(2, n)  # this thread's reused arrays
        if smoothed_softmax_ratio(base, model, row, lanes, np.float32(EPS), p, q):
            ratio = (torch.from_numpy(a).view(-1, row) for a in (p, q))
            return _kl_of_ratio(*ratio).reshape(-1).numpy()
    work = thread_float32(4, n)
    widen_into(base, work[0])
    widen_into(model, work[1])
    b, m, p, q = (torch.from_numpy(a).view(-1, row) for a in work)
    return row_kl(m, b, compiled=True, work=(p, q)).reshape(-1).numpy()


def quartile_indices(n: int) -> list[int]:
    """0-based positions in the ascending order of ``n`` values that mergekit reads as Q₁,
    the median and Q₃: ``⌊q · (n − 1)⌋``, without interpolation.

    mergekit computes ``q · (n − 1)`` in float32 and truncates; below 2²² (and for its
    1,000,000-entry sample) that product is exact, so it equals this integer floor."""
    return [num * (n - 1) // den for num, den in QUARTILES]


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """τ = median + 1.5 · (Q₃ − Q₁) of all entries, as a 0-d tensor of their dtype.

    The i-th smallest of n values (0-based) is the (n − i)-th largest, found exactly without
    sorting; the fence is then computed in the tensor's dtype, as mergekit does."""

    flat = importance.reshape(-1)
    n = flat.numel()
    quartiles = [kth_largest(flat, n - i) for i in quartile_indices(n)]
    return _fence(quartiles, importance.dtype, importance.device)


def _fence(quartiles: list[float], dtype: torch.dtype, device: Any = None) -> torch.Tensor:
    import torch

    q1, median, q3 = torch.tensor(quartiles, dtype=dtype, device=device)
    return median + FENCE * (q3 - q1)


def _fence32(quartiles: list[float]) -> Any:
    """:func:`_fence` in float32 as a numpy scalar: the same two roundings (1.5 is exact)."""
    import numpy as np

    q1, median, q3 = (np.float32(q) for q in quartiles)
    return median + np.float32(FENCE) * (q3 - q1)


def arcee_fusion(inputs: MergeInputs[ArceeFusionShared, ArceeFusionModel]) -> torch.Tensor:
    """out = base + (model − base) · [importance ≥ τ] (see the module docstring)."""
    import torch

    assert inputs.base is not None and len(inputs.tensors) == 1
    base, model = inputs.base, inputs.tensors[0]
    if base.numel() == 0:
        return base.clone()
    shape = base.shape
    if base.dim() == 0:  # a scalar is a row of one entry
        base, model = base.reshape(1), model.reshape(1)
    if inputs.states is not None:  # a chunk of whole rows: fusion_prepare's KL and τ
        (state,) = inputs.states
        kl = torch.from_numpy(state.kl[inputs.offset]).unsqueeze(-1)
        base, model = base.reshape(kl.shape[0], -1), model.reshape(kl.shape[0], -1)
    else:
        kl = row_kl(model, base)
    delta = model - base
    importance = delta.abs().mul_(kl)
    threshold = fusion_threshold(importance) if inputs.states is None else state.threshold
    keep = importance >= threshold
    del importance
    return (base + delta.mul_(keep.to(delta.dtype))).reshape(shape)


def row_length(shape: tuple[int, ...]) -> int:
    """The length of the rows the KL is taken over (a scalar is a row of one entry)."""
    return shape[-1] if shape else 1


@dataclass(frozen=True)
class FusionState:
    """A tensor's row KLs (float32, one array per range, by its start) and its threshold τ
    (a float32: a numpy scalar, or a 0-d tensor where torch selected it)."""

    kl: dict[int, Any]
    threshold: Any
    # every importance |model - base|·KL finite, so base and model are: nothing to count
    finite: bool = False


def prepares_without_torch() -> bool:
    """Whether the preparation computes its KLs compiled, without torch, here: torch's
    softmax, sums and log are known (:func:`~mergekit_math.kernels.softmax_lanes`,
    :func:`~mergekit_math.kernels.torch_sums_known`,
    :func:`~mergekit_math.kernels.torch_log.ln_available`). Rows over 32768 entries and
    ranges with a non-finite input still take torch's steps."""
    from mergekit_math.kernels import softmax_lanes, torch_sums_known
    from mergekit_math.kernels.torch_log import ln_available

    return bool(softmax_lanes()) and torch_sums_known() and ln_available()


def _range_state(base: Any, model: Any, row: int) -> tuple[Any, int, Any]:
    """One range of whole rows (stored arrays): its row KLs, and the flags and first-pass
    histogram of its importances ``|m - b|·KL`` in torch's float32 steps (not kept; see
    :func:`~mergekit_math.kernels.fusion.importance_bins`). Where
    :func:`prepares_without_torch`, one compiled pass row by row
    (:func:`~mergekit_math.kernels.fusion.kl_importance_bins`); otherwise, or where an
    input is not finite, :func:`_range_kl` then a pass for the importances."""
    import numpy as np

    from mergekit_math.kernels import softmax_lanes
    from mergekit_math.kernels.fusion import importance_bins, kl_importance_bins
    from mergekit_math.kernels.select import BINS
    from mergekit_math.kernels.torch_log import ln_address, one_mkl_thread
    from mergekit_math.methods.base import SINGLE_THREAD_REDUCTION

    kl = np.empty(base.shape[0] // row, np.float32)
    hist = np.zeros(BINS, np.int32)
    if row <= SINGLE_THREAD_REDUCTION and prepares_without_torch() and ln_address():
        lanes, eps, ln = np.int64(softmax_lanes()), np.float32(EPS), ln_address()
        with one_mkl_thread():
            flags = kl_importance_bins(base, model, np.int64(row), lanes, eps, ln, kl, hist)
        if flags >= 0:
            return kl, int(flags), hist
        hist[:] = 0
    kl = _range_kl(base, model, row)
    return kl, importance_bins(base, model, kl, row, hist), hist


def fusion_prepare(inputs: PrepareInputs[ArceeFusionShared, ArceeFusionModel]) -> list[Any]:
    """The tensor's :class:`FusionState`, from the held inputs: each range of whole rows'
    KLs and importances by the float32 steps of the whole path (:func:`_range_state`, on the
    worker threads: a row's softmax and sums do not depend on the rows around it), then the
    three quartiles of the importances by one exact selection."""
    import numpy as np

    from mergekit_math.kernels.fusion import importances
    from mergekit_math.kernels.select import BINS, kth_largest_bits_from

    assert inputs.held is not None
    if inputs.numel == 0:
        return [None]
    row = row_length(inputs.shape)

    def one(job: tuple[tuple[int, int], tuple[Any, list[Any]]]) -> tuple[Any, int, Any]:
        _, (base, models) = job
        return _range_state(base, models[0], row)

    done = list(inputs.map(one, zip(inputs.ranges, inputs.held)))
    finite = not any(flags & 1 for _, flags, _ in done)
    ks = [inputs.numel - i for i in quartile_indices(inputs.numel)]
    if finite and not any(flags & 2 for _, flags, _ in done):
        # the second pass computes the importances again from the held inputs
        parts = [
            (r, (base, models[0], kl, np.int64(row)))
            for r, ((base, models), (kl, _, _)) in enumerate(zip(inputs.held, done))
        ]
        hists = [hist for _, _, hist in done]
        found = kth_largest_bits_from(parts, hists, ks, inputs.map, len(parts))  # type: ignore[arg-type]
        threshold = _fence32([Selection(*f).threshold for f in found])
    else:  # a KL rounded below zero, or NaN or inf: the importances in one array
        import torch

        importance = np.empty(inputs.numel, np.float32)
        for (start, end), (base, models), (kl, _, _) in zip(inputs.ranges, inputs.held, done):
            importances(base, models[0], kl, row, importance[start:end], np.zeros(BINS, np.int32))
        values = torch.from_numpy(importance)
        if finite:  # the selection of signed values
            found = kth_selects(values, ks, inputs.map, compiled=True, ranges=inputs.ranges)
            threshold = _fence([f.threshold for f in found], torch.float32)
        else:  # the selection's order of NaN and inf is torch's
            threshold = fusion_threshold(values)
    kl = {start: k for (start, _), (k, _, _) in zip(inputs.ranges, done)}
    return [FusionState(kl, threshold, finite)]


def fusion_fused(inputs: FusedInputs[ArceeFusionShared, ArceeFusionModel]) -> bool:
    """A chunk of whole rows with its tensor's KLs and τ as one fused kernel."""
    import numpy as np

    from mergekit_math.kernels.fusion import fusion

    if inputs.states is None or inputs.states[0] is None or inputs.base is None:
        return False
    (state,) = inputs.states
    kl = state.kl[inputs.offset]
    row = inputs.out.shape[0] // kl.shape[0]
    tau = np.float32(state.threshold.item())
    bad = None if state.finite else inputs.bad
    fusion(inputs.base, inputs.tensors[0], kl, row, tau, inputs.out, bad)
    return True


register(
    MergeMethod[ArceeFusionShared, ArceeFusionModel](
        name="arcee_fusion",
        pretty_name="Arcee Fusion",
        paper_url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        merge=arcee_fusion,
        shared_params=ArceeFusionShared,
        model_params=ArceeFusionModel,
        examples=(Example(({},)),),
        base="required",
        inputs=(1, 1),
        # chunks of whole rows where the fused kernel runs; the importances are not kept (the
        # selection computes them again), so no whole-tensor buffer
        chunking=Chunking(
            prepare=fusion_prepare, compiled=True, unit=row_length, host=prepares_without_torch
        ),
        fused=fusion_fused,
        description="Take one model's changes to base_model where their KL-weighted size is "
        "an outlier (above median + 1.5 IQR).",
    )
)
