"""Plan and execute a merge.

``build_plan`` turns a validated :class:`Recipe` into one :class:`PlanItem` per output tensor
using safetensors headers only, raising :class:`UserError` for every problem before a tensor is
read. ``execute`` streams the items through the method functions into the sharded writer inside
a temporary folder that is renamed into place only when everything is written.
"""

from __future__ import annotations

import hashlib
import mmap
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from mergekit_math.errors import UserError
from mergekit_math.io.atomic import atomic_output
from mergekit_math.io.progress import byte_progress
from mergekit_math.io.reader import (
    FLOAT_DTYPES,
    ITEMSIZE,
    PRE_LAYER_MARKERS,
    TIED_WEIGHTS,
    Checkpoint,
    TensorInfo,
    layer_of,
)
from mergekit_math.io.resolve import resolve_model
from mergekit_math.io.writer import human_bytes
from mergekit_math.methods import MergeMethod, get_method, param_keys
from mergekit_math.patch.source import PatchDeltas, open_patch_source
from mergekit_math.pipeline import Prefetcher, Unit, WriterThread
from mergekit_math.recipe import (
    Parameters,
    Recipe,
    check_value,
    evaluate_setting,
    iter_leaves,
    suggest,
)

if TYPE_CHECKING:
    import torch

DEFAULT_SEED = 0


@dataclass(frozen=True)
class Source:
    """One input of the merge: a checkpoint, where it is declared, and its parameters."""

    index: int  # position among the recipe's inputs, used for seeding
    where: str  # YAML path, e.g. "models[1]" or "slices[0].sources[1]"
    ckpt: Checkpoint
    parameters: Parameters | None
    origin: Checkpoint | None = None
    layer_start: int = 0
    # A recipe entry ``patch: PATH``: the deltas come from the patch (``ckpt`` is the base).
    patch: PatchDeltas | None = None


@dataclass(frozen=True)
class SliceGroup:
    """The inputs merged together for a run of output layers (mergekit's output slice)."""

    where: str
    sources: list[Source]  # non-base inputs (all inputs for methods that ignore the base)
    base: Source | None
    parameters: Parameters | None
    num_layers: int


@dataclass
class PlanItem:
    out: TensorInfo  # output name, shape, dtype (file is unused)
    group: SliceGroup
    names: list[str]  # tensor name in each source
    base_name: str | None
    t: float
    copy_only: bool = False  # non-float buffers are copied from the first input
    params: list[BaseModel] = field(default_factory=list)
    shared: BaseModel | None = None

    @property
    def read_bytes(self) -> int:
        total = 0
        for s, n in zip(self.group.sources, self.names):
            total += s.ckpt.info(n).nbytes
            if s.origin is not None:
                total += s.origin.info(n).nbytes
        if self.group.base is not None and self.base_name is not None:
            total += self.group.base.ckpt.info(self.base_name).nbytes
        return total


@dataclass
class Plan:
    recipe: Recipe
    method: MergeMethod
    items: list[PlanItem]
    reference: Checkpoint  # config, tokenizer and tensor-set source
    tokenizer_source: Checkpoint
    checkpoints: dict[str, Checkpoint]  # resolved path -> checkpoint
    num_layers: int
    seed: int
    warnings: list[str] = field(default_factory=list)

    @property
    def read_bytes(self) -> int:
        return sum(i.read_bytes for i in self.items)

    @property
    def write_bytes(self) -> int:
        return sum(i.out.nbytes for i in self.items)

    def estimated_peak_bytes(self, max_memory: int | None = None, device: str = "cpu") -> int:
        """Tensor data held at once: the largest item's working set plus the IO budgets."""
        if not self.items:
            return 0
        chunk, io_budget = _budgets(max_memory)
        return max(item_memory(self, i, device, chunk) for i in self.items) + 2 * io_budget

    @property
    def parents(self) -> list[str]:
        seen: list[str] = []
        for c in self.checkpoints.values():
            if c.ref not in seen:
                seen.append(c.ref)
        return seen


# =============================================================================== planning


