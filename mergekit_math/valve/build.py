"""θ(α) = θ_long + α·Δ through the merge engine (task arithmetic over a patch entry)."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from mergekit_math.errors import UserError


def parse_alphas(text: str) -> list[float]:
    """``0,0.25,0.5`` → floats, in the given order, duplicates removed; any real number."""
    out: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--alphas: {part!r} is not a number") from None
        if not math.isfinite(value):
            raise UserError(f"--alphas: {part!r} is not finite")
        if value not in out:
            out.append(value)
    if not out:
        raise UserError("--alphas: give at least one value, e.g. 0,0.5,1")
    return out


def alpha_name(alpha: float) -> str:
    """A folder name for α: ``alpha_0.5``, ``alpha_-0.25``."""
    return f"alpha_{alpha:g}"


def alpha_recipe(model: Path, direction: Path, alpha: float) -> dict:
    """The recipe of θ(α): task arithmetic on the long model with the direction's delta
    weighted by α (``recipes/cot_valve.yaml`` is the same with a short model as origin)."""
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(Path(model).resolve()),
        "models": [{"patch": str(Path(direction).resolve()), "parameters": {"weight": alpha}}],
    }


def check_direction(model: Path, direction: Path) -> list[str]:
    """Open the direction (a patch folder) and say when it was made from another model."""
    from mergekit_math.io.reader import Checkpoint
    from mergekit_math.patch import Patch

    patch = Patch.open(direction)
    try:
        ckpt = Checkpoint(model)
    except UserError as exc:
        raise UserError(f"--model: {exc}") from None
    try:
        same = patch.check_against(ckpt, "--model")
    finally:
        ckpt.close()
        patch.close()
    if same:
        return []
    return [
        f"the direction was extracted against {patch.manifest.source.base}, not {model}: "
        "applying it ports it to this model (PortLLM-style)"
    ]


def build_alpha(
    model: Path,
    direction: Path,
    alpha: float,
    out_dir: Path,
    *,
    device: str = "cpu",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write θ(α) into ``out_dir`` (atomically) and return its absolute path."""
    from mergekit_math.merge import build_plan, execute
    from mergekit_math.recipe import parse_recipe

    recipe = parse_recipe(alpha_recipe(model, direction, alpha), source="valve")
    plan = build_plan(recipe, recipe_dir=None)
    return execute(plan, out_dir, device=device, force=force, progress=progress)


def built_for(folder: Path, model: Path, direction: Path, alpha: float) -> bool:
    """Whether ``folder`` already holds θ(α) for this model and direction (its resolved recipe
    says so), so a sweep can reuse it."""
    path = folder / "mmath_recipe.yaml"
    if not path.is_file():
        return False
    try:
        data = yaml.safe_load(path.read_text())
        entry = data["models"][0]
        return (
            data["merge_method"] == "task_arithmetic"
            and Path(data["base_model"]) == Path(model).resolve()
            and Path(entry["patch"]) == Path(direction).resolve()
            and float(entry["parameters"]["weight"]) == alpha
        )
    except (KeyError, IndexError, TypeError, ValueError, yaml.YAMLError):
        return False
