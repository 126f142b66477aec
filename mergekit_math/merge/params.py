"""Parameters, from the YAML key to the kernel: the one owner of that path.

:func:`check_param_names` checks every key a recipe sets against the method's parameter
models (unknown names, recipe-level keys set per model, no-effect keys) and every value it
can take, before anything is read; :func:`resolve_item_params` gives each output tensor its
typed parameters (the first setting found from the input up to the recipe level, evaluated
for the tensor's name and layer position)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from mergekit_math.errors import UserError
from mergekit_math.merge.compat import LENIENT_HINT, no_effect, no_effect_warning
from mergekit_math.merge.types import PlanItem
from mergekit_math.methods import MergeMethod, param_keys
from mergekit_math.recipe import (
    OutputModule,
    Parameters,
    Recipe,
    check_value,
    evaluate_setting,
    iter_leaves,
    suggest,
)


def check_param_names(
    recipe: Recipe, method: MergeMethod, warnings: list[str], lenient: bool = False
) -> None:
    """Refuse (or, for a no-effect key or with ``lenient``, warn about) every parameter
    name the method does not take; check every value the method's keys can take."""
    shared = param_keys(method.shared_params)
    per_model = param_keys(method.model_params)
    known = sorted(set(shared) | set(per_model))

    def check(params: Parameters | None, where: str, level: str) -> None:
        for key, setting in list((params or {}).items()):
            path = f"{where}.parameters.{key}" if where else f"parameters.{key}"
            if key not in shared and key not in per_model:
                if no_effect(method.name, key):
                    warnings.append(no_effect_warning(path, key, method.name))
                    continue
                listing = ", ".join(known) if known else "none"
                message = (
                    f"{path}: unknown parameter {key!r} for {method.name}{suggest(key, known)} "
                    f"(its parameters: {listing})"
                )
                if not lenient:
                    raise UserError(f"{message}; {LENIENT_HINT}")
                warnings.append(f"{message}; ignored (--lenient)")
                del params[key]  # type: ignore[union-attr]  # the resolved recipe replays strictly
                continue
            if level == "model" and key in shared:
                raise UserError(
                    f"{path}: {key!r} applies to the whole merge; set it under the top-level "
                    "'parameters'"
                )
            if key in method.ignored:
                warnings.append(f"{path}: {key!r} has no effect for {method.name}")
            model = method.shared_params if key in shared else method.model_params
            field_name = (shared if key in shared else per_model)[key]
            for leaf in iter_leaves(setting):
                check_value(model, field_name, leaf, path)

    def inputs(holder: Recipe | OutputModule, at: str) -> None:
        for i, m in enumerate(holder.models or []):
            check(m.parameters, f"{at}models[{i}]", "model")
        for i, s in enumerate(holder.slices or []):
            check(s.parameters, f"{at}slices[{i}]", "top")
            for j, src in enumerate(s.sources):
                check(src.parameters, f"{at}slices[{i}].sources[{j}]", "model")

    check(recipe.parameters, "", "top")
    inputs(recipe, "")
    for name, module in (recipe.modules or {}).items():
        check(module.parameters, f"modules.{name}", "top")
        inputs(module, f"modules.{name}.")


def _settings_value(
    chain: list[tuple[str, Parameters | None]], key: str, tensor: str, t: float
) -> tuple[Any, str] | None:
    for where, params in chain:
        if params and key in params:
            value = evaluate_setting(params[key], tensor, t)
            if value is not None:
                return value, where
    return None


def _resolve_params(
    model: type[BaseModel],
    chain: list[tuple[str, Parameters | None]],
    tensor: str,
    t: float,
    missing_where: str,
) -> BaseModel:
    values: dict[str, Any] = {}
    for key, field_name in param_keys(model).items():
        found = _settings_value(chain, key, tensor, t)
        if found is not None:
            values[field_name] = check_value(model, field_name, found[0], f"{found[1]}.{key}")
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "?"
        key = next((k for k, f in param_keys(model).items() if f == key), key)
        prefix = f"{missing_where}.parameters" if missing_where else "parameters"
        if err["type"] == "missing":
            hint = ""
            if missing_where == "base_model":
                hint = (
                    "; as in mergekit, base_model is one more input of a method that takes no "
                    "base: set it under the top-level parameters, list base_model under models "
                    "with its parameters, or drop base_model"
                )
            raise UserError(
                f"{prefix}.{key}: missing required parameter {key!r} (no value for tensor "
                f"{tensor}){hint}"
            ) from None
        raise UserError(f"{prefix}.{key}: {err['msg']}") from None


def resolve_item_params(recipe: Recipe, method: MergeMethod, item: PlanItem) -> None:
    """Resolve the recipe-level and per-input parameters of one output tensor."""
    group, name, t = item.group, item.out.name, item.t
    group_chain = [(f"{group.where}.parameters", group.parameters)] if group.parameters else []
    top = [("parameters", recipe.parameters)]
    item.shared = _resolve_params(method.shared_params, group_chain + top, name, t, "")
    item.params = [
        _resolve_params(
            method.model_params,
            [(f"{s.where}.parameters", s.parameters)] + group_chain + top,
            input_name,
            t,
            s.where,
        )
        for s, input_name in zip(group.sources, item.names)
    ]
    if method.check is not None:
        problem = method.check(item.shared, item.params)
        if problem is not None:
            idx, key, message = problem
            where = "parameters" if idx is None else f"{group.sources[idx].where}.parameters"
            raise UserError(f"{where}.{key}: {message} (tensor {name})")
