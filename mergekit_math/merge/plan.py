"""Plan a merge.

``build_plan`` turns a validated :class:`Recipe` into one :class:`PlanItem` per output tensor
using safetensors headers only, raising :class:`UserError` for every problem before a tensor is
read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mergekit_math.errors import UserError
from mergekit_math.io.reader import (
    FLOAT_DTYPES,
    PRE_LAYER_MARKERS,
    TIED_WEIGHTS,
    Checkpoint,
    TensorInfo,
    layer_of,
)
from mergekit_math.merge.aligned import align_inputs
from mergekit_math.merge.modules import Part, module_layers, plan_parts
from mergekit_math.merge.params import check_param_names, resolve_item_params
from mergekit_math.merge.types import Plan, PlanItem, SliceGroup, Source
from mergekit_math.merge.vocab import Vocabulary, plan_vocabulary, vocab_tensor_names
from mergekit_math.methods import MergeMethod, all_methods, get_method
from mergekit_math.patch.lora_checkpoint import load_model_ref
from mergekit_math.patch.source import open_patch_source
from mergekit_math.recipe import Recipe

DEFAULT_SEED = 0


def _everything(name: str) -> bool:
    return True


def _delta_methods() -> str:
    return ", ".join(m.name for m in all_methods() if m.kind == "delta")


class _Loader:
    def __init__(self, recipe_dir: Path | None, allow_pickle: bool):
        self.recipe_dir = recipe_dir
        self.allow_pickle = allow_pickle
        self.by_path: dict[str, Checkpoint] = {}
        self.by_ref: dict[str, Checkpoint] = {}

    def __call__(self, ref: str, where: str) -> Checkpoint:
        # PATH, PATH@REVISION or BASE+LORA_ADAPTER, opened once per resolved reference (and
        # resolved once per reference: a Hub id is not looked up again)
        if ref not in self.by_ref:
            self.by_ref[ref] = load_model_ref(
                ref, where, self.recipe_dir, self.allow_pickle, self.by_path
            )
        return self.by_ref[ref]


def _check_compatible(ref: Checkpoint, others: list[tuple[str, Checkpoint]], aligned: bool) -> None:
    for where, c in others:
        if c.architecture != ref.architecture or c.model_type != ref.model_type:
            raise UserError(
                f"{where}: different architectures: {c.ref} is {c.architecture} "
                f"({c.model_type}), {ref.ref} is {ref.architecture} ({ref.model_type})"
            )
        if c.vocab_size != ref.vocab_size and not aligned:
            raise UserError(
                f"{where}: different vocabulary sizes: {c.ref} has {c.vocab_size}, "
                f"{ref.ref} has {ref.vocab_size}; set `tokenizer_source: union` (every "
                "input's tokens) or `tokenizer_source: base` (the base's tokens) to align "
                "the embeddings to one vocabulary (they are never truncated silently)"
            )


def _check_tensor(
    item_name: str,
    ref_info: TensorInfo,
    ref: Checkpoint,
    src: Checkpoint,
    name: str,
    where: str,
) -> None:
    stored = src.resolve_name(name)
    if stored is None:
        raise UserError(
            f"{where}: different tensor sets: {src.ref} has no tensor {name} "
            f"(needed for output {item_name})"
        )
    info = src.tensors[stored]
    if info.shape != ref_info.shape:
        raise UserError(
            f"{where}: different shapes for {name}: {src.ref} has {list(info.shape)}, "
            f"{ref.ref} has {list(ref_info.shape)}"
        )


def _ordered_names(
    ckpt: Checkpoint, owns: Callable[[str], bool] = _everything
) -> tuple[list[str], dict[int, list[str]], list[str]]:
    """Split a checkpoint's tensors (those ``owns`` accepts) into pre-layer, per-layer and
    post-layer names."""
    pre: list[str] = []
    post: list[str] = []
    layers: dict[int, list[str]] = {}
    for name in sorted(filter(owns, ckpt.tensors)):
        parsed = layer_of(name)
        if parsed is not None:
            layers.setdefault(parsed[1], []).append(name)
        elif any(m in name for m in PRE_LAYER_MARKERS):
            pre.append(name)
        else:
            post.append(name)
    return pre, layers, post


def _layer_name(name: str, index: int) -> str:
    parsed = layer_of(name)
    assert parsed is not None
    return f"{parsed[0]}.{index}.{parsed[2]}"


def _origin_of(
    method: MergeMethod, load: _Loader, ref: str | None, where: str
) -> Checkpoint | None:
    if ref is None:
        return None
    if method.kind != "delta":
        raise UserError(
            f"{where}.origin: only delta methods ({_delta_methods()}) take an origin, "
            f"not {method.name}"
        )
    return load(ref, f"{where}.origin")


def _is_base(method: MergeMethod, ckpt: Checkpoint, group_base: Checkpoint | None) -> bool:
    # A base listed among the inputs of a method that takes one is the base, not an input.
    return group_base is not None and ckpt is group_base and method.base != "none"


def _models_group(
    recipe: Recipe, method: MergeMethod, load: _Loader, base: Checkpoint | None, part: Part
) -> SliceGroup:
    """``models:`` as one group over every layer of the reference checkpoint."""
    assert recipe.models is not None
    sources: list[Source] = []
    index = 0
    for i, m in enumerate(recipe.models):
        where = f"{part.at}models[{i}]"
        if m.patch is not None:
            if method.kind != "delta" or base is None:
                raise UserError(
                    f"{where}.patch: only delta methods with a base_model "
                    f"({_delta_methods()}) take a patch, not {method.name}"
                )
            deltas = open_patch_source(m.patch, f"{where}.patch", load.recipe_dir, base)
            sources.append(Source(index, where, base, m.parameters, None, patch=deltas))
            index += 1
            continue
        assert m.model is not None
        ckpt = load(m.model, f"{where}.model")
        origin = _origin_of(method, load, m.origin, where)
        if _is_base(method, ckpt, base):
            if origin is not None:
                raise UserError(f"{where}.origin: the base model cannot have an origin")
            continue
        sources.append(Source(index, where, ckpt, m.parameters, origin))
        index += 1
    layers = part.count(base or sources[0].ckpt) if (base or sources) else 0
    base_src = Source(-1, "base_model", base, None) if base is not None else None
    if method.base == "none" and base is not None:
        # As mergekit: for a method without a base, base_model is one more input (added
        # when it is not listed), never a separate base.
        if all(s.ckpt is not base for s in sources):
            sources.append(Source(index, "base_model", base, None))
            index += 1
        base_src = None
    return SliceGroup(f"{part.at}models", sources, base_src, None, layers)


def _slice_groups(
    recipe: Recipe, method: MergeMethod, load: _Loader, base: Checkpoint | None, part: Part
) -> list[SliceGroup]:
    """One group per entry of ``slices:``, its sources numbered on from the previous ones."""
    assert recipe.slices is not None
    groups: list[SliceGroup] = []
    index = 0
    for i, s in enumerate(recipe.slices):
        at = f"{part.at}slices[{i}]"
        sbase = load(s.base_model, f"{at}.base_model") if s.base_model else base
        sources = []
        lengths = set()
        base_start = s.sources[0].layer_range[0]
        for j, src in enumerate(s.sources):
            where = f"{at}.sources[{j}]"
            ckpt = load(src.model, f"{where}.model")
            a, b = src.layer_range
            if not (0 <= a < b <= part.count(ckpt)):
                raise UserError(
                    f"{where}.layer_range: [{a}, {b}] is not a half-open range inside "
                    f"the model's {part.count(ckpt)} layers"
                )
            lengths.add(b - a)
            origin = _origin_of(method, load, src.origin, where)
            if _is_base(method, ckpt, sbase):
                base_start = a  # the base's layers come from its own source in the slice
                continue
            sources.append(Source(index, where, ckpt, src.parameters, origin, a))
            index += 1
        if len(lengths) > 1:
            raise UserError(
                f"{at}.sources: every source of a slice needs the same number of "
                f"layers, got {sorted(lengths)}"
            )
        base_src = None
        if sbase is not None and method.base != "none":
            base_src = Source(-1, f"{at}.base_model", sbase, None, None, base_start)
        groups.append(SliceGroup(at, sources, base_src, s.parameters, lengths.pop()))
    return groups


def _check_input_counts(groups: list[SliceGroup], method: MergeMethod) -> None:
    """Refuse a group with fewer or more inputs than the method takes."""
    for g in groups:
        n = len(g.sources)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            what = "input" if method.min_models == method.max_models == 1 else "inputs"
            if method.base != "none":
                what += " besides the base model"
            if method.max_models == method.min_models:
                want = f"exactly {method.min_models}"
            else:
                want = f"at least {method.min_models}"
                if method.max_models is not None:
                    want += f" and at most {method.max_models}"
            raise UserError(f"{g.where}: {method.name} takes {want} {what}, got {n}")


def _build_groups(
    recipe: Recipe, method: MergeMethod, load: _Loader, base: Checkpoint | None, part: Part
) -> list[SliceGroup]:
    """Normalise ``models:`` (one group over every layer) and ``slices:`` into groups."""
    if recipe.models:
        groups = [_models_group(recipe, method, load, base, part)]
    else:
        groups = _slice_groups(recipe, method, load, base, part)
    _check_input_counts(groups, method)
    return groups


def _check_tensor_sets(
    part: Part, reference: Checkpoint, groups: list[SliceGroup], warnings: list[str]
) -> None:
    """Refuse an input with a tensor the reference lacks (except layer tensors in a slices
    recipe, whose inputs may have more layers); warn about untied weights that are dropped."""
    recipe = part.recipe
    tied_extra = {n for n in TIED_WEIGHTS if n not in reference.tensors}
    expected = set(reference.tensors) | tied_extra
    for g in groups:
        for s in g.sources:
            extra = sorted(set(filter(part.owns, s.ckpt.tensors)) - expected)
            if recipe.slices:
                extra = [n for n in extra if layer_of(n) is None]
            if extra:
                raise UserError(
                    f"{s.where}: different tensor sets: {s.ckpt.ref} has {len(extra)} "
                    f"tensor(s) that {reference.ref} lacks, e.g. {extra[0]}"
                )
            untied = sorted(set(s.ckpt.tensors) & tied_extra)
            if untied:
                warnings.append(
                    f"{s.ckpt.ref} has an untied {untied[0]} but the output ties it to the "
                    f"input embedding like {reference.ref}; that tensor is not merged"
                )


class _Items:
    """Builds the plan's items in output order, checking each input's tensor against the
    reference's before the item is planned."""

    def __init__(
        self, recipe: Recipe, method: MergeMethod, reference: Checkpoint, aligned: set[str]
    ):
        self.recipe = recipe
        self.method = method
        self.reference = reference
        self.aligned = aligned  # vocabulary tensors read through the output vocabulary
        self.out_dtype = recipe.out_dtype or recipe.dtype
        self.items: list[PlanItem] = []

    def add(
        self,
        out_name: str,
        group: SliceGroup,
        names: list[str],
        base_name: str | None,
        t: float,
        ref_ckpt: Checkpoint,
        ref_name: str,
    ) -> None:
        ref_info = ref_ckpt.info(ref_name)
        for s, n in zip(group.sources, names):
            _check_tensor(out_name, ref_info, ref_ckpt, s.ckpt, n, s.where)
            if s.origin is not None:
                _check_tensor(out_name, ref_info, ref_ckpt, s.origin, n, f"{s.where}.origin")
        if group.base is not None and base_name is not None:
            _check_tensor(
                out_name, ref_info, ref_ckpt, group.base.ckpt, base_name, group.base.where
            )
        is_float = ref_info.dtype in FLOAT_DTYPES
        item = PlanItem(
            out=TensorInfo(
                out_name,
                ref_info.file,
                (self.out_dtype or ref_info.dtype) if is_float else ref_info.dtype,
                ref_info.shape,
            ),
            group=group,
            names=names,
            base_name=base_name,
            t=t,
            copy_only=not is_float,
            aligned=out_name in self.aligned,
        )
        if not item.copy_only:
            resolve_item_params(self.recipe, self.method, item)
        self.items.append(item)

    def non_layer(self, name: str, g: SliceGroup) -> None:
        """A tensor outside the layers: the same name in every input."""
        base_name = name if g.base else None
        self.add(name, g, [name] * len(g.sources), base_name, 0.0, self.reference, name)

    def layers(
        self,
        groups: list[SliceGroup],
        layers: dict[int, list[str]],
        owns: Callable[[str], bool] = _everything,
    ) -> int:
        """The layers group by group, renumbered from 0; returns the output's layer count.

        ``layers``: the reference's tensor names per layer, which a ``models:`` group follows;
        a slice follows its first source's layers from its ``layer_range``.
        """
        slices = bool(self.recipe.slices)
        out_layer = 0
        for g in groups:
            template = g.sources[0]
            template_layers = _ordered_names(template.ckpt, owns)[1] if slices else layers
            for j in range(g.num_layers):
                # t runs from 0 to 1 across the group's layers (1 for a single layer, as mergekit)
                t = j / (g.num_layers - 1) if g.num_layers > 1 else 1.0
                names_j = template_layers.get(template.layer_start + j if slices else j, [])
                for templ in names_j:
                    base_name = _layer_name(templ, g.base.layer_start + j) if g.base else None
                    self.add(
                        _layer_name(templ, out_layer),
                        g,
                        [_layer_name(templ, s.layer_start + j) for s in g.sources],
                        base_name,
                        t,
                        template.ckpt if slices else self.reference,
                        templ,
                    )
                out_layer += 1
        return out_layer


