"""``--set KEY=VALUES``: the recipe keys a sweep can set, the values they take, and the points
they form (the grid product, or a random sample of it).

KEY is a path into the recipe, as validation errors print it: ``parameters.density``,
``models[1].parameters.weight``, ``slices[0].sources[1].parameters.density``, or ``seed`` for
methods that drop at random. VALUES is ``START:STOP:STEP`` (STOP included), ``log:START:STOP:N``
(N values evenly spaced in log space) or a comma list.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mergekit_math.errors import UserError
from mergekit_math.recipe import Recipe, check_value, suggest

Value = bool | int | float | str
Point = dict[str, Value]
"""One sweep point: swept key -> value, in the order of the ``--set`` options."""

MAX_VALUES = 10_000
MAX_POINTS = 100_000
FORMS = "START:STOP:STEP, log:START:STOP:N or a comma list"

_INDEX = re.compile(r"^([A-Za-z_]\w*)\[(\d+)\]$")
_NAME = re.compile(r"^[A-Za-z_]\w*$")
_INT = re.compile(r"^[+-]?\d+$")


class Axis(BaseModel):
    """One ``--set``: a recipe key and the values it takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(description="Path into the recipe, e.g. models[1].parameters.weight.")
    values: list[Value] = Field(description="Values in the order they were given.")


# ----------------------------------------------------------------------------- parsing


def parse_set(text: str) -> Axis:
    """``KEY=VALUES`` -> an Axis with the values as written (numbers, booleans, strings);
    :func:`check_axes` checks the key against a recipe and converts the values."""
    key, sep, values = text.partition("=")
    key = re.sub(r"\s+", "", key)
    if not sep or not key or not values.strip():
        raise UserError(
            f"--set: expected KEY=VALUES (e.g. parameters.density=0.2:1:0.2), got {text!r}"
        )
    key_path(key)
    return Axis(key=key, values=parse_values(values, key))


def key_path(key: str, flag: str = "--set") -> list[str | int]:
    """``models[1].parameters.weight`` -> ``["models", 1, "parameters", "weight"]``; ``flag``
    names the option in errors (``--set``, or ``--space`` for searches)."""
    path: list[str | int] = []
    for part in key.split("."):
        m = _INDEX.match(part)
        if m:
            path += [m.group(1), int(m.group(2))]
        elif _NAME.match(part):
            path.append(part)
        else:
            raise UserError(
                f"{flag} {key}: not a recipe key; write it as validation errors name it, "
                "e.g. models[1].parameters.weight or parameters.density"
            )
    return path


def parse_values(text: str, key: str) -> list[Value]:
    """The values of ``START:STOP:STEP``, ``log:START:STOP:N`` or ``a,b,c``."""
    where = f"--set {key}"
    text = text.strip()
    if text.startswith("log:"):
        values: list[Value] = list(_log_values(text[4:].split(":"), where))
    else:
        parts = text.split(":")
        if len(parts) > 1 and all(_number(p) is not None for p in parts):
            if len(parts) != 3:
                raise UserError(f"{where}: expected START:STOP:STEP, got {text!r}")
            values = list(_range_values(parts, where))
        else:
            values = []
            for item in text.split(","):
                item = item.strip()
                if not item:
                    raise UserError(f"{where}: empty value in {text!r}")
                values.append(_scalar(item, where))
    if len(values) > MAX_VALUES:
        raise UserError(f"{where}: {len(values)} values; at most {MAX_VALUES}")
    _no_repeats(values, where)
    return values


