"""Parameter resolution: a recipe setting's value for one tensor and input, checked against
the method's parameter models, and the seed of each input's generator."""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, ValidationError

from mergekit_math.errors import UserError
from mergekit_math.merge.types import PlanItem
from mergekit_math.methods import MergeMethod, param_keys
from mergekit_math.recipe import Parameters, Recipe, check_value, evaluate_setting


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


def _seed_for(seed: int, source_index: int, tensor: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{source_index}\x00{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _resolve_item_params(recipe: Recipe, method: MergeMethod, item: PlanItem) -> None:
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