def build_plan(
    recipe: Recipe,
    *,
    recipe_dir: Path | None = None,
    seed: int | None = None,
    allow_pickle: bool = False,
    lenient: bool = False,
) -> Plan:
    """Validate ``recipe`` against the checkpoints' headers and plan every output tensor.

    Output tensors follow the reference checkpoint (``base_model``, else the first input):
    its pre-layer tensors (embeddings) from the first group, the layers group by group, then
    its post-layer tensors (final norm, lm_head) from the last group, as mergekit does.
    ``lenient``: unknown parameters are warnings (imported recipes), not errors.
    """
    from mergekit_math.io.model_files import chat_template_text

    method = get_method(recipe.merge_method)
    warnings: list[str] = []
    check_param_names(recipe, method, warnings, lenient)
    chat_template_text(recipe.chat_template)  # an unknown template name fails here
    load = _Loader(recipe_dir, allow_pickle)

    if method.base == "required" and not recipe.base_model:
        raise UserError(f"base_model: {method.name} needs a base_model")
    base = load(recipe.base_model, "base_model") if recipe.base_model else None
    # Multi-module models (multimodal Gemma 3) are planned module by module (modules.py).
    refs = [(r, w) for w, r in recipe.model_refs() if w != "tokenizer_source"]
    parts = plan_parts(recipe, base or (load(*refs[0]) if refs else None))
    planned = [(part, _build_groups(part.recipe, method, load, base, part)) for part in parts]

    reference = base or planned[0][1][0].sources[0].ckpt
    wheres = {id(s.ckpt): s.where for _, groups in planned for g in groups for s in g.sources}
    vocab = _plan_vocabulary(recipe, planned, load, base, reference, warnings)
    _check_compatible(
        reference,
        [(wheres.get(id(c), c.ref), c) for c in load.by_path.values() if c is not reference],
        aligned=vocab is not None,
    )
    aligned: set[str] = set()
    if vocab is not None and not vocab.identity:
        views = align_inputs(vocab)
        planned = [(part, _aligned_groups(groups, views)) for part, groups in planned]
        reference = views[reference]  # type: ignore[assignment]
        aligned = vocab.names
    seed = seed if seed is not None else (recipe.seed if recipe.seed is not None else DEFAULT_SEED)

    planned_items: list[PlanItem] = []
    counts: list[int] = []
    for part, groups in planned:
        items = _Items(part.recipe, method, reference, aligned)
        counts.append(_plan_part(items, part, groups, warnings))
        planned_items.extend(items.items)

    if vocab is not None:
        tokenizer = vocab.copy_from or reference
    else:
        tokenizer = reference
    return Plan(
        recipe=recipe,
        method=method,
        items=planned_items,
        reference=reference,
        tokenizer_source=tokenizer,
        checkpoints=load.by_path,
        num_layers=counts[0],
        seed=seed,
        warnings=warnings,
        vocabulary=vocab,
        module_layers=module_layers(parts, planned, reference, counts),
    )


