"""Multi-document recipes (mergekit-multi's format): read the documents, check their names and
references, order them.

A recipe file may hold several YAML documents separated by ``---``. Each is a recipe; a
``name:`` key lets later documents use its output as a model reference (``base_model``,
``models[].model``, ``origin``, ``slices[].sources[].model``, ``tokenizer_source``). At most
one document is unnamed; the output is the unnamed one if there is one, else the last.

Every check here runs before any tensor is read (and needs no checkpoint): the documents'
schemas, duplicate names, a bare reference that is neither a name nor an existing folder,
cycles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergekit_math.errors import UserError
from mergekit_math.io.resolve import find_local
from mergekit_math.recipe import Recipe, parse_recipe, read_recipe_text, suggest

# A stage's output is a folder named after it: keep names to plain folder names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass
class Stage:
    """One document of a multi-document recipe."""

    number: int  # 1-based position in the file
    name: str | None
    recipe: Recipe
    deps: dict[str, list[str]] = field(default_factory=dict)  # stage name -> YAML paths

    @property
    def label(self) -> str:
        """``document 2 (name: foo)``, as messages name it."""
        named = f" (name: {self.name})" if self.name else ""
        return f"document {self.number}{named}"

    @property
    def title(self) -> str:
        """The stage's name, or ``document N`` for the unnamed one."""
        return self.name or f"document {self.number}"


@dataclass
class StagedRecipe:
    """The documents of one file, in file order, with their references checked."""

    path: Path
    stages: list[Stage]

    def where(self, stage: Stage) -> str:
        return f"{self.path}: {stage.label}"

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages if s.name]

    def get(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise UserError(
            f"--stage: {self.path} has no document named {name!r} "
            f"(names: {', '.join(self.names) or 'none'}){suggest(name, self.names)}"
        )

    def target(self, name: str | None = None) -> Stage:
        """The stage written to the output: ``name``, else the unnamed one, else the last."""
        if name is not None:
            return self.get(name)
        unnamed = [s for s in self.stages if s.name is None]
        return unnamed[0] if unnamed else self.stages[-1]

    def order(self, target: Stage) -> list[Stage]:
        """``target`` and the stages it needs, each after the stages it reads (file order
        among independent ones)."""
        needed: set[str | None] = set()

        def visit(stage: Stage) -> None:
            if stage.name in needed:
                return
            needed.add(stage.name)
            for dep in stage.deps:
                visit(self.get(dep))

        visit(target)
        done: set[str | None] = set()
        out: list[Stage] = []

        def place(stage: Stage) -> None:
            if stage.name in done:
                return
            for dep in stage.deps:
                place(self.get(dep))
            done.add(stage.name)
            out.append(stage)

        for stage in self.stages:
            if stage.name in needed:
                place(stage)
        return out


def read_documents(path: Path) -> list[tuple[int, Any]]:
    """(1-based number, data) of every non-empty YAML document of ``path``."""
    text = read_recipe_text(path)
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return [(i + 1, d) for i, d in enumerate(docs) if d is not None]


def _parse_stage(path: Path, number: int, data: Any, warnings: list[str] | None) -> Stage:
    name = data.get("name") if isinstance(data, dict) else None
    label = f"{path}: document {number}"
    if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
        raise UserError(
            f"{label}: name: {name!r} is not a valid stage name (letters, digits, '.', '_' "
            "and '-', starting with a letter or digit; it names a folder)"
        )
    if name is not None:
        label += f" (name: {name})"
    return Stage(number, name, parse_recipe(data, source=label, warnings=warnings))


def _link(staged: StagedRecipe, stage: Stage, recipe_dir: Path) -> None:
    """Record which of ``stage``'s references name other documents; refuse a bare word that is
    neither a name nor an existing folder (a mistyped name). References with a ``/`` are paths
    or Hub ids, checked when the stage is planned."""
    names = staged.names
    for where, ref in stage.recipe.model_refs():
        if ref in names:
            stage.deps.setdefault(ref, []).append(where)
        elif (
            "/" not in ref
            and find_local(ref, f"{staged.where(stage)}: {where}", recipe_dir) is None
        ):
            raise UserError(
                f"{staged.where(stage)}: {where}: {ref!r} is neither the name of a document "
                f"of this file ({', '.join(names)}) nor an existing folder{suggest(ref, names)}"
            )


def _check_cycles(staged: StagedRecipe) -> None:
    state: dict[str, str] = {}  # name -> "active" | "done"

    def visit(stage: Stage, chain: list[str]) -> None:
        assert stage.name is not None
        state[stage.name] = "active"
        for dep, wheres in stage.deps.items():
            if state.get(dep) == "active":
                cycle = " -> ".join([*chain[chain.index(dep) :], dep])
                raise UserError(
                    f"{staged.where(stage)}: {wheres[0]}: {dep!r} depends on this document's "
                    f"output (cycle: {cycle})"
                )
            if dep not in state:
                visit(staged.get(dep), [*chain, dep])
        state[stage.name] = "done"

    for stage in staged.stages:
        if stage.name is not None and stage.name not in state:
            visit(stage, [stage.name])


def load_staged(path: str | Path, warnings: list[str] | None = None) -> StagedRecipe:
    """Every document of ``path``, checked (schemas, names, references, cycles);
    ``warnings``: unknown keys become these instead of errors (--lenient)."""
    path = Path(path)
    docs = read_documents(path)
    if not docs:
        raise UserError(f"{path}: a recipe is a YAML mapping, got an empty file")
    stages = [_parse_stage(path, n, d, warnings) for n, d in docs]
    seen: dict[str, Stage] = {}
    unnamed: list[Stage] = []
    for s in stages:
        if s.name is None:
            unnamed.append(s)
            if len(unnamed) > 1:
                raise UserError(
                    f"{path}: {s.label}: name: required key is missing ({unnamed[0].label} is "
                    "already the unnamed output; only one document may be unnamed)"
                )
        elif s.name in seen:
            raise UserError(
                f"{path}: {s.label}: name: {s.name!r} is already the name of {seen[s.name].label}"
            )
        else:
            seen[s.name] = s
    staged = StagedRecipe(path, stages)
    recipe_dir = path.resolve().parent
    for s in stages:
        _link(staged, s, recipe_dir)
    _check_cycles(staged)
    return staged
