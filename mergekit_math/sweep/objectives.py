"""What a search varies, what it optimises and which trade-off it picks: ``--space``
ranges, ``--objective`` specs read off results rows, the Pareto front and the ``--pick`` rules.

Plain data and pure functions: nothing here imports Optuna, torch or lm-eval.

- ``--space KEY=LOW:HIGH[:log]`` (real values), ``KEY=int:LOW:HIGH[:log]`` (whole numbers;
  also what ``LOW:HIGH`` means for a whole-number key such as ``seed``) or ``KEY=a,b,c``
  (choices). KEY is a recipe path as ``mmath sweep --set`` takes it.
- ``--objective TASK:METRIC[,FILTER]:max|min`` (an lm-eval metric as results rows record it)
  or ``tokens:min`` (mean tokens generated per sample, over the evaluated generation tasks).
- ``--pick knee|max-accuracy|min-tokens-within:D`` chooses one point of the front.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mergekit_math.errors import UserError
from mergekit_math.recipe import Recipe
from mergekit_math.sweep.grid import Axis, Value, check_axes, key_path, parse_values
from mergekit_math.sweep.report import parse_metric, resolve_metric

TOKENS = "tokens"
SPACE_FORMS = "LOW:HIGH, LOW:HIGH:log, int:LOW:HIGH[:log] or a comma list of choices"
OBJECTIVE_FORMS = "TASK:METRIC[,FILTER]:max|min or tokens:min"
PICK_FORMS = "knee, max-accuracy or min-tokens-within:D"


# ----------------------------------------------------------------------------- --space


class Dim(BaseModel):
    """One ``--space``: a recipe key and the values a trial may give it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(description="Path into the recipe, e.g. models[1].parameters.weight.")
    low: float | None = Field(None, description="Lowest value (ranges).")
    high: float | None = Field(None, description="Highest value, included (ranges).")
    log: bool = Field(False, description="Sample the range uniformly in log space.")
    integer: bool = Field(False, description="Whole numbers only.")
    choices: list[Value] | None = Field(None, description="The values to choose from.")
    real_key: bool = Field(False, description="An int: range over a real-valued key.")

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.key} in {{{', '.join(str(c) for c in self.choices)}}}"
        kind = "int " if self.integer else ""
        return f"{self.key} in {kind}[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


def parse_space(text: str) -> Dim:
    """``KEY=LOW:HIGH[:log]``, ``KEY=int:LOW:HIGH[:log]`` or ``KEY=a,b,c`` -> a Dim with the
    values as written; :func:`check_space` checks them against the recipe."""
    key, sep, spec = text.partition("=")
    key = "".join(key.split())
    spec = spec.strip()
    if not sep or not key or not spec:
        raise UserError(f"--space: expected KEY={SPACE_FORMS.split(',')[0]}, got {text!r}")
    key_path(key, "--space")
    where = f"--space {key}"
    parts = [p.strip() for p in spec.split(":")]
    integer = parts[0] == "int"
    if integer:
        parts = parts[1:]
    log = len(parts) == 3 and parts[2] == "log"
    if log:
        parts = parts[:2]
    if len(parts) == 1 and not integer and not log:
        choices = parse_values(spec, key)
        if len(choices) < 2:
            raise UserError(f"{where}: give a range LOW:HIGH or at least two choices")
        return Dim(key=key, choices=choices)
    if len(parts) != 2:
        raise UserError(f"{where}: expected {SPACE_FORMS}, got {spec!r}")
    low, high = (_number(p, where) for p in parts)
    if integer and (low != int(low) or high != int(high)):
        raise UserError(f"{where}: int: LOW and HIGH must be whole numbers")
    if not low < high:
        raise UserError(f"{where}: LOW must be below HIGH (got {low:g}:{high:g})")
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs LOW > 0 (got {low:g})")
    return Dim(key=key, low=low, high=high, log=log, integer=integer)


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a number ({SPACE_FORMS})") from None
    if not math.isfinite(value):
        raise UserError(f"{where}: {text!r} is not a finite number")
    return value