def _plan_vocabulary(
    recipe: Recipe,
    planned: list[tuple[Part, list[SliceGroup]]],
    load: _Loader,
    base: Checkpoint | None,
    reference: Checkpoint,
    warnings: list[str],
) -> Vocabulary | None:
    """The output vocabulary, planned on the part (the model, or the module) that holds the
    embeddings."""
    if recipe.vocabulary_source is None:
        return None
    names = vocab_tensor_names(reference)
    part, groups = next(((p, g) for p, g in planned if any(p.owns(n) for n in names)), planned[0])
    return plan_vocabulary(part.recipe, load, base, reference, len(groups), warnings)


def _aligned_groups(groups: list[SliceGroup], views: dict) -> list[SliceGroup]:
    """The groups with every input read through the output vocabulary."""
    from dataclasses import replace

    def view(c: Checkpoint | None) -> Checkpoint | None:
        return views[c] if c is not None else None  # type: ignore[return-value]

    def source(s: Source) -> Source:
        return replace(s, ckpt=view(s.ckpt), origin=view(s.origin))

    return [
        replace(
            g,
            sources=[source(s) for s in g.sources],
            base=source(g.base) if g.base is not None else None,
        )
        for g in groups
    ]


def _plan_part(items: _Items, part: Part, groups: list[SliceGroup], warnings: list[str]) -> int:
    """Plan the tensors of one part (the model, or one module): its pre-layer tensors from
    the first group, the layers group by group, its post-layer tensors from the last group.
    Returns its output layer count."""
    pre, layers, post = _ordered_names(items.reference, part.owns)
    _check_tensor_sets(part, items.reference, groups, warnings)
    for name in pre:
        items.non_layer(name, groups[0])
    num_layers = items.layers(groups, layers, part.owns)
    for name in post:
        items.non_layer(name, groups[-1])
    return num_layers
