"""``--lenient``: unknown keys of an imported recipe become warnings (the recipe is checked
again without them), instead of errors. Imports nothing of its siblings."""

from __future__ import annotations

from typing import Any

LENIENT_HINT = "pass --lenient to turn this into a warning for an imported recipe"


def _container(data: Any, loc: tuple[Any, ...]) -> dict[str, Any] | None:
    """The mapping at ``loc`` in ``data``, skipping pydantic's union-branch tags (parts that
    are not keys of the data); None when the path does not lead to a mapping."""
    node = data
    for part in loc:
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(part, str):
            continue  # e.g. 'function-after[...]' or a union member's name
        else:
            return None
    return node if isinstance(node, dict) else None


def drop_extra_keys(data: Any, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Remove from ``data`` (in place) every key that pydantic reported as extra; returns the
    errors of the keys removed (each once)."""
    dropped = []
    for err in errors:
        if err["type"] != "extra_forbidden" or not err["loc"]:
            continue
        parent = _container(data, tuple(err["loc"][:-1]))
        key = err["loc"][-1]
        if parent is not None and key in parent:
            del parent[key]
            dropped.append(err)
    return dropped
