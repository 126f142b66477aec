"""Run a multi-document recipe: each stage the output needs, in dependency order, with
intermediate outputs kept in a cache folder next to the output and reused while unchanged.

For ``mmath merge FILE OUT``, the stage named ``NAME`` is written to ``OUT.stages/NAME/``
(each atomically, as every output is) and the output document to ``OUT``. A stage is reused,
not recomputed, when its key is the one recorded in its folder's ``mmath_stage.json``. The key
hashes what the stage's output depends on: its recipe (without ``name``, ``evaluate`` and
``push``), the content fingerprint of every external input (:mod:`mergekit_math.io.fingerprint`),
the keys of the stages it reads, the ``--seed`` override and the mmath version. The marker is
written inside the stage's folder after the folder is complete, so an interrupted run leaves
either nothing, or a folder without a marker (rebuilt by the next run), never a stage that
would be reused half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_math import __version__
from mergekit_math.errors import UserError
from mergekit_math.io.fingerprint import model_fingerprint
from mergekit_math.io.resolve import find_local, resolve_model
from mergekit_math.recipe import Recipe
from mergekit_math.stages.documents import Stage, StagedRecipe

if TYPE_CHECKING:
    from mergekit_math.merge import Plan

STAGES_SUFFIX = ".stages"
MARKER = "mmath_stage.json"
_STEP = re.compile(r"^(\w+)(?:\[(\d+)\])?$")


def stages_dir(out_dir: Path) -> Path:
    """The cache folder of the intermediate stages of the output ``out_dir``."""
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f"{out_dir.name}{STAGES_SUFFIX}"


@dataclass
class StageRun:
    """One stage as this run sees it: where it goes, its key, whether it is reused."""

    stage: Stage
    index: int  # 1-based position in the run
    total: int
    out: Path
    key: str
    reuse: bool
    final: bool
    recipe: Recipe  # references to other documents replaced by their output folders
    plan: Plan | None = None  # None until the stages it reads exist

    @property
    def head(self) -> str:
        return f"stage {self.index}/{self.total} {self.stage.title}"


@dataclass
class StageOptions:
    """What `mmath merge` passes to every stage's plan and execution."""

    seed: int | None = None
    allow_pickle: bool = False
    device: str = "cpu"
    max_shard_size: int = 5 * 10**9
    max_memory: int | None = None
    strict_finite: bool = False
    progress: bool = True
    force: bool = False
    lenient: bool = False  # unknown parameters are warnings (--lenient)


def _set_path(data: dict[str, Any], path: str, value: str) -> None:
    """Set ``models[1].origin``-style ``path`` of a dumped recipe to ``value``."""
    node: Any = data
    steps = path.split(".")
    for i, step in enumerate(steps):
        m = _STEP.match(step)
        assert m is not None, path
        key, index = m.group(1), m.group(2)
        if i == len(steps) - 1 and index is None:
            node[key] = value
            return
        node = node[key]
        if index is not None:
            if i == len(steps) - 1:
                node[int(index)] = value
                return
            node = node[int(index)]


def substituted(stage: Stage, outputs: dict[str, Path]) -> Recipe:
    """``stage``'s recipe with every reference to another document replaced by the absolute
    path of that document's output folder."""
    data = stage.recipe.model_dump(mode="json", exclude_unset=True)
    for where, ref in stage.recipe.model_refs():
        if ref in stage.deps:
            _set_path(data, where, str(outputs[ref]))
    return Recipe.model_validate(data)


def _folder_digest(folder: Path) -> str:
    """A content hash of every file of a patch folder (patches are not model folders)."""
    h = hashlib.blake2b(digest_size=20)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + b"\x00")
            h.update(hashlib.blake2b(p.read_bytes(), digest_size=20).digest())
    return "blake2b:" + h.hexdigest()


def stage_key(stage: Stage, keys: dict[str, str], recipe_dir: Path, seed: int | None) -> str:
    """The hash of everything ``stage``'s output depends on (see the module docstring)."""
    data = stage.recipe.model_dump(mode="json", exclude_unset=True)
    for key in ("name", "evaluate", "push"):
        data.pop(key, None)
    for where, ref in stage.recipe.model_refs():
        if ref in stage.deps:
            identity = f"stage:{keys[ref]}"
        else:
            identity = model_fingerprint(resolve_model(ref, where, recipe_dir))
        _set_path(data, where, identity)
    for i, m in enumerate(stage.recipe.models or []):
        if m.patch is not None:
            folder = find_local(m.patch, f"models[{i}].patch", recipe_dir)
            identity = _folder_digest(folder) if folder is not None else m.patch
            _set_path(data, f"models[{i}].patch", identity)
    payload = {"mmath": __version__, "recipe": data, "seed": seed}
    text = json.dumps(payload, sort_keys=True)
    return "blake2b:" + hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def _recorded_key(folder: Path) -> str | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    key = data.get("key") if isinstance(data, dict) else None
    return key if isinstance(key, str) and (folder / "config.json").is_file() else None


