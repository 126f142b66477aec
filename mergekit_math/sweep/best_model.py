"""The weights of a recorded point, for ``--push-best`` of `mmath sweep` and `mmath search`.

A point's weights are its kept folder (``points/ID/model``, ``--keep``) when there is one;
otherwise its resolved recipe is merged again (merges are deterministic) into ``DIR/best``,
as `mmath merge` would from ``best_recipe.yaml``, and the result must have the fingerprint
its row recorded. torch and the engine are imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergekit_math.errors import UserError
from mergekit_math.sweep.point import MODEL
from mergekit_math.sweep.results import POINTS, valid_row

BEST = "best"
"""Where --push-best merges the best point again when its weights were not kept."""


def point_model(folder: Path, row: dict[str, Any], *, progress: bool = False) -> Path:
    """The folder holding the weights of ``row`` (a recorded point of the sweep or search
    folder ``folder``): its kept weights, else a fresh merge into ``folder/best``."""
    if not valid_row(row):
        raise UserError(f"{folder}: not a recorded point: {row.get('id')!r}")
    kept = folder / POINTS / row["id"] / MODEL
    if kept.is_dir() and not kept.is_symlink():
        return kept
    return merge_again(folder, row, progress=progress)


def merge_again(folder: Path, row: dict[str, Any], *, progress: bool = False) -> Path:
    """Merge ``row``'s resolved recipe into ``folder/best`` (atomically, replacing an earlier
    one) and check the result's fingerprint against the row's."""
    from mergekit_math.io.fingerprint import model_fingerprint
    from mergekit_math.merge import build_plan, execute
    from mergekit_math.recipe import parse_recipe

    out = folder / BEST
    plan = build_plan(parse_recipe(row["recipe"], source="best_recipe.yaml"), recipe_dir=folder)
    execute(plan, out, force=True, progress=progress)
    if model_fingerprint(out) != row.get("fingerprint"):
        raise UserError(
            f"{out}: merging the best recipe again gave other weights than point {row['id']} "
            "(did an input model change?); nothing was pushed"
        )
    return out
