"""Which tensors one output tensor reads (role, checkpoint, name), and their YAML paths."""

from __future__ import annotations

from mergekit_math.io.reader import ITEMSIZE, Checkpoint
from mergekit_math.merge.types import Plan, PlanItem


def _item_inputs(plan: Plan, item: PlanItem) -> list[tuple[str, Checkpoint, str]]:
    """(role, checkpoint, tensor name) of every tensor an item reads, in a fixed order:
    ``base``, then per source ``source`` and, when it has its own origin, ``origin``."""
    g = item.group
    if item.copy_only:
        if g.base is not None and item.base_name:
            return [("source", g.base.ckpt, item.base_name)]
        return [("source", g.sources[0].ckpt, item.names[0])]
    out: list[tuple[str, Checkpoint, str]] = []
    if g.base is not None and item.base_name:
        out.append(("base", g.base.ckpt, item.base_name))
    for s, name in zip(g.sources, item.names):
        if s.patch is not None:
            out.append(("delta", s.patch, name))  # type: ignore[arg-type]
            continue
        out.append(("source", s.ckpt, name))
        if s.origin is not None and plan.method.kind == "delta":
            out.append(("origin", s.origin, name))
    return out


def _input_wheres(plan: Plan, item: PlanItem) -> list[str]:
    """The YAML path of each input of :func:`_item_inputs` (same order), for messages."""
    g = item.group
    out: list[str] = []
    if g.base is not None and item.base_name:
        out.append(g.base.where)
    for s in g.sources:
        if s.patch is not None:
            out.append(f"{s.where}.patch")
            continue
        out.append(s.where)
        if s.origin is not None and plan.method.kind == "delta":
            out.append(f"{s.where}.origin")
    return out


def _range_bytes(plan: Plan, item: PlanItem, start: int, end: int) -> int:
    return sum((end - start) * ITEMSIZE[c.info(n).dtype] for _, c, n in _item_inputs(plan, item))
