"""Memory budgets: chunk sizes, read-ahead budgets and the working set of each tensor."""

from __future__ import annotations

from mergekit_math.errors import UserError
from mergekit_math.io.reader import ITEMSIZE
from mergekit_math.io.writer import human_bytes
from mergekit_math.merge.inputs import _item_inputs
from mergekit_math.merge.types import Plan, PlanItem

# Elements per chunk for methods that run on chunks (CPU): large enough that the per-chunk
# overhead (Python, thread hand-offs, a read per input) is small next to the fused kernels'
# 0.5-1 ns per element (256 Ki elements: 10-15 % slower merges), small enough that the
# torch path's temporaries stay a few tens of MB.
CHUNK_ELEMENTS = 1 << 20
# Bytes the reader thread may run ahead, and the writer thread behind, by default.
IO_BUDGET = 64 * 2**20


def is_chunked(plan: Plan, item: PlanItem, device: str = "cpu") -> bool:
    """Whether ``item`` runs on flat chunks (copies always do; methods when they can)."""
    if item.copy_only:
        return True
    if item.aligned:  # its inputs are gathered rows, made whole
        return False
    if device != "cpu" or not plan.method.chunkable(item.shared, item.params):
        return False
    chunking = plan.method.chunking
    if chunking is not None and chunking.compiled:
        # its statistics come from compiled passes over the inputs as read
        from mergekit_math.merge.fused import FusedRange

        return FusedRange.of(plan, item, device, None, None) is not None
    return True


def item_ranges(plan: Plan, item: PlanItem, device: str, chunk: int) -> list[tuple[int, int]]:
    n = item.out.numel
    if n <= chunk or not is_chunked(plan, item, device):
        return [(0, n)]
    chunking = plan.method.chunking
    if chunking is not None and chunking.unit is not None:
        unit = chunking.unit(tuple(item.out.shape))
        chunk = max(unit, chunk // unit * unit)
        if chunk >= n:
            return [(0, n)]
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def item_memory(
    plan: Plan, item: PlanItem, device: str = "cpu", chunk: int = CHUNK_ELEMENTS
) -> int:
    """Bytes of tensor data one item holds at once while it is computed (an estimate)."""
    n = item.out.numel
    inputs = _item_inputs(plan, item)
    raw = sum(ITEMSIZE[c.info(name).dtype] for _, c, name in inputs)
    if item.copy_only:
        return min(n, chunk) * raw
    cbytes = ITEMSIZE[plan.recipe.compute_dtype]
    per_element = raw + cbytes * (2 * len(inputs) + 4)
    if len(item_ranges(plan, item, device, chunk)) == 1:
        return n * per_element
    chunking = plan.method.chunking
    buffers = chunking.buffers(item.shared, item.params) if chunking is not None else 0
    if chunking is not None and chunking.compiled:  # the inputs held, and the states
        return chunk * per_element + n * (raw + buffers * cbytes)
    # whole-tensor buffers, or (compiled kernels) the item's inputs held as read instead
    return chunk * per_element + n * max(buffers * cbytes, raw if buffers else 0)


def _budgets(max_memory: int | None) -> tuple[int, int]:
    """(chunk elements, IO budget in bytes) for a memory limit."""
    if max_memory is None:
        return CHUNK_ELEMENTS, IO_BUDGET
    io_budget = max(1 << 20, min(IO_BUDGET, max_memory // 8))
    chunk = max(4096, min(CHUNK_ELEMENTS, max_memory // 8 // 64))
    return chunk, io_budget


def check_memory(plan: Plan, max_memory: int, device: str = "cpu") -> None:
    """Raise UserError when some tensor needs more than ``max_memory`` at once."""
    chunk, io_budget = _budgets(max_memory)
    for item in plan.items:
        need = item_memory(plan, item, device, chunk) + 2 * io_budget
        if need > max_memory:
            how = "on chunks" if is_chunked(plan, item, device) else "whole (it cannot be chunked)"
            raise UserError(
                f"--max-memory {human_bytes(max_memory)}: {item.out.name} "
                f"{list(item.out.shape)} needs about {human_bytes(need)} with {plan.method.name} "
                f"{how}; raise the limit"
            )


def estimated_peak_bytes(plan: Plan, max_memory: int | None = None, device: str = "cpu") -> int:
    """Tensor data held at once: the largest item's working set plus the IO budgets."""
    if not plan.items:
        return 0
    chunk, io_budget = _budgets(max_memory)
    held = sum(c.held_bytes for c in plan.checkpoints.values())  # BASE+ADAPTER merges
    return max(item_memory(plan, i, device, chunk) for i in plan.items) + 2 * io_budget + held