def _number(text: str) -> int | float | None:
    text = text.strip()
    if _INT.match(text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _scalar(text: str, where: str) -> Value:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    number = _number(text)
    if number is None and _non_finite(text):
        raise UserError(f"{where}: {text!r} is not a finite number")
    return text if number is None else number


def _non_finite(text: str) -> bool:
    """``nan``, ``inf``, ``-infinity``, ``1e400``: numbers that are not finite."""
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def _range_values(parts: list[str], where: str) -> list[int | float]:
    a, b, step = (_number(p) for p in parts)
    assert a is not None and b is not None and step is not None
    if step == 0:
        raise UserError(f"{where}: STEP must not be 0")
    if (b - a) * step < 0:
        raise UserError(f"{where}: STEP {step:g} never goes from {a:g} to {b:g}")
    count = int(math.floor((b - a) / step + 1e-9)) + 1
    if count > MAX_VALUES:
        raise UserError(f"{where}: {count} values; at most {MAX_VALUES}")
    if all(isinstance(x, int) for x in (a, b, step)):
        return [a + i * step for i in range(count)]  # type: ignore[operator]
    # a + i·step rounded to 12 significant digits: 0.1:0.5:0.2 gives 0.3, not 0.30000000000000004.
    return [float(f"{a + i * step:.12g}") for i in range(count)]


def _log_values(parts: list[str], where: str) -> list[float]:
    if len(parts) != 3:
        raise UserError(f"{where}: expected log:START:STOP:N, got log:{':'.join(parts)}")
    a, b, n = (_number(p) for p in parts)
    if a is None or b is None or a <= 0 or b <= 0:
        raise UserError(f"{where}: log: START and STOP must be positive finite numbers")
    if not isinstance(n, int) or n < 1:
        raise UserError(f"{where}: log: N must be a whole number of values, at least 1")
    if n > MAX_VALUES:
        raise UserError(f"{where}: {n} values; at most {MAX_VALUES}")
    if n == 1:
        return [float(a)]
    ratio = math.log(b / a)
    return [float(f"{a * math.exp(ratio * i / (n - 1)):.10g}") for i in range(n)]


def _no_repeats(values: list[Any], where: str) -> None:
    seen: set[tuple[type, Any]] = set()
    for v in values:
        tag = (float, float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        if tag in seen:
            raise UserError(f"{where}: value {v!r} is listed twice")
        seen.add(tag)


# ----------------------------------------------------------------------------- recipe keys


def settable_keys(recipe: Recipe) -> dict[str, tuple[type[BaseModel], str]]:
    """Every key a sweep can set in ``recipe``: its parameter model and field name.

    Recipe-level ``parameters`` take the method's recipe-wide parameters and defaults of its
    per-model ones; each model (or slice source) takes the per-model ones; ``seed`` is listed
    for methods that drop at random. Parameters the method ignores are left out.
    """
    from mergekit_math.methods import get_method, param_keys

    method = get_method(recipe.merge_method)
    shared = param_keys(method.shared_params)
    per_model = param_keys(method.model_params)
    out: dict[str, tuple[type[BaseModel], str]] = {}

    def add(prefix: str, keys: dict[str, str], model: type[BaseModel]) -> None:
        for k in sorted(keys):
            if k not in method.ignored and f"{prefix}parameters.{k}" not in out:
                out[f"{prefix}parameters.{k}"] = (model, keys[k])

    def top(prefix: str) -> None:
        add(prefix, shared, method.shared_params)
        add(prefix, per_model, method.model_params)

    top("")
    for i, _ in enumerate(recipe.models or []):
        add(f"models[{i}].", per_model, method.model_params)
    for i, s in enumerate(recipe.slices or []):
        top(f"slices[{i}].")
        for j, _ in enumerate(s.sources):
            add(f"slices[{i}].sources[{j}].", per_model, method.model_params)
    if method.random:
        out["seed"] = (Recipe, "seed")
    return out


def check_axes(axes: list[Axis], recipe: Recipe, source: str, flag: str = "--set") -> list[Axis]:
    """Refuse keys the recipe cannot take (listing those it can), repeated keys and values
    out of range; returns the axes with values converted to the parameter's type (so ``1``
    and ``1.0`` are the same point). ``flag`` names the option in errors (a search checks the
    ends of its ``--space`` ranges here)."""
    if not axes:
        raise UserError(f"{flag}: give at least one KEY=VALUES to sweep")
    keys = settable_keys(recipe)
    out: list[Axis] = []
    seen: set[str] = set()
    for axis in axes:
        where = f"{flag} {axis.key}"
        if axis.key in seen:
            raise UserError(f"{where}: given twice; list all its values in one {flag}")
        seen.add(axis.key)
        if axis.key not in keys:
            raise UserError(
                f"{where}: not a key of {source} that a sweep can set"
                f"{suggest(axis.key, list(keys))}; its settable keys ({recipe.merge_method}): "
                + ", ".join(keys)
            )
        _check_not_shadowed(axis.key, recipe, flag)
        model, field = keys[axis.key]
        values = [check_value(model, field, v, where) for v in axis.values]
        _no_repeats(values, where)
        out.append(Axis(key=axis.key, values=values))
    total = math.prod(len(a.values) for a in out)
    if flag == "--set" and total > MAX_POINTS:
        raise UserError(
            f"--set: the grid has {total} points; at most {MAX_POINTS} (use --random N)"
        )
    return out


def _check_not_shadowed(key: str, recipe: Recipe, flag: str = "--set") -> None:
    """A recipe-level default that every input overrides would make every point the same."""
    path = key_path(key, flag)
    name = path[-1]
    if path[:-1] == ["parameters"] and recipe.models:
        entries = [m.parameters for m in recipe.models]
        inner = "models[i]"
    elif len(path) == 4 and path[0] == "slices" and path[2] == "parameters" and recipe.slices:
        entries = [src.parameters for src in recipe.slices[path[1]].sources]  # type: ignore[index]
        inner = f"slices[{path[1]}].sources[j]"
    else:
        return
    if entries and all(p is not None and name in p for p in entries):
        raise UserError(
            f"{flag} {key}: every input sets its own {name!r}, so this default is never used; "
            f"sweep {inner}.parameters.{name} instead"
        )


def apply_point(data: dict[str, Any], point: Point) -> dict[str, Any]:
    """A copy of the recipe mapping ``data`` with each key of ``point`` set (``parameters``
    mappings are created where missing)."""
    import copy

    out = copy.deepcopy(data)
    for key, value in point.items():
        node: Any = out
        path = key_path(key)
        for i, part in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(part, int):
                node = node[part]
            else:
                if node.get(part) is None:
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
        node[path[-1]] = value
    return out


# ----------------------------------------------------------------------------- points


def grid_size(axes: list[Axis]) -> int:
    return math.prod(len(a.values) for a in axes)


def grid_points(axes: list[Axis]) -> list[Point]:
    """Every combination, the last ``--set`` varying fastest."""
    keys = [a.key for a in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(a.values for a in axes))]


def random_points(axes: list[Axis], n: int, seed: int) -> list[Point]:
    """``n`` distinct grid points drawn at random (the same for the same seed); the whole grid
    when it has at most ``n`` points."""
    if n < 1:
        raise UserError("--random: N must be at least 1")
    total = grid_size(axes)
    if n >= total:
        return grid_points(axes)
    out: list[Point] = []
    for index in random.Random(seed).sample(range(total), n):
        point: Point = {}
        for axis in reversed(axes):
            index, digit = divmod(index, len(axis.values))
            point[axis.key] = axis.values[digit]
        out.append({a.key: point[a.key] for a in axes})
    return out


def describe(point: Point) -> str:
    """``weight=0.5 density=0.3``: the last part of each key, with its value."""
    short = short_names(list(point))
    return " ".join(f"{short[k]}={format_value(v)}" for k, v in point.items())


def short_names(keys: list[str]) -> dict[str, str]:
    last = {k: k.rsplit(".", 1)[-1] for k in keys}
    counts: dict[str, int] = {}
    for name in last.values():
        counts[name] = counts.get(name, 0) + 1
    return {k: (last[k] if counts[last[k]] == 1 else k) for k in keys}


def format_value(v: Value) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
