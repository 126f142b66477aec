"""What `mmath methods` prints and the README's method table, both read from the registry.

Every parameter is shown with its default (``name=default``) or marked required (``name*``),
with its range when it has one. Nothing here imports torch: the method modules import it
inside their functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from mergekit_math.methods.base import MergeMethod, all_methods

REQUIRED_MARK = "*"
LEGEND = "* marks a required parameter; every other one shows its default."


@dataclass(frozen=True)
class ParamSpec:
    key: str  # as written in YAML (``lambda``)
    required: bool
    default: str | None  # rendered, None when required
    range: str | None  # "(0, 1]", None when unbounded
    no_effect: bool  # accepted for mergekit compatibility only

    def render(self, code: bool = False) -> str:
        key = f"`{self.key}`" if code else self.key
        mark = "\\" + REQUIRED_MARK if code else REQUIRED_MARK  # markdown: a literal *
        text = f"{key}{mark}" if self.required else f"{key}={self.default}"
        if self.range:
            text += f" in {self.range}"
        if self.no_effect:
            text += " (no effect)"
        return text


def _value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _range(info: Any) -> str | None:
    low = high = None
    for m in info.metadata:
        for attr, bracket in (("gt", "("), ("ge", "[")):
            if getattr(m, attr, None) is not None:
                low = f"{bracket}{_value(float(getattr(m, attr)))}"
        for attr, bracket in (("lt", ")"), ("le", "]")):
            if getattr(m, attr, None) is not None:
                high = f"{_value(float(getattr(m, attr)))}{bracket}"
    if low is None and high is None:
        return None
    return f"{low or '(-inf'}, {high or 'inf)'}"


def param_specs(method: MergeMethod[Any, Any], model: type[BaseModel]) -> list[ParamSpec]:
    """The parameters of ``model`` (the method's per-model or recipe-level model)."""
    shared = model is method.shared_params
    out = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        required = info.is_required()
        default = None
        if not required:
            value = info.get_default(call_default_factory=True)
            if value is None and shared and key in method.shared_defaults:
                value = method.shared_defaults[key]
            default = _value(value)
        out.append(ParamSpec(key, required, default, _range(info), key in method.ignored))
    return out


def describe_inputs(method: MergeMethod[Any, Any]) -> str:
    """How many models the method takes: ``base + 1 or more``, ``exactly 1 per slice``…"""
    low, high = method.min_models, method.max_models
    if high == low:
        count = f"exactly {low}"
    elif high is None:
        count = f"{low} or more"
    else:
        count = f"{low} to {high}"
    if method.base == "required":
        return f"base + {count}"
    if method.base == "optional":
        return f"optional base + {count}"
    if high == 1:
        return f"{count} per slice"
    return f"{count}; no base"


def _params(method: MergeMethod[Any, Any], model: type[BaseModel], code: bool) -> str:
    return ", ".join(s.render(code) for s in param_specs(method, model)) or "none"


def listing() -> list[str]:
    """The lines `mmath methods` prints."""
    lines = [LEGEND, ""]
    for m in all_methods():
        pad = " " * 17
        lines += [
            f"{m.name:<17} {m.pretty_name} — {m.paper_url}",
            f"{pad} {m.description}",
            f"{pad} inputs:       {describe_inputs(m)}",
            f"{pad} per model:    {_params(m, m.model_params, False)}",
            f"{pad} recipe-level: {_params(m, m.shared_params, False)}",
        ]
    return lines


def markdown_table() -> str:
    """The README's method table (tests/test_faults_cli.py checks the README holds it)."""
    rows = [
        "| method | paper | per-model parameters | recipe-level parameters | inputs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in all_methods():
        rows.append(
            f"| `{m.name}` | [{m.pretty_name}]({m.paper_url}) | "
            f"{_params(m, m.model_params, True)} | {_params(m, m.shared_params, True)} | "
            f"{describe_inputs(m)} |"
        )
    return "\n".join(rows) + "\n"
