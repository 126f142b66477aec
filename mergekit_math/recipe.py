"""Recipe schema: a superset of mergekit's YAML, validated strictly before any tensor is read.

Every error is a :class:`UserError` whose message starts with the YAML path of the offending
key (``models[1].parameters.density: ...``).
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from mergekit_math.errors import UserError
from mergekit_math.io.model_ref import RefStr
from mergekit_math.lenient import LENIENT_HINT, drop_extra_keys
from mergekit_math.recipe_vocab import TokenizerSettings

Scalar = bool | int | float | str
DTypeName = Literal["float32", "float16", "bfloat16", "float64"]

_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "double": "float64",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConditionalParameter(_Strict):
    """One entry of a filtered parameter list: the first entry whose ``filter`` is a substring
    of the tensor name wins; an entry without ``filter`` (or with ``*``) is the fallback."""

    value: Scalar | list[Scalar]
    filter: str | None = None


# A parameter value as mergekit reads it: a scalar, a gradient (list of scalars interpolated
# across layers) or a list of filtered values.
Setting = Scalar | list[Scalar] | ConditionalParameter | list[ConditionalParameter]
Parameters = dict[str, Setting]


class InputModel(_Strict):
    model: RefStr | None = Field(
        None, description="Local folder or Hub id (NAME@REVISION), or BASE+LORA_ADAPTER."
    )
    patch: str | None = Field(
        None,
        description="mmath extension, instead of model: a patch folder (mmath patch extract) "
        "whose delta is this input's delta (PortLLM: port a fine-tune to the recipe's base).",
    )
    parameters: Parameters | None = None
    origin: str | None = Field(
        default=None,
        description="mmath extension: this model's delta is model - origin instead of "
        "model - base_model (PortLLM patches, CoT-Valve directions).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> InputModel:
        if (self.model is None) == (self.patch is None):
            raise ValueError("give exactly one of model and patch")
        if self.patch is not None and self.origin is not None:
            raise ValueError("a patch is already a delta; it takes no origin")
        return self


class InputSlice(_Strict):
    model: RefStr
    layer_range: tuple[int, int] = Field(description="Half-open [start, end) layer range.")
    parameters: Parameters | None = None
    origin: str | None = None


class OutputSlice(_Strict):
    sources: list[InputSlice]
    base_model: RefStr | None = None
    parameters: Parameters | None = None


class OutputModule(_Strict):
    """One module of a multi-module model (mergekit's ``modules:``, e.g. Gemma 3's
    ``text_decoder`` and ``vision_tower``): its own inputs or slices and parameters."""

    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_input_list(self) -> OutputModule:
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of models and slices")
        return self


class EvaluateBlock(_Strict):
    """mmath extension: evaluate the merged model right after merging (as `mmath eval`)."""

    tasks: list[str] | str = Field(description="Tasks, as `mmath eval --tasks`.")
    data: str | None = Field(None, description="GSM8K JSONL, relative to the recipe's folder.")
    limit: int | float | None = Field(None, gt=0, allow_inf_nan=False)
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int | str | None = None
    dtype: str | None = None
    apply_chat_template: bool | None = None
    gen_kwargs: dict[str, Scalar] | None = None
    seed: int | None = None
    require: list[str] | None = Field(
        None, description="Bars for publishing: 'TASK:METRIC[,FILTER]>=VALUE'."
    )


class PushBlock(_Strict):
    """mmath extension: publish the merged model after it clears ``evaluate.require``."""

    repo_id: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    create_pr: bool = False


class Recipe(_Strict):
    """A merge recipe. Fields mirror mergekit's; ``seed``, ``compute_dtype`` and per-model
    ``origin`` are mmath extensions."""

    name: str | None = Field(
        default=None,
        description="Names a document of a multi-document recipe (mergekit-multi's format): "
        "later documents use it as a model reference (see mergekit_math.stages).",
    )
    merge_method: str
    base_model: RefStr | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = Field(
        default=None, description="Per-module inputs of a multi-module model (as mergekit)."
    )
    parameters: Parameters | None = None
    dtype: DTypeName | None = Field(
        default=None, description="Inputs are rounded to this dtype when read (as mergekit)."
    )
    out_dtype: DTypeName | None = Field(
        default=None, description="Dtype of the written tensors; defaults to dtype, else input."
    )
    compute_dtype: DTypeName = Field(
        default="float32",
        description="mmath extension: arithmetic dtype (inputs upcast once, output cast once).",
    )
    tokenizer_source: str | None = Field(
        default=None,
        description="'base', 'union' or a model: the output vocabulary; every input's "
        "embedding rows are aligned to it (mergekit's semantics).",
    )
    tokenizer: TokenizerSettings | None = Field(
        default=None, description="The output vocabulary with per-token embedding sources."
    )
    chat_template: str | None = None
    seed: int | None = Field(default=None, description="mmath extension: seed for DARE/DELLA.")
    mask_version: int | None = Field(
        default=None,
        description="mmath extension: the definition of DARE/DELLA's random masks the output "
        "was made with (written into mmath_recipe.yaml); only the current one is accepted.",
    )
    evaluate: EvaluateBlock | None = Field(
        default=None, description="mmath extension: evaluate after merging."
    )
    push: PushBlock | None = Field(
        default=None, description="mmath extension: gated Hub push after evaluating."
    )

    @model_validator(mode="before")
    @classmethod
    def _normalise_dtypes(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("dtype", "out_dtype", "compute_dtype"):
                value = data.get(key)
                if isinstance(value, str):
                    data[key] = _DTYPE_ALIASES.get(value.lower(), value.lower())
        return data

    def model_refs(self) -> list[tuple[str, str]]:
        """(YAML path, reference) of every checkpoint the recipe names, base first."""
        refs: list[tuple[str, str]] = []
        if self.base_model:
            refs.append(("base_model", self.base_model))
        for i, m in enumerate(self.models or []):
            if m.model is not None:
                refs.append((f"models[{i}].model", m.model))
            if m.origin:
                refs.append((f"models[{i}].origin", m.origin))
        for i, s in enumerate(self.slices or []):
            if s.base_model:
                refs.append((f"slices[{i}].base_model", s.base_model))
            for j, src in enumerate(s.sources):
                refs.append((f"slices[{i}].sources[{j}].model", src.model))
                if src.origin:
                    refs.append((f"slices[{i}].sources[{j}].origin", src.origin))
        for name, module in (self.modules or {}).items():
            sub = Recipe.model_construct(
                merge_method=self.merge_method, models=module.models, slices=module.slices
            )
            refs.extend((f"modules.{name}.{where}", ref) for where, ref in sub.model_refs())
        if self.tokenizer_source and self.tokenizer_source not in ("base", "union"):
            refs.append(("tokenizer_source", self.tokenizer_source))
        if self.tokenizer is not None:
            refs.extend(self.tokenizer.model_refs())
        return refs

    @property
    def vocabulary_source(self) -> str | None:
        """'base', 'union', a model reference, or None (no vocabulary alignment)."""
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source


def _yaml_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_normalise_dtypes(), Recipe]",):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "<recipe>"


def _first_error(exc: ValidationError) -> str:
    """One line for the most useful pydantic error (pydantic lists one per union branch)."""
    errors = exc.errors()
    # Prefer "extra field" / "missing" errors: they are what the user typed wrong.
    for kind in ("extra_forbidden", "missing"):
        for err in errors:
            if err["type"] == kind:
                return _format_error(err)
    return _format_error(errors[0])


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p and "]" in p))
    path = _yaml_path(loc)
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key {loc[-1]!r}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    return f"{path}: {err['msg']} (got {err.get('input')!r})"


def _parameter_blocks(recipe: Recipe) -> list[tuple[str, Parameters | None]]:
    """(YAML path, mapping) of every ``parameters:`` block of a recipe."""
    blocks: list[tuple[str, Parameters | None]] = [("parameters", recipe.parameters)]
    for i, m in enumerate(recipe.models or []):
        blocks.append((f"models[{i}].parameters", m.parameters))
    for i, s in enumerate(recipe.slices or []):
        blocks.append((f"slices[{i}].parameters", s.parameters))
        for j, src in enumerate(s.sources):
            blocks.append((f"slices[{i}].sources[{j}].parameters", src.parameters))
    for name, module in (recipe.modules or {}).items():
        sub = Recipe.model_construct(
            merge_method=recipe.merge_method,
            models=module.models,
            slices=module.slices,
            parameters=module.parameters,
        )
        blocks.extend((f"modules.{name}.{where}", p) for where, p in _parameter_blocks(sub))
    return blocks


def _leaf_paths(setting: Any, where: str) -> list[tuple[str, Any]]:
    """(YAML path, scalar) of every scalar in a setting: ``weight[2]``, ``weight[0].value``."""
    if isinstance(setting, ConditionalParameter):
        return _leaf_paths(setting.value, f"{where}.value")
    if isinstance(setting, list):
        out: list[tuple[str, Any]] = []
        for i, item in enumerate(setting):
            out.extend(_leaf_paths(item, f"{where}[{i}]"))
        return out
    return [(where, setting)]


def _check_finite(recipe: Recipe, source: str) -> None:
    """Refuse NaN and infinite numbers (``.nan``, ``.inf``, ``1e400``) in parameters: every
    method would turn them into an all-NaN model."""
    blocks = _parameter_blocks(recipe)
    if recipe.evaluate is not None and recipe.evaluate.gen_kwargs:
        blocks.append(("evaluate.gen_kwargs", recipe.evaluate.gen_kwargs))  # type: ignore[arg-type]
    for where, params in blocks:
        for key, setting in (params or {}).items():
            for path, value in _leaf_paths(setting, f"{where}.{key}"):
                if isinstance(value, float) and not math.isfinite(value):
                    raise UserError(f"{source}: {path}: must be a finite number (got {value!r})")


def _validate(data: dict[str, Any], source: str, warnings: list[str] | None) -> Recipe:
    """``Recipe.model_validate``; with ``warnings`` (lenient), unknown keys are dropped with a
    warning each and the rest validated again."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        dropped = drop_extra_keys(data, exc.errors()) if warnings is not None else []
        if dropped:
            for err in dropped:
                warnings.append(f"{source}: {_format_error(err)}; ignored (--lenient)")  # type: ignore[union-attr]
            return _validate(data, source, warnings)
        message = _first_error(exc)
        if warnings is None and ": unknown key " in message:
            message += f"; {LENIENT_HINT}"
        raise UserError(f"{source}: {message}") from None