def check_space(dims: list[Dim], recipe: Recipe, source: str) -> list[Dim]:
    """Refuse keys the recipe cannot take and ends (or choices) out of the parameter's range,
    as ``mmath sweep --set`` does; a range over a whole-number key becomes an ``int:`` range,
    and choices take the parameter's type."""
    if not dims:
        raise UserError("--space: give at least one KEY=LOW:HIGH to search")
    axes = [
        Axis(key=d.key, values=d.choices if d.choices is not None else [d.low, d.high])
        for d in dims
    ]
    checked = check_axes(axes, recipe, source, flag="--space")
    out = []
    for dim, axis in zip(dims, checked):
        if dim.choices is not None:
            out.append(dim.model_copy(update={"choices": axis.values}))
            continue
        whole = all(isinstance(v, int) and not isinstance(v, bool) for v in axis.values)
        if not whole and not all(isinstance(v, float) for v in axis.values):
            raise UserError(
                f"--space {dim.key}: takes {type(axis.values[0]).__name__} values; "
                "give them as a comma list of choices"
            )
        update = {"integer": dim.integer or whole, "real_key": dim.integer and not whole}
        out.append(dim.model_copy(update=update))
    return out


def typed_value(dim: Dim, value: Any) -> Value:
    """A trial's value as the recipe takes it: an ``int:`` range over a real-valued key
    gives floats (so ``2`` and ``2.0`` are one point)."""
    return float(value) if dim.real_key else value


# ----------------------------------------------------------------------------- --objective


class Objective(BaseModel):
    """One ``--objective``: what is read off each results row, and which way is better."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: str = Field(description="TASK:METRIC[,FILTER], or 'tokens'.")
    direction: Literal["maximize", "minimize"]

    @property
    def is_tokens(self) -> bool:
        return self.spec == TOKENS

    @property
    def text(self) -> str:
        return f"{self.spec}:{'max' if self.direction == 'maximize' else 'min'}"


def parse_objective(text: str) -> Objective:
    """``TASK:METRIC[,FILTER]:max|min`` or ``tokens:min`` -> an Objective."""
    spec, colon, way = text.strip().rpartition(":")
    if not colon or way not in ("max", "min") or not spec:
        raise UserError(f"--objective: expected {OBJECTIVE_FORMS}, got {text!r}")
    if spec != TOKENS:
        try:
            parse_metric(spec)
        except UserError:
            raise UserError(f"--objective: expected {OBJECTIVE_FORMS}, got {text!r}") from None
    return Objective(spec=spec, direction="maximize" if way == "max" else "minimize")


def check_objectives(objectives: list[Objective]) -> list[Objective]:
    if not objectives:
        raise UserError(f"--objective: give at least one ({OBJECTIVE_FORMS})")
    seen = set()
    for o in objectives:
        if o.spec in seen:
            raise UserError(f"--objective {o.spec}: given twice")
        seen.add(o.spec)
    return objectives


def mean_tokens(row: dict[str, Any]) -> float | None:
    """Mean tokens generated per sample over every generation task of the row (each task
    weighted by its number of samples); None when the row has no generation task."""
    total = count = 0.0
    for stats in (row.get("lengths") or {}).values():
        n = stats.get("n") or 0
        if n and isinstance(stats.get("mean"), (int, float)):
            total += stats["mean"] * n
            count += n
    return total / count if count else None


def objective_value(objective: Objective, row: dict[str, Any]) -> float:
    """The objective's value in a results row; a UserError when the row cannot give it."""
    if objective.is_tokens:
        value = mean_tokens(row)
        if value is None:
            raise UserError(
                "--objective tokens: the evaluation recorded no generated tokens (no "
                "generate_until task among --tasks)"
            )
        return value
    try:
        key = resolve_metric(objective.spec, list(row.get("metrics") or {}))
    except UserError as exc:
        raise UserError(str(exc).replace("--metric", "--objective", 1)) from None
    value = row["metrics"][key]
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"--objective {objective.spec}: recorded value {value!r} is not a number")
    return float(value)


def roles(objectives: list[Objective]) -> tuple[int, int | None]:
    """Which objective is the 'accuracy' of the pick rules (the first that is not tokens)
    and which the 'cost' (tokens if given, else the other objective; None for one)."""
    quality = next((i for i, o in enumerate(objectives) if not o.is_tokens), 0)
    others = [i for i in range(len(objectives)) if i != quality]
    tokens = [i for i in others if objectives[i].is_tokens]
    cost = tokens[0] if tokens else (others[0] if others else None)
    return quality, cost


