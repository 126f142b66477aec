"""Everything written next to the weights: config, generation config, tokenizer files, the
resolved recipe and the model card."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from mergekit_math import __version__
from mergekit_math.errors import UserError
from mergekit_math.io.chat_templates import BUILTIN_TEMPLATES
from mergekit_math.io.reader import TOKENIZER_FILES
from mergekit_math.io.resolve import inside

if TYPE_CHECKING:
    from pydantic import BaseModel

    from mergekit_math.io.reader import Checkpoint, TensorInfo
    from mergekit_math.methods.base import MergeMethod
    from mergekit_math.recipe import Recipe


# What the side files read of a merge plan, declared here so io does not import the engine
# (the engine's Plan, PlanItem, SliceGroup and Source have these members).
class _PatchFile(Protocol):
    @property
    def path(self) -> Path: ...


class _Source(Protocol):
    @property
    def where(self) -> str: ...
    @property
    def patch(self) -> _PatchFile | None: ...


class _Group(Protocol):
    @property
    def sources(self) -> Sequence[_Source]: ...


class _Item(Protocol):
    @property
    def out(self) -> TensorInfo: ...
    @property
    def group(self) -> _Group: ...
    @property
    def copy_only(self) -> bool: ...
    @property
    def shared(self) -> BaseModel | None: ...


class Plan(Protocol):
    """The merge plan as the side files see it (:class:`mergekit_math.merge.Plan`)."""

    @property
    def recipe(self) -> Recipe: ...
    @property
    def method(self) -> MergeMethod: ...
    @property
    def items(self) -> Sequence[_Item]: ...
    @property
    def reference(self) -> Checkpoint: ...
    @property
    def tokenizer_source(self) -> Checkpoint: ...
    @property
    def checkpoints(self) -> dict[str, Checkpoint]: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def module_layers(self) -> dict[str, tuple[int, int, list[tuple[int, int]]]]: ...
    @property
    def seed(self) -> int: ...
    @property
    def parents(self) -> list[str]: ...
    @property
    def vocabulary(self) -> Any: ...  # merge.vocab.Vocabulary | None


def output_config(plan: Plan) -> dict:
    config = json.loads(json.dumps(plan.reference.config))
    dtypes = Counter(i.out.dtype for i in plan.items if not i.copy_only)
    if dtypes:
        dtype = dtypes.most_common(1)[0][0]
        key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
        config[key] = dtype
    if plan.vocabulary is not None:
        # the output vocabulary's rows (where the reference keeps its vocab_size)
        holder = config
        if "vocab_size" not in config and isinstance(config.get("text_config"), dict):
            holder = config["text_config"]
        holder["vocab_size"] = plan.vocabulary.padded
    key = plan.reference.layer_count_key
    old_layers = plan.reference.num_layers
    if key is not None and plan.num_layers != old_layers:
        config[key] = plan.num_layers
        # Per-layer lists (e.g. Qwen2's layer_types) follow the stacked layers.
        for k, v in list(config.items()):
            if isinstance(v, list) and len(v) == old_layers and k not in ("architectures",):
                config[k] = _restack(plan, v)
    return _module_config(plan, config)


def _module_config(plan: Plan, config: dict) -> dict:
    """The output config with each module's layer count (and its per-layer lists, e.g.
    Gemma 3's ``text_config.layer_types``) as merged (multi-module models)."""
    for key, (old, new, ranges) in plan.module_layers.items():
        *path, leaf = key.split(".")
        node = config
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        if new == old or not isinstance(node, dict):
            continue
        node[leaf] = new
        for k, v in list(node.items()):
            if isinstance(v, list) and len(v) == old and k != "architectures":
                node[k] = [v[min(i, old - 1)] for a, b in ranges for i in range(a, b)]
    return config


def _restack(plan: Plan, values: list) -> list:
    out = []
    if plan.recipe.slices:
        for s in plan.recipe.slices:
            a, b = s.sources[0].layer_range
            out.extend(values[a:b] if b <= len(values) else [values[-1]] * (b - a))
    return out if len(out) == plan.num_layers else [values[0]] * plan.num_layers


def chat_template_text(template: str | None) -> str | None:
    """The Jinja text for the recipe's ``chat_template`` (None or 'auto': keep the donor's)."""
    if not template or template == "auto":
        return None
    text = BUILTIN_TEMPLATES.get(template, template)
    if text == template and "{{" not in text and "{%" not in text:
        raise UserError(
            f"chat_template: {template!r} is neither a Jinja template nor a known name "
            f"({', '.join(BUILTIN_TEMPLATES)}, auto)"
        )
    return text


def _copy_side_file(folder: Path, name: str, out: Path) -> bool:
    """Copy ``folder/name`` into ``out`` if it is there: only a regular file inside the folder
    (checked again here, as the reader checked it at planning time)."""
    src = folder / name
    if not os.path.lexists(src):
        return False
    real = inside(folder, name, f"{folder}: {name}")
    if not real.is_file():
        raise UserError(f"{folder}: {name} is not a regular file")
    shutil.copyfile(real, out / name)
    shutil.copystat(real, out / name)
    return True