def _write_marker(run: StageRun) -> None:
    tmp = run.out / f".{MARKER}.{os.getpid()}.tmp"
    info = {"key": run.key, "name": run.stage.name, "document": run.stage.number}
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, run.out / MARKER)


def _static_checks(recipe: Recipe, where: str) -> None:
    """The checks of a stage that need no checkpoint: method, parameter names, template (their
    warnings come with the stage's plan)."""
    from mergekit_math.io.model_files import chat_template_text
    from mergekit_math.merge.params import check_param_names
    from mergekit_math.methods import get_method

    try:
        method = get_method(recipe.merge_method)
        found: list[str] = []
        check_param_names(recipe, method, found)
        chat_template_text(recipe.chat_template)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def plan_stages(
    staged: StagedRecipe,
    out_dir: Path,
    target: str | None = None,
    *,
    seed: int | None = None,
    allow_pickle: bool = False,
    warnings: list[str] | None = None,
    lenient: bool = False,
) -> list[StageRun]:
    """The stages the output needs, in the order they run, every check that needs no stage
    output done: each stage's recipe, its key, whether it is reused, and its plan when the
    stages it reads already exist (a reused stage's plan is never built: it is not merged)."""
    warnings = warnings if warnings is not None else []
    out_dir = Path(out_dir).absolute()
    cache = stages_dir(out_dir)
    recipe_dir = staged.path.resolve().parent
    final = staged.target(target)
    order = staged.order(final)
    outputs = {s.name: cache / s.name for s in order if s.name and s is not final}
    if final.name:
        outputs[final.name] = out_dir
    keys: dict[str, str] = {}
    runs: list[StageRun] = []
    for stage in order:  # every document's own checks before any input is fingerprinted
        _static_checks(substituted(stage, outputs), staged.where(stage))
    for i, stage in enumerate(order, 1):
        is_final = stage is final
        key = stage_key(stage, keys, recipe_dir, seed)
        if stage.name:
            keys[stage.name] = key
        out = out_dir if is_final else outputs[stage.name]  # type: ignore[index]
        reuse = not is_final and _recorded_key(out) == key
        run = StageRun(stage, i, len(order), out, key, reuse, is_final, substituted(stage, outputs))
        runs.append(run)
    for run in runs:
        where = staged.where(run.stage)
        if not run.final and (run.stage.recipe.evaluate or run.stage.recipe.push):
            warnings.append(f"{where}: evaluate:/push: apply to the output document only; ignored")
        ready = all(r.reuse for r in runs if r.stage.name in run.stage.deps)
        if not run.reuse and ready:
            run.plan = _plan(run, where, recipe_dir, seed, allow_pickle, lenient)
            warnings.extend(f"{where}: {w}" for w in run.plan.warnings)
    return runs


def _plan(
    run: StageRun,
    where: str,
    recipe_dir: Path,
    seed: int | None,
    pickle: bool,
    lenient: bool = False,
) -> Plan:
    from mergekit_math.merge import build_plan

    try:
        return build_plan(
            run.recipe, recipe_dir=recipe_dir, seed=seed, allow_pickle=pickle, lenient=lenient
        )
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def run_stages(
    staged: StagedRecipe,
    runs: list[StageRun],
    options: StageOptions,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
) -> Plan:
    """Build every stage of ``runs`` that is not reused (the last one into the output);
    returns the output's plan."""
    from mergekit_math.io.writer import human_bytes
    from mergekit_math.merge import execute

    recipe_dir = staged.path.resolve().parent
    for run in runs:
        where = staged.where(run.stage)
        if run.reuse:
            echo(f"{run.head}: reused {run.out} (unchanged)")
            continue
        if run.plan is None:
            run.plan = _plan(
                run, where, recipe_dir, options.seed, options.allow_pickle, options.lenient
            )
            for w in run.plan.warnings:
                warn(f"{where}: {w}")
        echo(f"{run.head}: merging with {run.plan.method.name} into {run.out}")
        execute(
            run.plan,
            run.out,
            device=options.device,
            max_shard_size=options.max_shard_size,
            force=options.force or not run.final,  # a stage's folder is a cache entry
            progress=options.progress,
            max_memory=options.max_memory,
            strict_finite=options.strict_finite,
        )
        if not run.final:
            _write_marker(run)
            echo(
                f"{run.head}: merged {len(run.plan.items)} tensors "
                f"({human_bytes(run.plan.write_bytes)})"
            )
    assert runs[-1].plan is not None
    return runs[-1].plan