class _Loader:
    def __init__(self, recipe_dir: Path | None, allow_pickle: bool):
        self.recipe_dir = recipe_dir
        self.allow_pickle = allow_pickle
        self.by_path: dict[str, Checkpoint] = {}

    def __call__(self, ref: str, where: str) -> Checkpoint:
        path = resolve_model(ref, where, self.recipe_dir)
        key = str(path)
        if key not in self.by_path:
            try:
                self.by_path[key] = Checkpoint(path, ref=ref, allow_pickle=self.allow_pickle)
            except UserError as exc:
                raise UserError(f"{where}: {exc}") from None
        return self.by_path[key]


def _check_param_names(recipe: Recipe, method: MergeMethod, warnings: list[str]) -> None:
    shared = param_keys(method.shared_params)
    per_model = param_keys(method.model_params)
    known = sorted(set(shared) | set(per_model))

    def check(params: Parameters | None, where: str, level: str) -> None:
        for key, setting in (params or {}).items():
            path = f"{where}.parameters.{key}" if where else f"parameters.{key}"
            if key not in shared and key not in per_model:
                listing = ", ".join(known) if known else "none"
                raise UserError(
                    f"{path}: unknown parameter {key!r} for {method.name}{suggest(key, known)} "
                    f"(its parameters: {listing})"
                )
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

    check(recipe.parameters, "", "top")
    for i, m in enumerate(recipe.models or []):
        check(m.parameters, f"models[{i}]", "model")
    for i, s in enumerate(recipe.slices or []):
        check(s.parameters, f"slices[{i}]", "top")
        for j, src in enumerate(s.sources):
            check(src.parameters, f"slices[{i}].sources[{j}]", "model")


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
            raise UserError(
                f"{prefix}.{key}: missing required parameter {key!r} (no value for tensor {tensor})"
            ) from None
        raise UserError(f"{prefix}.{key}: {err['msg']}") from None


