"""One range of an item: reading its inputs (``pread`` into buffers of their own), turning
them into the compute dtype, and what the merge loop shares with the code that computes
ranges (:class:`_Run`, the reused scratch buffer, the worker-thread wrapper)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mergekit_math.io.input_file import NUMPY_VIEWS
from mergekit_math.io.reader import ITEMSIZE
from mergekit_math.merge.finite import FiniteCheck
from mergekit_math.merge.host import InputMaps, imported_torch
from mergekit_math.merge.inputs import _item_inputs
from mergekit_math.merge.types import Plan, PlanItem
from mergekit_math.pipeline import Prefetcher

if TYPE_CHECKING:
    import torch


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


@dataclass
class _Run:
    """What ``execute`` shares with :func:`compute_item` while it runs."""

    prefetch: Prefetcher | None
    chunk: int
    pool: ThreadPoolExecutor | None = None
    workers: int = 1
    scratch: dict[int, torch.Tensor] = field(default_factory=dict)  # per slot, see _scratch
    buffers: dict[tuple[int, str], Any] = field(default_factory=dict)  # see _buffer
    strict_finite: bool = False  # refuse inputs with NaN/inf instead of warning
    warn: Callable[[str], None] | None = None
    host: bool = False  # inputs are read into numpy arrays (mergekit_math.merge.host)
    mapped: InputMaps | None = None  # host inputs read as mapped views, once on
    # an output tensor's first byte's phase in its file's blocks (ShardedWriter.phase_of)
    phase: Callable[[str], int | None] | None = None
    ahead: Any = None  # the preparations run ahead (mergekit_math.merge.ahead.Ahead)


def _read_range(
    plan: Plan,
    item: PlanItem,
    start: int,
    end: int,
    pin: bool = False,
    only: int | None = None,
    host: bool = False,
    mapped: InputMaps | None = None,
) -> list[Any]:
    """The raw (stored dtype) inputs of ``item`` for flat elements ``[start, end)``, read
    (``pread``) into buffers of their own, pinned with ``pin``; with ``only``, just the base
    and that source (with its origin): the others are empty. With ``host`` they are flat
    numpy arrays (``NUMPY_VIEWS`` types: bfloat16 as uint16 bits), and torch is not used;
    with ``mapped``, once it is on (the merge holds the SIGBUS guard, :mod:`~mergekit_math.
    kernels.sigbus`; the reads wait until that is decided), they are views of private
    mappings of just the range's pages instead (no copy: 0.08 s of CPU for 6.6 GB here
    against 0.75-1.3 s of copies), unmapped when freed.

    A range's own mapping, unmapped whole when freed, keeps the resident set as the copies
    do; views of one mapping of the whole file did not (releasing a chunk's pages with
    ``madvise`` left the fault-around blocks or large folios around them mapped: +260 MB over
    a TinyLlama merge). The copies remain for the torch path, before the guard is installed,
    where it cannot be, and under ``MMATH_MAP=0``: on the kernel where they were first
    measured, faulting a mapping in cost as much as copying (0.83 vs 0.78 s for 2.2 GB).
    """
    if host:
        import numpy as np

        def empty(dtype: str) -> Any:
            return np.empty(0, NUMPY_VIEWS[dtype])

        def read(ckpt: Any, name: str, nbytes: int) -> Any:
            if mapped is not None and mapped.wait():
                view = ckpt.map_host(name, start, end)
                if view is not None:
                    return view
            return ckpt.read_host(name, start, end, np.empty(nbytes, np.uint8))
    else:
        import torch

        def empty(dtype: str) -> Any:
            return torch.empty(0, dtype=getattr(torch, dtype))

        def read(ckpt: Any, name: str, nbytes: int) -> Any:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
            return ckpt.read_range(name, start, end, out=buf)

    out = []
    source = -1
    for role, ckpt, name in _item_inputs(plan, item):
        dtype = ckpt.info(name).dtype
        source += role in ("source", "delta")
        if only is not None and role != "base" and source != only:
            out.append(empty(dtype))
        else:
            out.append(read(ckpt, name, (end - start) * ITEMSIZE[dtype]))
    return out


def _release_range(plan: Plan, item: PlanItem, start: int, end: int) -> None:
    for _, ckpt, name in _item_inputs(plan, item):
        ckpt.release_range(name, start, end)


class _RangeInputs:
    """Turns one range's raw (stored dtype) inputs of an item into ``(base, tensors)`` in the
    compute dtype: per source its tensor, or its delta for a delta method, with the finite
    check on every input read."""

    def __init__(self, plan: Plan, item: PlanItem, device: str, finite: FiniteCheck | None):
        recipe = plan.recipe
        inputs = _item_inputs(plan, item)
        self.roles = [r for r, _, _ in inputs]
        self.shapes = [c.info(n).shape for _, c, n in inputs]
        self.stored = [c.info(n).dtype for _, c, n in inputs]
        self.device = device
        self.compute_name = recipe.compute_dtype
        self.load_name = recipe.dtype
        self.delta_kind = plan.method.kind == "delta"
        self.finite = finite

    @functools.cached_property
    def compute(self) -> torch.dtype:
        return _torch_dtype(self.compute_name)

    @functools.cached_property
    def load(self) -> torch.dtype | None:
        return _torch_dtype(self.load_name) if self.load_name else None

    def upcast(self, t: torch.Tensor) -> torch.Tensor:
        y = t.to(self.load) if self.load is not None else t
        y = y.to(device=self.device, dtype=self.compute, non_blocking=True)
        # never compute in place on the file mapping
        return y.clone() if y.data_ptr() == t.data_ptr() and y.numel() else y

    def __call__(
        self, raw: list[torch.Tensor], shaped: bool, check: bool = True, only: int | None = None
    ) -> tuple[Any, list[torch.Tensor]]:
        """(base, per-source tensor or delta) in the compute dtype from one range's raw data;
        with ``only``, just that source's (the others are empty placeholders, not computed).
        Ranges read into numpy (``_Run.host``) are turned into tensors first (no copy)."""
        if raw and not hasattr(raw[0], "data_ptr"):
            from mergekit_math.merge.host import as_torch

            raw = [as_torch(t, dtype) for t, dtype in zip(raw, self.stored)]
        if shaped:
            raw = [t.reshape(shape) for t, shape in zip(raw, self.shapes)]
        finite = self.finite if check else None

        def checked(i: int, x: torch.Tensor) -> torch.Tensor:
            if finite is not None:
                finite(i, x)
            return x

        roles = self.roles
        base = None
        tensors: list[torch.Tensor] = []
        i = 0
        while i < len(raw):
            role = roles[i]
            if role == "base":
                base = checked(i, self.upcast(raw[i]))
            elif only is not None and len(tensors) != only:
                tensors.append(raw[i][:0])
                i += int(i + 1 < len(raw) and roles[i + 1] == "origin")
            elif role == "delta":  # from a patch: already a delta, not rounded to ``dtype``
                d = raw[i].to(device=self.device, dtype=self.compute)
                d = d.clone() if d.data_ptr() == raw[i].data_ptr() else d
                tensors.append(checked(i, d))
            else:
                x = checked(i, self.upcast(raw[i]))
                if self.delta_kind:
                    if i + 1 < len(raw) and roles[i + 1] == "origin":
                        i += 1
                        x = x.sub_(checked(i, self.upcast(raw[i])))
                    else:
                        assert base is not None
                        x = x.sub_(base)
                tensors.append(x)
            i += 1
        return base, tensors


def _scratch(
    run: _Run | None, numel: int, dtype: torch.dtype, device: str, slot: int = 0
) -> torch.Tensor:
    """A tensor of ``numel`` elements reused across tensors: a fresh allocation of the
    largest tensor per item costs a page fault per 4 KB every time. One per ``slot``: the
    items prepared at once (:class:`~mergekit_math.merge.ahead.Ahead`) have distinct slots."""
    import torch

    if run is None:
        return torch.empty(numel, dtype=dtype, device=device)
    buf = run.scratch.get(slot)
    want = torch.device(device)
    same_device = buf is not None and buf.device.type == want.type
    if same_device and want.index is not None:
        same_device = buf.device.index == want.index  # type: ignore[union-attr]
    if buf is None or buf.numel() < numel or buf.dtype != dtype or not same_device:
        run.scratch.pop(slot, None)  # free the old one first
        run.scratch[slot] = buf = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _buffer(run: _Run | None, key: str, numel: int, dtype: Any, slot: int = 0) -> Any:
    """A flat numpy array of ``numel`` elements for a preparation (``PrepareInputs.buffer``),
    reused under (``slot``, ``key``) across the merge's tensors. Fresh whole-tensor arrays
    fault in zeroed pages on first touch: Karcher's two float32 arrays spent 30% of a
    TinyLlama merge's CPU time in the kernel's page clearing."""
    import numpy as np

    if run is None:
        return np.empty(numel, dtype)
    buf = run.buffers.get((slot, key))
    if buf is None or buf.shape[0] < numel or buf.dtype != np.dtype(dtype):
        run.buffers.pop((slot, key), None)  # free the old one first
        run.buffers[slot, key] = buf = np.empty(numel, dtype)
    return buf[:numel]


def _in_worker(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a worker thread, in torch's inference mode where torch is imported
    (a merge on numpy arrays may never import it, or be importing it)."""
    torch = imported_torch()
    if torch is None:
        return fn(*args)
    with torch.inference_mode():
        return fn(*args)