# ----------------------------------------------------------------------------- front


def dominates(a: list[float], b: list[float], maximize: list[bool]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    better = False
    for x, y, up in zip(a, b, maximize):
        if (x < y) if up else (x > y):
            return False
        if x != y:
            better = True
    return better


def pareto_front(values: list[list[float]], maximize: list[bool]) -> list[int]:
    """Indices of the non-dominated points, in the order given."""
    return [
        i
        for i, v in enumerate(values)
        if not any(dominates(w, v, maximize) for j, w in enumerate(values) if j != i)
    ]


# ----------------------------------------------------------------------------- --pick


class Pick(BaseModel):
    """``--pick``: which point of the front becomes best_recipe.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: Literal["knee", "max-accuracy", "min-tokens-within"]
    within: float | None = Field(None, ge=0, description="D of min-tokens-within:D.")

    @property
    def text(self) -> str:
        return self.rule + (f":{self.within:g}" if self.within is not None else "")


def parse_pick(text: str) -> Pick:
    rule, colon, arg = text.strip().partition(":")
    if rule in ("knee", "max-accuracy") and not colon:
        return Pick(rule=rule)  # type: ignore[arg-type]
    if rule == "min-tokens-within" and colon:
        try:
            within = float(arg)
        except ValueError:
            within = -1.0
        if not math.isfinite(within) or within < 0:
            raise UserError(f"--pick {text}: D must be a number >= 0, e.g. 0.01")
        return Pick(rule="min-tokens-within", within=within)
    raise UserError(f"--pick: expected {PICK_FORMS}, got {text!r}")


def pick_point(points: list[tuple[float, float]], pick: Pick) -> int:
    """The index of the chosen point among ``(accuracy, cost)`` pairs, accuracy higher-better
    and cost lower-better (objectives turned that way by the caller)."""
    if not points:
        raise ValueError("no points to pick from")
    if pick.rule == "max-accuracy":
        return max_accuracy(points)
    if pick.rule == "min-tokens-within":
        return min_cost_within(points, pick.within or 0.0)
    return knee(points)


def max_accuracy(points: list[tuple[float, float]]) -> int:
    """Highest accuracy; among equals, the lowest cost."""
    return min(range(len(points)), key=lambda i: (-points[i][0], points[i][1], i))


def min_cost_within(points: list[tuple[float, float]], within: float) -> int:
    """The lowest cost among the points within ``within`` of the best accuracy (absolute,
    in the metric's units); among equals, the higher accuracy."""
    best = max(q for q, _ in points)
    near = [i for i, (q, _) in enumerate(points) if q >= best - within - 1e-12]
    return min(near, key=lambda i: (points[i][1], -points[i][0], i))


def knee(points: list[tuple[float, float]]) -> int:
    """The point of the front farthest from the line between its two extremes (highest
    accuracy, lowest cost), both objectives scaled to [0, 1] over the front, on the side of
    the ideal point; the highest-accuracy point when no point bulges out (two or fewer)."""
    front = pareto_front([[q, c] for q, c in points], [True, False])
    top = max_accuracy([points[i] for i in front])
    top = front[top]
    cheap = front[min(range(len(front)), key=lambda k: (points[front[k]][1], -points[front[k]][0]))]
    qs = [points[i][0] for i in front]
    cs = [points[i][1] for i in front]

    def scaled(i: int) -> tuple[float, float]:
        q_span, c_span = max(qs) - min(qs), max(cs) - min(cs)
        q = (points[i][0] - min(qs)) / q_span if q_span else 0.0
        c = (points[i][1] - min(cs)) / c_span if c_span else 0.0
        return q, -c  # both higher-better: the ideal point is up and to the right

    (ax, ay), (bx, by) = scaled(top), scaled(cheap)
    length = math.hypot(bx - ax, by - ay)
    best, best_distance = top, 0.0
    if length == 0:
        return best
    for i in front:
        px, py = scaled(i)
        # signed distance from the line A->B; positive toward the ideal point (1, 0)
        distance = ((bx - ax) * (py - ay) - (by - ay) * (px - ax)) / length
        sign = 1.0 if ((bx - ax) * (0 - ay) - (by - ay) * (1 - ax)) >= 0 else -1.0
        distance *= sign
        if distance > best_distance + 1e-12:
            best, best_distance = i, distance
    return best
