"""Plan and execute a merge: plan types, planning, parameter resolution, memory budgets
and execution (see docs/architecture.md)."""

from mergekit_math.merge.execution import compute_item, execute
from mergekit_math.merge.memory import (
    CHUNK_ELEMENTS,
    IO_BUDGET,
    check_memory,
    estimated_peak_bytes,
    is_chunked,
    item_memory,
    item_ranges,
)
from mergekit_math.merge.plan import DEFAULT_SEED, build_plan
from mergekit_math.merge.types import Plan, PlanItem, SliceGroup, Source

__all__ = [
    "CHUNK_ELEMENTS",
    "DEFAULT_SEED",
    "IO_BUDGET",
    "Plan",
    "PlanItem",
    "SliceGroup",
    "Source",
    "build_plan",
    "check_memory",
    "compute_item",
    "estimated_peak_bytes",
    "execute",
    "is_chunked",
    "item_memory",
    "item_ranges",
]