def copy_tokenizer(plan: Plan, out: Path) -> None:
    """The output's tokenizer: the source's files as they are, or the output vocabulary's
    tokenizer saved by transformers when alignment built a new one."""
    src = plan.tokenizer_source.path
    text = chat_template_text(plan.recipe.chat_template)
    vocab = plan.vocabulary
    if vocab is not None and vocab.copy_from is None:
        if text is not None:
            vocab.tokenizer.chat_template = text
        vocab.tokenizer.save_pretrained(str(out))
        return
    for name in TOKENIZER_FILES:
        _copy_side_file(src, name, out)
    if text is not None:
        (out / "chat_template.jinja").write_text(text)
        tok_cfg = out / "tokenizer_config.json"
        if tok_cfg.is_file():
            try:
                data = json.loads(tok_cfg.read_text())
            except ValueError as exc:
                raise UserError(f"{src / 'tokenizer_config.json'}: invalid JSON ({exc})") from None
            if isinstance(data, dict) and "chat_template" in data:
                data["chat_template"] = text
                tok_cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def resolved_recipe(plan: Plan) -> dict:
    """The recipe with absolute model paths, the seed and every default made explicit, so the
    output can be rebuilt from this file alone."""
    recipe = plan.recipe.model_copy(deep=True)
    by_ref = {c.ref: c.resolved_ref for c in plan.checkpoints.values()}  # BASE+ADAPTER: both

    def fix(ref: str | None) -> str | None:
        return by_ref.get(ref, ref) if ref else ref

    recipe.base_model = fix(recipe.base_model)
    groups = {id(i.group): i.group for i in plan.items}.values()
    patches = {s.where: str(s.patch.path) for g in groups for s in g.sources if s.patch}
    holders = [("", recipe)] + [(f"modules.{k}.", m) for k, m in (recipe.modules or {}).items()]
    for at, holder in holders:
        for i, m in enumerate(holder.models or []):
            m.model = fix(m.model)
            m.origin = fix(m.origin)
            if m.patch is not None:
                m.patch = patches.get(f"{at}models[{i}]", m.patch)
        for s in holder.slices or []:
            s.base_model = fix(s.base_model)
            for src in s.sources:
                src.model = fix(src.model)  # type: ignore[assignment]
                src.origin = fix(src.origin)
    if recipe.tokenizer_source not in (None, "base", "union"):
        recipe.tokenizer_source = fix(recipe.tokenizer_source)
    if recipe.tokenizer is not None:
        if recipe.tokenizer.source not in ("base", "union"):
            recipe.tokenizer.source = fix(recipe.tokenizer.source)  # type: ignore[assignment]
        for cfg in (recipe.tokenizer.tokens or {}).values():
            if isinstance(cfg.source, str):
                cfg.source = fix(cfg.source)
            elif cfg.source is not None and hasattr(cfg.source, "model"):
                cfg.source.model = fix(cfg.source.model)  # type: ignore[assignment]
    recipe.seed = plan.seed
    # Publishing is an action on the output, not part of what the model is.
    recipe.push = None
    data = recipe.model_dump(mode="json", exclude_none=True)
    # Make the method's recipe-level defaults explicit (not for modules: an item's values
    # there may come from its module's parameters, not the recipe's).
    params = dict(data.get("parameters") or {})
    for item in plan.items if not recipe.modules else []:
        if item.shared is not None:
            for key, value in item.shared.model_dump(by_alias=True).items():
                if value is None:
                    value = plan.method.shared_defaults.get(key)
                if value is not None:
                    params.setdefault(key, value)
            break
    if params:
        data["parameters"] = params
    if plan.method.random:
        from mergekit_math.methods.masks import MASK_VERSION

        data["mask_version"] = MASK_VERSION  # tells outputs of older mask definitions apart
    else:
        data.pop("mask_version", None)
    return data


def model_card(plan: Plan, recipe_yaml: str) -> str:
    from mergekit_math.hub.card import split_parents

    m = plan.method
    # base_model lists Hub ids only (the rule mmath push applies); local parents are in the text.
    hub, _ = split_parents(plan.parents, {c.ref: c.path for c in plan.checkpoints.values()})
    front = {
        **({"base_model": hub} if hub else {}),
        "library_name": "transformers",
        "tags": ["merge", "mergekit-math", m.name],
    }
    parents = "\n".join(f"- {p}" for p in plan.parents)
    return (
        "---\n"
        + yaml.safe_dump(front, sort_keys=False)
        + "---\n\n"
        + "# Merged model\n\n"
        + "This model was made with [mergekit-math](https://pypi.org/project/mergekit-math/) "
        + f"{__version__}.\n\n"
        + f"## Method\n\n[{m.pretty_name}]({m.paper_url}) (`{m.name}`): {m.description}\n\n"
        + f"## Parents\n\n{parents}\n\n"
        + f"## Recipe\n\n```yaml\n{recipe_yaml}```\n\n"
        + "Rebuild it with `mmath merge mmath_recipe.yaml OUT_DIR`.\n"
    )


def write_model_files(plan: Plan, out: Path) -> None:
    config = output_config(plan)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = "generation_config.json"
    if not _copy_side_file(plan.tokenizer_source.path, gen, out):
        _copy_side_file(plan.reference.path, gen, out)
    copy_tokenizer(plan, out)
    data = resolved_recipe(plan)
    text = yaml.safe_dump(data, sort_keys=False)
    header = f"# mmath merge mmath_recipe.yaml OUT_DIR   (written by mergekit-math {__version__})\n"
    (out / "mmath_recipe.yaml").write_text(header + text)
    (out / "README.md").write_text(model_card(plan, text))