def parse_recipe(
    data: Any, source: str = "<recipe>", *, warnings: list[str] | None = None
) -> Recipe:
    """Validate a recipe mapping; errors name the YAML path. With ``warnings`` (--lenient),
    unknown keys are dropped and reported there instead of refused."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
    if warnings is not None:
        data = copy.deepcopy(data)
    recipe = _validate(data, source, warnings)
    _check_finite(recipe, source)
    _check_mask_version(recipe, source)
    if sum(map(bool, (recipe.models, recipe.slices, recipe.modules))) != 1:
        raise UserError(f"{source}: give exactly one of 'models' or 'slices' (or 'modules')")
    if recipe.tokenizer_source and recipe.tokenizer is not None:
        raise UserError(
            f"{source}: give tokenizer_source or a tokenizer: section, not both "
            "(tokenizer.source is the same setting)"
        )
    return recipe


def _check_mask_version(recipe: Recipe, source: str) -> None:
    from mergekit_math.methods.masks import MASK_VERSION

    v = recipe.mask_version
    if v is not None and v != MASK_VERSION:
        raise UserError(
            f"{source}: mask_version: the recipe asks for DARE/DELLA masks of version {v}; this "
            f"mmath draws version {MASK_VERSION} only (see the README's mask definition), so "
            "its output would not be the recorded one. Delete mask_version to merge with "
            f"version {MASK_VERSION} masks, or use the mmath that wrote the recipe."
        )


def read_recipe_text(path: str | Path) -> str:
    """A recipe file's text; a missing file, a folder or bytes that are not UTF-8 are one
    :class:`UserError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a recipe file")
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}, "
            f"offset {exc.start})"
        ) from None


def load_recipe(path: str | Path, *, warnings: list[str] | None = None) -> Recipe:
    """Read and validate a one-document recipe file; ``warnings``: as :func:`parse_recipe`
    (--lenient)."""
    path = Path(path)
    text = read_recipe_text(path)
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if len(docs) > 1:
        raise UserError(
            f"{path}: has {len(docs)} documents (a multi-stage recipe); only `mmath merge` "
            "runs those"
        )
    return parse_recipe(docs[0] if docs else None, source=str(path), warnings=warnings)


# --------------------------------------------------------------------------- parameter values


def suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def iter_leaves(setting: Setting) -> list[Scalar]:
    """Every scalar a setting can produce, for validation before any tensor is read."""
    if isinstance(setting, ConditionalParameter):
        return iter_leaves(setting.value)  # type: ignore[arg-type]
    if isinstance(setting, list):
        out: list[Scalar] = []
        for item in setting:
            out.extend(iter_leaves(item))  # type: ignore[arg-type]
        return out
    return [setting]


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Scalar | None:
    """The value of ``setting`` for one tensor, as mergekit evaluates it.

    - scalar: itself;
    - list of scalars: a gradient; numbers are interpolated linearly at ``t`` (layer position
      in [0, 1]), other values are picked at ``int(t * (n - 1))``;
    - filtered list: the first entry whose filter is a substring of the name (or has no filter).
    """
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(not isinstance(e, ConditionalParameter) for e in setting):
            values = list(setting)
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if not numeric:
                return values[int(t * (len(values) - 1))]  # type: ignore[return-value]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * values[i0] + frac * values[i1]  # type: ignore[operator]
        for cond in setting:
            if not isinstance(cond, ConditionalParameter):
                continue
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                return evaluate_setting(cond.value, tensor_name, t)  # type: ignore[arg-type]
        return None
    return setting


@functools.cache
def field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    """A validator for one field of a parameter model, with its constraints (built once per
    field: a plan checks each parameter of every tensor)."""
    from typing import Annotated

    info = model.model_fields[name]
    if not info.metadata:
        return TypeAdapter(info.annotation)
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)])  # type: ignore[misc]


MAX_MAGNITUDE = 1e4
"""Largest magnitude of a real-valued merge parameter (weights, ``lambda``, ``scale``):
densities, ``t``, ``gamma`` and ``epsilon`` have their own ranges within it; a larger one is
a typo (``1e40``) that would overflow the output dtype."""


def check_value(model: type[BaseModel], name: str, value: Any, where: str) -> Any:
    """``value`` validated as field ``name`` of ``model``; real values must also be finite and
    at most :data:`MAX_MAGNITUDE` in magnitude."""
    try:
        out = field_adapter(model, name).validate_python(value)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        raise UserError(f"{where}: {msg} (got {value!r})") from None
    if isinstance(out, float):
        if not math.isfinite(out):
            raise UserError(f"{where}: must be a finite number (got {value!r})")
        if abs(out) > MAX_MAGNITUDE:
            raise UserError(
                f"{where}: {value!r} is out of range: merge parameters are at most "
                f"{MAX_MAGNITUDE:g} in magnitude"
            )
    return out


def dump_recipe(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False)