def _check_compatible(ref: Checkpoint, others: list[tuple[str, Checkpoint]]) -> None:
    for where, c in others:
        if c.architecture != ref.architecture or c.model_type != ref.model_type:
            raise UserError(
                f"{where}: different architectures: {c.ref} is {c.architecture} "
                f"({c.model_type}), {ref.ref} is {ref.architecture} ({ref.model_type})"
            )
        if c.vocab_size != ref.vocab_size:
            raise UserError(
                f"{where}: different vocabulary sizes: {c.ref} has {c.vocab_size}, "
                f"{ref.ref} has {ref.vocab_size} (vocabulary merging is not supported; "
                "embeddings are never truncated silently)"
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


def _ordered_names(ckpt: Checkpoint) -> tuple[list[str], dict[int, list[str]], list[str]]:
    """Split a checkpoint's tensors into pre-layer, per-layer and post-layer names."""
    pre: list[str] = []
    post: list[str] = []
    layers: dict[int, list[str]] = {}
    for name in sorted(ckpt.tensors):
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


def _seed_for(seed: int, source_index: int, tensor: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{source_index}\x00{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _build_groups(
    recipe: Recipe, method: MergeMethod, load: _Loader, base: Checkpoint | None
) -> list[SliceGroup]:
    """Normalise ``models:`` (one group over every layer) and ``slices:`` into groups."""

    def origin_of(ref: str | None, where: str) -> Checkpoint | None:
        if ref is None:
            return None
        if method.kind != "delta":
            raise UserError(
                f"{where}.origin: only delta methods (task_arithmetic, ties, dare_*, "
                f"breadcrumbs*, della*) take an origin, not {method.name}"
            )
        return load(ref, f"{where}.origin")

    def is_base(ckpt: Checkpoint, group_base: Checkpoint | None) -> bool:
        # A base listed among the inputs of a method that needs one is the base, not an input.
        return group_base is not None and ckpt is group_base and method.base == "required"

    groups: list[SliceGroup] = []
    index = 0
    if recipe.models:
        sources: list[Source] = []
        for i, m in enumerate(recipe.models):
            where = f"models[{i}]"
            if m.patch is not None:
                if method.kind != "delta" or base is None:
                    raise UserError(
                        f"{where}.patch: only delta methods with a base_model (task_arithmetic, "
                        f"ties, dare_*, breadcrumbs*, della*) take a patch, not {method.name}"
                    )
                deltas = open_patch_source(m.patch, f"{where}.patch", load.recipe_dir, base)
                sources.append(Source(index, where, base, m.parameters, None, patch=deltas))
                index += 1
                continue
            assert m.model is not None
            ckpt = load(m.model, f"{where}.model")
            origin = origin_of(m.origin, where)
            if is_base(ckpt, base):
                if origin is not None:
                    raise UserError(f"{where}.origin: the base model cannot have an origin")
                continue
            sources.append(Source(index, where, ckpt, m.parameters, origin))
            index += 1
        layers = (base or sources[0].ckpt).num_layers if (base or sources) else 0
        base_src = Source(-1, "base_model", base, None) if base is not None else None
        groups.append(SliceGroup("models", sources, base_src, None, layers))
    else:
        assert recipe.slices is not None
        for i, s in enumerate(recipe.slices):
            sbase = load(s.base_model, f"slices[{i}].base_model") if s.base_model else base
            sources = []
            lengths = set()
            base_start = s.sources[0].layer_range[0]
            for j, src in enumerate(s.sources):
                where = f"slices[{i}].sources[{j}]"
                ckpt = load(src.model, f"{where}.model")
                a, b = src.layer_range
                if not (0 <= a < b <= ckpt.num_layers):
                    raise UserError(
                        f"{where}.layer_range: [{a}, {b}] is not a half-open range inside "
                        f"the model's {ckpt.num_layers} layers"
                    )
                lengths.add(b - a)
                origin = origin_of(src.origin, where)
                if is_base(ckpt, sbase):
                    base_start = a  # the base's layers come from its own source in the slice
                    continue
                sources.append(Source(index, where, ckpt, src.parameters, origin, a))
                index += 1
            if len(lengths) > 1:
                raise UserError(
                    f"slices[{i}].sources: every source of a slice needs the same number of "
                    f"layers, got {sorted(lengths)}"
                )
            base_src = None
            if sbase is not None:
                base_src = Source(-1, f"slices[{i}].base_model", sbase, None, None, base_start)
            groups.append(
                SliceGroup(f"slices[{i}]", sources, base_src, s.parameters, lengths.pop())
            )

    for g in groups:
        n = len(g.sources)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            what = "inputs besides the base model" if method.base == "required" else "inputs"
            if method.max_models == method.min_models:
                want = f"exactly {method.min_models}"
            else:
                want = f"at least {method.min_models}"
                if method.max_models is not None:
                    want += f" and at most {method.max_models}"
            raise UserError(f"{g.where}: {method.name} takes {want} {what}, got {n}")
    return groups


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


def build_plan(
    recipe: Recipe,
    *,
    recipe_dir: Path | None = None,
    seed: int | None = None,
    allow_pickle: bool = False,
) -> Plan:
    """Validate ``recipe`` against the checkpoints' headers and plan every output tensor.

    Output tensors follow the reference checkpoint (``base_model``, else the first input):
    its pre-layer tensors (embeddings) from the first group, the layers group by group, then
    its post-layer tensors (final norm, lm_head) from the last group, as mergekit does.
    """
    from mergekit_math.io.model_files import chat_template_text

    method = get_method(recipe.merge_method)
    warnings: list[str] = []
    _check_param_names(recipe, method, warnings)
    chat_template_text(recipe.chat_template)  # an unknown template name fails here
    load = _Loader(recipe_dir, allow_pickle)

    if method.base == "required" and not recipe.base_model:
        raise UserError(f"base_model: {method.name} needs a base_model")
    base = load(recipe.base_model, "base_model") if recipe.base_model else None
    groups = _build_groups(recipe, method, load, base)

    reference = base or groups[0].sources[0].ckpt
    wheres = {id(s.ckpt): s.where for g in groups for s in g.sources}
    _check_compatible(
        reference,
        [(wheres.get(id(c), c.ref), c) for c in load.by_path.values() if c is not reference],
    )
    seed = seed if seed is not None else (recipe.seed if recipe.seed is not None else DEFAULT_SEED)
    out_dtype = recipe.out_dtype or recipe.dtype
    items: list[PlanItem] = []

    def add(
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
                (out_dtype or ref_info.dtype) if is_float else ref_info.dtype,
                ref_info.shape,
            ),
            group=group,
            names=names,
            base_name=base_name,
            t=t,
            copy_only=not is_float,
        )
        if not item.copy_only:
            _resolve_item_params(recipe, method, item)
        items.append(item)

    pre, layers, post = _ordered_names(reference)
    tied_extra = {n for n in TIED_WEIGHTS if n not in reference.tensors}
    expected = set(reference.tensors) | tied_extra
    for g in groups:
        for s in g.sources:
            extra = sorted(set(s.ckpt.tensors) - expected)
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

    def non_layer(name: str, g: SliceGroup) -> None:
        add(name, g, [name] * len(g.sources), name if g.base else None, 0.0, reference, name)

    for name in pre:
        non_layer(name, groups[0])
    out_layer = 0
    for g in groups:
        template = g.sources[0]
        template_layers = _ordered_names(template.ckpt)[1] if recipe.slices else layers
        for j in range(g.num_layers):
            # t runs from 0 to 1 across the group's layers (1 for a single layer, as mergekit)
            t = j / (g.num_layers - 1) if g.num_layers > 1 else 1.0
            names_j = template_layers.get(template.layer_start + j if recipe.slices else j, [])
            for templ in names_j:
                base_name = _layer_name(templ, g.base.layer_start + j) if g.base else None
                add(
                    _layer_name(templ, out_layer),
                    g,
                    [_layer_name(templ, s.layer_start + j) for s in g.sources],
                    base_name,
                    t,
                    template.ckpt if recipe.slices else reference,
                    templ,
                )
            out_layer += 1
    for name in post:
        non_layer(name, groups[-1])

    tok_ref = recipe.tokenizer_source
    tokenizer = reference if tok_ref in (None, "base") else load(tok_ref, "tokenizer_source")
    return Plan(
        recipe=recipe,
        method=method,
        items=items,
        reference=reference,
        tokenizer_source=tokenizer,
        checkpoints=load.by_path,
        num_layers=out_layer,
        seed=seed,
        warnings=warnings,
    )


# =============================================================================== execution


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


# Elements per chunk for methods that run on chunks (CPU): small enough that a chunk's inputs
# and temporaries stay in the CPU caches, large enough that per-op overhead is negligible.
CHUNK_ELEMENTS = 1 << 18
# Bytes the reader thread may run ahead, and the writer thread behind, by default.
IO_BUDGET = 64 * 2**20


@dataclass
class _Run:
    """What ``execute`` shares with :func:`compute_item` while it runs."""

    prefetch: Prefetcher | None
    chunk: int
    pool: ThreadPoolExecutor | None = None
    workers: int = 1
    scratch: torch.Tensor | None = None  # see _scratch
    strict_finite: bool = False  # refuse inputs with NaN/inf instead of warning
    warn: Callable[[str], None] | None = None


_active: ContextVar[_Run | None] = ContextVar("mmath_run", default=None)


def is_chunked(plan: Plan, item: PlanItem, device: str = "cpu") -> bool:
    """Whether ``item`` runs on flat chunks (copies always do; methods when they can)."""
    if item.copy_only:
        return True
    chunkable = plan.method.chunkable
    return device == "cpu" and chunkable is not None and chunkable(item.shared, item.params)  # type: ignore[arg-type]


def item_ranges(plan: Plan, item: PlanItem, device: str, chunk: int) -> list[tuple[int, int]]:
    n = item.out.numel
    if n <= chunk or not is_chunked(plan, item, device):
        return [(0, n)]
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _item_inputs(plan: Plan, item: PlanItem) -> list[tuple[str, Checkpoint, str]]:
    """(role, checkpoint, tensor name) of every tensor an item reads, in a fixed order:
    ``base``, then per source ``source`` and, when it has its own origin, ``origin``."""
    g = item.group
    if item.copy_only:
        if g.base is not None and item.base_name:
            return [("source", g.base.ckpt, item.base_name)]
        return [("source", g.sources[0].ckpt, item.names[0])]
    out: list[tuple[str, Checkpoint, str]] = []
    if g.base is not None and item.base_name:
        out.append(("base", g.base.ckpt, item.base_name))
    for s, name in zip(g.sources, item.names):
        if s.patch is not None:
            out.append(("delta", s.patch, name))  # type: ignore[arg-type]
            continue
        out.append(("source", s.ckpt, name))
        if s.origin is not None and plan.method.kind == "delta":
            out.append(("origin", s.origin, name))
    return out


def _input_wheres(plan: Plan, item: PlanItem) -> list[str]:
    """The YAML path of each input of :func:`_item_inputs` (same order), for messages."""
    g = item.group
    out: list[str] = []
    if g.base is not None and item.base_name:
        out.append(g.base.where)
    for s in g.sources:
        if s.patch is not None:
            out.append(f"{s.where}.patch")
            continue
        out.append(s.where)
        if s.origin is not None and plan.method.kind == "delta":
            out.append(f"{s.where}.origin")
    return out


class _FiniteCheck:
    """Counts the NaN/inf values of each input of one output tensor as its ranges are read
    (they would pass through every method into the output), to warn once per tensor and
    input, or refuses them with ``strict``.

    One sum per input range is the test (NaN and inf survive a sum); only a sum that is not
    finite (or overflowed) counts the values exactly.
    """

    def __init__(self, plan: Plan, item: PlanItem, run: _Run):
        self.inputs = [
            (f"{where} ({ckpt.ref})", name)
            for where, (_, ckpt, name) in zip(_input_wheres(plan, item), _item_inputs(plan, item))
        ]
        self.counts = [0] * len(self.inputs)
        self.strict = run.strict_finite
        self.warn = run.warn
        self._lock = threading.Lock()

    def __call__(self, i: int, x: torch.Tensor) -> None:
        import torch

        wide = x.dtype if x.dtype == torch.float64 else torch.float32
        if bool(torch.isfinite(x.sum(dtype=wide))):
            return
        bad = x.numel() - int(torch.isfinite(x).sum())
        if not bad:
            return
        where, name = self.inputs[i]
        if self.strict:
            raise UserError(
                f"{where}: tensor {name} has non-finite values (NaN or inf); "
                "nothing was written (--strict-finite)"
            )
        with self._lock:
            self.counts[i] += bad

    def report(self) -> None:
        for (where, name), bad in zip(self.inputs, self.counts):
            if bad and self.warn is not None:
                self.warn(f"{where}: tensor {name} has {bad} non-finite values (NaN or inf)")


def _warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def _range_bytes(plan: Plan, item: PlanItem, start: int, end: int) -> int:
    return sum((end - start) * ITEMSIZE[c.info(n).dtype] for _, c, n in _item_inputs(plan, item))


def _read_range(
    plan: Plan, item: PlanItem, start: int, end: int, pin: bool = False
) -> list[torch.Tensor]:
    """The raw (stored dtype) inputs of ``item`` for flat elements ``[start, end)``."""
    import torch

    out = []
    for _, ckpt, name in _item_inputs(plan, item):
        buf = None
        if pin:
            info = ckpt.info(name)
            size = (end - start) * ITEMSIZE[info.dtype]
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        out.append(ckpt.read_range(name, start, end, out=buf))
    return out


def _prefault(plan: Plan, item: PlanItem, start: int, end: int, pin: bool = False) -> list:
    """:func:`_read_range`, touching one byte per page so the page faults of the mapped
    views happen here (in the read-ahead thread) rather than in the computation."""
    import torch

    views = _read_range(plan, item, start, end, pin)
    for v in views:
        if not pin and v.numel():
            v.view(torch.uint8)[:: mmap.PAGESIZE].sum()
    return views


def _release_range(plan: Plan, item: PlanItem, start: int, end: int) -> None:
    for _, ckpt, name in _item_inputs(plan, item):
        ckpt.release_range(name, start, end)


def compute_item(plan: Plan, item: PlanItem, device: str = "cpu") -> Iterator[torch.Tensor]:
    """Read one output tensor's inputs, run the method, yield the result in the output dtype.

    Yields the tensor whole, or as consecutive flat chunks when the method runs on chunks.
    Inside :func:`execute` the inputs come from its read-ahead thread.
    """
    import torch

    from mergekit_math.methods import MergeInputs, PrepareInputs

    run = _active.get()
    chunk = run.chunk if run is not None else CHUNK_ELEMENTS
    ranges = item_ranges(plan, item, device, chunk)
    whole = len(ranges) == 1

    def fetch(start: int, end: int) -> tuple[list[torch.Tensor], int]:
        if run is None or run.prefetch is None:
            return _read_range(plan, item, start, end), 0
        return run.prefetch.get(item, start, end)

    def release(nbytes: int) -> None:
        if run is not None and run.prefetch is not None and nbytes:
            run.prefetch.done(nbytes)

    inputs = _item_inputs(plan, item)
    roles = [r for r, _, _ in inputs]
    shapes = [c.info(n).shape for _, c, n in inputs]
    if item.copy_only:
        for start, end in ranges:
            raw, nbytes = fetch(start, end)
            part = raw[0].reshape(shapes[0]) if whole else raw[0]
            release(nbytes)
            yield part
        return

    recipe = plan.recipe
    compute = _torch_dtype(recipe.compute_dtype)
    load = _torch_dtype(recipe.dtype) if recipe.dtype else None
    out_dtype = _torch_dtype(item.out.dtype)
    delta_kind = plan.method.kind == "delta"
    finite = _FiniteCheck(plan, item, run) if run is not None else None

    def upcast(t: torch.Tensor) -> torch.Tensor:
        y = t.to(load) if load is not None else t
        y = y.to(device=device, dtype=compute, non_blocking=True)
        # never compute in place on the file mapping
        return y.clone() if y.data_ptr() == t.data_ptr() and y.numel() else y

    def inputs_of(
        raw: list[torch.Tensor], shaped: bool, check: bool = True
    ) -> tuple[Any, list[torch.Tensor]]:
        """(base, per-source tensor or delta) in the compute dtype from one range's raw data."""
        if shaped:
            raw = [t.reshape(shape) for t, shape in zip(raw, shapes)]
        check = check and finite is not None

        def checked(i: int, x: torch.Tensor) -> torch.Tensor:
            if check:
                finite(i, x)  # type: ignore[misc]
            return x

        base = None
        tensors: list[torch.Tensor] = []
        i = 0
        while i < len(raw):
            role = roles[i]
            if role == "base":
                base = checked(i, upcast(raw[i]))
            elif role == "delta":  # from a patch: already a delta, not rounded to ``dtype``
                d = raw[i].to(device=device, dtype=compute)
                d = d.clone() if d.data_ptr() == raw[i].data_ptr() else d
                tensors.append(checked(i, d))
            else:
                x = checked(i, upcast(raw[i]))
                if delta_kind:
                    if i + 1 < len(raw) and roles[i + 1] == "origin":
                        i += 1
                        x = x.sub_(checked(i, upcast(raw[i])))
                    else:
                        assert base is not None
                        x = x.sub_(base)
                tensors.append(x)
            i += 1
        return base, tensors

    generators = None
    if plan.method.random:
        generators = []
        for s in item.group.sources:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(_seed_for(plan.seed, s.index, item.out.name))
            generators.append(gen)

    states = None
    if not whole and plan.method.prepare is not None:

        def fill(buf: torch.Tensor, i: int, start: int, end: int) -> None:
            # no finite check: the merge pass reads these ranges again and checks them
            _, deltas = inputs_of(_read_range(plan, item, start, end), shaped=False, check=False)
            buf[start:end] = deltas[i]
            _release_range(plan, item, start, end)

        def full_delta(i: int) -> torch.Tensor:
            buf = _scratch(run, item.out.numel, compute, device)
            pool = run.pool if run is not None else None
            if pool is None:
                for start, end in ranges:
                    fill(buf, i, start, end)
            else:
                for future in [pool.submit(_in_worker, fill, buf, i, s, e) for s, e in ranges]:
                    future.result()
            return buf

        states = plan.method.prepare(
            PrepareInputs(
                shared=item.shared,  # type: ignore[arg-type]
                params=item.params,
                generators=generators,
                numel=item.out.numel,
                ranges=ranges,
                delta=full_delta,
            )
        )

    def compute_range(raw: list[torch.Tensor], start: int, end: int) -> torch.Tensor:
        base, tensors = inputs_of(raw, shaped=whole)
        result = plan.method.merge(
            MergeInputs(
                base=base,
                tensors=tensors,
                params=item.params,
                shared=item.shared,  # type: ignore[arg-type]
                generators=generators,
                offset=start,
                states=states,
            )
        )
        result = result.to(out_dtype).cpu()
        _release_range(plan, item, start, end)
        return result

    pool = run.pool if run is not None else None
    if whole or pool is None:
        for start, end in ranges:
            raw, nbytes = fetch(start, end)
            result = compute_range(raw, start, end)
            del raw
            release(nbytes)
            yield result
        if finite is not None:
            finite.report()
        return
    # Chunks run on the worker threads (one intra-op thread each); results come out in order.
    pending: deque[tuple[Future[torch.Tensor], int]] = deque()
    # Chunks in flight hold read-ahead budget until their result is taken: keep them few
    # enough that the reader can always fetch the next one.
    unit = max(1, _range_bytes(plan, item, *ranges[0]))
    depth = max(1, min(2 * run.workers, run.prefetch.budget.limit // unit - 1))  # type: ignore[union-attr]
    try:
        for start, end in ranges:
            raw, nbytes = fetch(start, end)
            pending.append((pool.submit(_in_worker, compute_range, raw, start, end), nbytes))
            del raw
            if len(pending) >= depth:
                future, nbytes = pending.popleft()
                result = future.result()
                release(nbytes)
                yield result
        while pending:
            future, nbytes = pending.popleft()
            result = future.result()
            release(nbytes)
            yield result
    finally:
        for future, _ in pending:
            future.cancel()
    if finite is not None:
        finite.report()


def _scratch(run: _Run | None, numel: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A tensor of ``numel`` elements reused across tensors: a fresh allocation of the
    largest tensor per item costs a page fault per 4 KB every time."""
    import torch

    if run is None:
        return torch.empty(numel, dtype=dtype, device=device)
    buf = run.scratch
    want = torch.device(device)
    same_device = buf is not None and buf.device.type == want.type
    if same_device and want.index is not None:
        same_device = buf.device.index == want.index  # type: ignore[union-attr]
    if buf is None or buf.numel() < numel or buf.dtype != dtype or not same_device:
        run.scratch = buf = None  # free the old one first
        run.scratch = buf = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _in_worker(fn: Callable[..., Any], *args: Any) -> Any:
    import torch

    with torch.inference_mode():
        return fn(*args)


def item_memory(
    plan: Plan, item: PlanItem, device: str = "cpu", chunk: int = CHUNK_ELEMENTS
) -> int:
    """Bytes of tensor data one item holds at once while it is computed (an estimate)."""
    n = item.out.numel
    inputs = _item_inputs(plan, item)
    raw = sum(ITEMSIZE[c.info(name).dtype] for _, c, name in inputs)
    if item.copy_only:
        return min(n, chunk) * raw
    cbytes = ITEMSIZE[plan.recipe.compute_dtype]
    per_element = raw + cbytes * (2 * len(inputs) + 4)
    if len(item_ranges(plan, item, device, chunk)) == 1:
        return n * per_element
    prepare = plan.method.prepare_buffers
    buffers = prepare(item.shared, item.params) if prepare is not None else 0  # type: ignore[arg-type]
    return chunk * per_element + buffers * n * cbytes


def _budgets(max_memory: int | None) -> tuple[int, int]:
    """(chunk elements, IO budget in bytes) for a memory limit."""
    if max_memory is None:
        return CHUNK_ELEMENTS, IO_BUDGET
    io_budget = max(1 << 20, min(IO_BUDGET, max_memory // 8))
    chunk = max(4096, min(CHUNK_ELEMENTS, max_memory // 8 // 64))
    return chunk, io_budget


def check_memory(plan: Plan, max_memory: int, device: str = "cpu") -> None:
    """Raise UserError when some tensor needs more than ``max_memory`` at once."""
    chunk, io_budget = _budgets(max_memory)
    for item in plan.items:
        need = item_memory(plan, item, device, chunk) + 2 * io_budget
        if need > max_memory:
            how = "on chunks" if is_chunked(plan, item, device) else "whole (it cannot be chunked)"
            raise UserError(
                f"--max-memory {human_bytes(max_memory)}: {item.out.name} "
                f"{list(item.out.shape)} needs about {human_bytes(need)} with {plan.method.name} "
                f"{how}; raise the limit"
            )


def execute(
    plan: Plan,
    out_dir: Path,
    *,
    device: str = "cpu",
    max_shard_size: int = 5 * 10**9,
    force: bool = False,
    progress: bool = True,
    on_tensor: Callable[[PlanItem], None] | None = None,
    max_memory: int | None = None,
    chunk_elements: int | None = None,
    threads: int | None = None,
    strict_finite: bool = False,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Run the plan into ``out_dir`` atomically; returns the final path.

    A reader thread reads the inputs ahead (pinned memory for CUDA), the main thread computes
    and a writer thread streams the results into the shards; ``max_memory`` bounds the bytes
    of tensor data held at once by shrinking chunks and read-ahead (checked before any read).

    An input tensor with NaN or inf values gets one warning per tensor and input (``warn``,
    default: a ``warning:`` line on stderr); with ``strict_finite`` it stops the merge with a
    :class:`UserError` and nothing is written.
    """
    import torch

    from mergekit_math.io.model_files import write_model_files
    from mergekit_math.io.writer import ShardedWriter

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    if max_memory is not None:
        check_memory(plan, max_memory, device)
    chunk, io_budget = _budgets(max_memory)
    if chunk_elements is not None:
        chunk = chunk_elements
    pin = device.startswith("cuda")
    out_dir = Path(out_dir)
    with atomic_output(out_dir, force) as tmp:
        writer = ShardedWriter(tmp, [i.out for i in plan.items], max_shard_size)
        bar = byte_progress(plan.write_bytes, f"merge {plan.method.name}", progress)
        units = (
            Unit(
                item,
                start,
                end,
                _range_bytes(plan, item, start, end),
                partial(_prefault, plan, item, start, end, pin),
            )
            for item in plan.items
            for start, end in item_ranges(plan, item, device, chunk)
        )
        prefetch = Prefetcher(units, io_budget)
        writes = WriterThread(
            lambda part, name, last: writer.write_part(name, part, last), io_budget
        )
        workers = threads or torch.get_num_threads()
        pool = ThreadPoolExecutor(
            workers,
            thread_name_prefix="mmath-compute",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        run = _Run(prefetch, chunk, pool, workers, strict_finite=strict_finite, warn=warn or _warn)
        token = _active.set(run)
        try:
            with torch.inference_mode():
                for item in plan.items:
                    parts = compute_item(plan, item, device)
                    if isinstance(parts, torch.Tensor):
                        parts = iter([parts])
                    name = item.out.name
                    pending = next(parts)
                    for part in parts:
                        writes.put(pending, name, False)
                        bar.update(pending.numel() * pending.element_size())
                        pending = part
                    writes.put(pending, name, True)
                    bar.update(pending.numel() * pending.element_size())
                    del pending
                    if on_tensor is not None:
                        on_tensor(item)
            writes.finish()
            writer.close()
        except BaseException:
            writes.abort()
            writer.abort()
            raise
        finally:
            _active.reset(token)
            pool.shutdown(wait=True, cancel_futures=True)
            prefetch.close()
            bar.close()
            for c in plan.checkpoints.values():
                c.close()
            for g in {id(i.group): i.group for i in plan.items}.values():
                for s in g.sources:
                    if s.patch is not None:
                        s.patch.close()
        write_model_files(plan, tmp)
    return out_dir.absolute()
