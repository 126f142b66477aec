"""The engine's side of fused kernels (:mod:`mergekit_math.kernels`): whether an item's
ranges can run through its method's kernel, and the call that hands it one range's inputs
as stored and takes back the output dtype."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergekit_math.io.writer import DIRECT_BLOCK, HostPart
from mergekit_math.merge.finite import FiniteCheck
from mergekit_math.merge.inputs import _item_inputs
from mergekit_math.merge.types import Plan, PlanItem

if TYPE_CHECKING:
    import torch

    from mergekit_math.methods.masks import MaskStream
    from mergekit_math.methods.selection import StoredMagnitude

# stored dtype -> (numpy dtype of the kernel's view, the torch dtype of the same width)
_VIEWS = {"bfloat16": ("uint16", "int16"), "float32": ("float32", "float32")}


def _laid_out(n: int, dtype: Any, phase: int | None, start: int) -> Any:
    """An empty array of ``n`` elements for the output range at element ``start`` of a
    tensor whose first byte is at ``phase`` in its file's blocks: its address has its
    bytes' phase there, so the writer writes its whole blocks from it without the staging
    copy (2.2 GB of copies a TinyLlama-sized merge). Anywhere where ``phase`` is None or
    the elements would be misaligned."""
    import numpy as np

    at = None if phase is None else (phase + start * dtype.itemsize) % DIRECT_BLOCK
    if at is None or at % dtype.itemsize or n * dtype.itemsize < 2 * DIRECT_BLOCK:
        return np.empty(n, dtype)
    spare = np.empty(n * dtype.itemsize + DIRECT_BLOCK, np.uint8)
    shift = (at - spare.ctypes.data) % DIRECT_BLOCK
    return spare[shift : shift + n * dtype.itemsize].view(dtype)


class FusedRange:
    """Runs one item's ranges through its method's fused kernel; ``None`` from
    :meth:`of` where the kernel cannot apply to this item at all, ``None`` from a call where
    the method's kernel declines these parameters (then the torch path runs)."""

    def __init__(
        self,
        plan: Plan,
        item: PlanItem,
        finite: FiniteCheck | None,
        generators: list[MaskStream] | None,
    ):
        self.plan = plan
        self.item = item
        self.finite = finite
        self.generators = generators
        self.has_base = _item_inputs(plan, item)[0][0] == "base"
        # the sources are deltas against that base (what delta() and stored() give)
        self.deltas = self.has_base and plan.method.kind == "delta"
        self.out_dtype = item.out.dtype
        # where the output tensor's first byte falls in its file's blocks: host outputs are
        # laid out so that the writer writes their whole blocks from them (None: anywhere)
        self.phase: int | None = None

    @classmethod
    def of(
        cls,
        plan: Plan,
        item: PlanItem,
        device: str,
        finite: FiniteCheck | None,
        generators: list[MaskStream] | None,
    ) -> FusedRange | None:
        from mergekit_math import kernels

        recipe = plan.recipe
        if plan.method.fused is None or not kernels.enabled(device, plan.output_elements):
            return None
        if recipe.compute_dtype != "float32" or item.out.dtype not in _VIEWS:
            return None
        inputs = _item_inputs(plan, item)
        roles = [role for role, _, _ in inputs]
        if any(role not in ("base", "source") for role in roles) or "base" in roles[1:]:
            return None
        stored = [ckpt.info(name).dtype for _, ckpt, name in inputs]
        if any(d not in _VIEWS or (recipe.dtype not in (None, d)) for d in stored):
            return None
        sources = stored[1:] if roles[0] == "base" else stored
        if len(set(sources)) != 1:
            return None
        return cls(plan, item, finite, generators)

    def __call__(
        self, raw: list[Any], start: int, states: list[Any] | None
    ) -> torch.Tensor | HostPart | None:
        """The output of the range starting at flat ``start`` (flat, in the output dtype),
        or None where the method's kernel declines. Inputs read into numpy arrays (a merge
        without torch) give a :class:`HostPart`, tensors a tensor."""
        import numpy as np

        from mergekit_math.methods import FusedInputs

        arrays = [_as_numpy(t) for t in raw]
        n = arrays[0].shape[0]
        view, torch_view = _VIEWS[self.out_dtype]
        host = isinstance(raw[0], np.ndarray)
        if host:
            out_array = _laid_out(n, np.dtype(view), self.phase, start)
            out: Any = HostPart(out_array, self.out_dtype)
        else:
            import torch

            out = torch.empty(n, dtype=getattr(torch, self.out_dtype))
            out_array = out.view(getattr(torch, torch_view)).numpy().view(view)
        bad = np.zeros(len(arrays), np.int64)
        base = arrays[0] if self.has_base else None
        done = self.plan.method.fused(
            FusedInputs(
                base=base,
                tensors=arrays[1:] if self.has_base else arrays,
                params=self.item.params,
                shared=self.item.shared,
                generators=self.generators,
                offset=start,
                states=states,
                out=out_array,
                bad=bad,
            )
        )
        if not done:
            return None
        if self.finite is not None:
            for i in np.flatnonzero(bad):
                self.finite.count(int(i), int(bad[i]))
        return out

    def delta(
        self, raw: list[torch.Tensor], i: int, out: torch.Tensor, absolute: bool = False
    ) -> bool:
        """Source ``i``'s delta against the base (its magnitude with ``absolute``), into the
        float32 range ``out`` (False where this item has no base)."""
        if not self.deltas:
            return False
        from mergekit_math.kernels.elementwise import delta_into, magnitude_into

        kernel = magnitude_into if absolute else delta_into
        kernel(_as_numpy(raw[0]), _as_numpy(raw[1 + i]), out.numpy())
        return True

    def arrays(self, raws: list[list[torch.Tensor]]) -> list[tuple[Any, list[Any]]]:
        """Each range's raw inputs as numpy arrays: (base or None, the other inputs)."""
        held = []
        for raw in raws:
            arrays = [_as_numpy(t) for t in raw]
            held.append((arrays[0], arrays[1:]) if self.has_base else (None, arrays))
        return held

    def stored(self, raws: list[list[torch.Tensor]], i: int) -> StoredMagnitude | None:
        """Source ``i``'s magnitude over the item, from its ranges' raw inputs as read (in
        order), not materialised (None where this item has no base)."""
        if not self.deltas:
            return None
        from mergekit_math.methods.selection import StoredMagnitude

        parts = [(_as_numpy(raw[0]), _as_numpy(raw[1 + i])) for raw in raws]
        return StoredMagnitude(parts, self.item.out.numel)


def _as_numpy(t: Any) -> Any:
    """A range's raw input as a flat numpy array (bfloat16 as uint16 bits): a tensor viewed,
    an array read into numpy as it is."""
    if not hasattr(t, "data_ptr"):
        return t.reshape(-1)
    import torch

    flat = t.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view("uint16")
    return flat.numpy()
