"""Multi-module models (mergekit's ``modules:``): each module of the architecture is planned on
its own, with its own inputs or slices, parameters and layer positions.

A multimodal Gemma 3 holds a text decoder (``language_model.model.layers.N``), a vision tower
(``vision_tower.vision_model.encoder.layers.N``) and a projector. As in mergekit, a ``models:``
recipe merges every module with the same inputs, ``t`` running from 0 to 1 across each
module's own layers; ``slices:`` needs ``modules:``, where each module names its inputs or
slices and may set parameters (looked up after its inputs' and slices', before the recipe's).
The module table is data: names and weight prefixes as mergekit 0.1.5's architecture files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mergekit_math.errors import UserError
from mergekit_math.io.reader import Checkpoint, layer_of
from mergekit_math.recipe import ConditionalParameter, Parameters, Recipe, Setting


@dataclass(frozen=True)
class ModuleSpec:
    name: str
    # Weight-name prefixes: the published checkpoints' first, then transformers 5's.
    prefixes: tuple[str, ...]
    # Dotted config key of the module's layer count (None: counted from the tensor names).
    layers_key: str | None


# Architecture -> its modules, in mergekit's order (mergekit/_data/architectures/*.json).
ARCHITECTURE_MODULES: dict[str, tuple[ModuleSpec, ...]] = {
    "Gemma3ForConditionalGeneration": (
        ModuleSpec(
            "text_decoder",
            ("language_model.", "model.language_model.", "lm_head."),
            "text_config.num_hidden_layers",
        ),
        ModuleSpec(
            "multi_modal_projector",
            ("multi_modal_projector.", "model.multi_modal_projector."),
            None,
        ),
        ModuleSpec(
            "vision_tower",
            ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower."),
            "vision_config.num_hidden_layers",
        ),
    ),
}


@dataclass(frozen=True)
class Part:
    """What one pass of the planner covers: the whole model, or one module of it."""

    at: str  # YAML prefix of its inputs: "" or "modules.NAME."
    recipe: Recipe  # its models/slices, parameters chained module -> recipe
    owns: Callable[[str], bool]  # whether a tensor name belongs to it
    count: Callable[[Checkpoint], int]  # a checkpoint's layer count in it
    layers_key: str | None = None  # dotted config key of its layer count (modules only)


def _whole(recipe: Recipe) -> list[Part]:
    return [Part("", recipe, lambda name: True, lambda c: c.num_layers)]


def _config_value(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _owner(spec: ModuleSpec) -> Callable[[str], bool]:
    return lambda name: name.startswith(spec.prefixes)


def _counter(spec: ModuleSpec) -> Callable[[Checkpoint], int]:
    owns = _owner(spec)

    def count(ckpt: Checkpoint) -> int:
        value = _config_value(ckpt.config, spec.layers_key) if spec.layers_key else None
        if isinstance(value, int):
            return value
        indices = [li[1] for n in ckpt.tensors if owns(n) and (li := layer_of(n))]
        return max(indices) + 1 if indices else 0

    return count


def _filtered(setting: Setting) -> bool:
    """Whether a setting is a filtered list (it may have no value for a tensor)."""
    if isinstance(setting, list):
        return any(isinstance(e, ConditionalParameter) for e in setting)
    return isinstance(setting, ConditionalParameter)


def _conditions(setting: Setting) -> list[ConditionalParameter]:
    if not _filtered(setting):
        return [ConditionalParameter(value=setting)]  # type: ignore[arg-type]
    items = setting if isinstance(setting, list) else [setting]
    return [e for e in items if isinstance(e, ConditionalParameter)]


def chain_parameters(first: Parameters | None, then: Parameters | None) -> Parameters | None:
    """One mapping that evaluates as ``first`` and, where ``first`` has no value for a tensor
    (a filtered list without a matching filter), as ``then``: mergekit's lookup order."""
    if not first:
        return then
    out: Parameters = dict(then or {})
    for key, setting in first.items():
        if key in out and _filtered(setting):
            out[key] = [*_conditions(setting), *_conditions(out[key])]
        else:
            out[key] = setting
    return out


def plan_parts(recipe: Recipe, reference: Checkpoint | None) -> list[Part]:
    """The parts the planner goes through: the whole model, or each module of a
    multi-module architecture (all of them, in mergekit's order). ``reference``: the
    checkpoint whose architecture decides (None: a recipe of patches only)."""
    if reference is None:
        if recipe.modules:
            raise UserError("modules: name at least one model (the architecture comes from it)")
        return _whole(recipe)
    specs = ARCHITECTURE_MODULES.get(reference.architecture)
    if specs is None:
        if recipe.modules:
            known = ", ".join(sorted(ARCHITECTURE_MODULES))
            raise UserError(
                f"modules: {reference.ref} ({reference.architecture}) has a single module; "
                f"use models or slices (modules: is for {known})"
            )
        return _whole(recipe)
    names = [s.name for s in specs]
    if recipe.slices:
        raise UserError(
            f"slices: {reference.architecture} has several modules ({', '.join(names)}): "
            "give each module its slices under modules: (as mergekit)"
        )
    modules = recipe.modules or {}
    for name in modules:
        if name not in names:
            raise UserError(
                f"modules.{name}: unknown module of {reference.architecture}; "
                f"its modules: {', '.join(names)}"
            )
    missing = [n for n in names if modules and n not in modules]
    if missing:
        raise UserError(
            f"modules: {', '.join(missing)} missing: a {reference.architecture} output needs "
            f"every module ({', '.join(names)})"
        )
    parts = []
    for spec in specs:
        module = modules.get(spec.name)
        update: dict[str, Any] = {"modules": None}
        if module is not None:
            update["models"], update["slices"] = module.models, module.slices
            update["parameters"] = chain_parameters(module.parameters, recipe.parameters)
        at = f"modules.{spec.name}." if module is not None else ""
        sub = recipe.model_copy(update=update)
        parts.append(Part(at, sub, _owner(spec), _counter(spec), spec.layers_key))
    _check_covered(reference, parts)
    return parts


def _check_covered(reference: Checkpoint, parts: list[Part]) -> None:
    stray = sorted(n for n in reference.tensors if not any(p.owns(n) for p in parts))
    if stray:
        raise UserError(
            f"{reference.ref}: {len(stray)} tensor(s) in no module of "
            f"{reference.architecture}, e.g. {stray[0]}"
        )


def module_layers(
    parts: list[Part],
    planned: list[tuple[Part, list[Any]]],
    reference: Checkpoint,
    counts: list[int],
) -> dict[str, tuple[int, int, list[tuple[int, int]]]]:
    """Per module with a layer-count key: (reference's layers, output layers, the input layer
    ranges stacked), for the output config (``io.model_files.output_config``)."""
    out = {}
    for part, count in zip(parts, counts):
        if part.layers_key is None:
            continue
        old = part.count(reference)
        slices = part.recipe.slices or []
        ranges = [tuple(s.sources[0].layer_range) for s in slices] or [(0, old)]
        out[part.layers_key] = (old, count, ranges)
    return out  # type: ignore[return-value]
