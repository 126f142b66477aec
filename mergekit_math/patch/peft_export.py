"""Export a patch's low-rank tensors as a PEFT LoRA adapter (``mmath patch export``).

A ``lowrank`` entry stores Δ ≈ B·A in the base weight's layout. PEFT's merged weight is
``W + scaling · B'·A'`` (transposed for embeddings and for transformers' ``Conv1D`` layers,
GPT-2's ``fan_in_fan_out``), so each entry becomes one LoRA module with ``lora_alpha = r``
(scaling 1) and:

* ``nn.Linear``: ``lora_A = A`` (r × in), ``lora_B = B`` (out × r);
* ``nn.Embedding`` (``embed_tokens``, ``wte``, ...): ``lora_embedding_A = Bᵀ`` (r × vocab),
  ``lora_embedding_B = Aᵀ`` (dim × r);
* ``Conv1D`` (weight in × out): ``lora_A = Bᵀ`` (r × in), ``lora_B = Aᵀ`` (out × r).

``target_modules`` lists the exact module names; the most common rank is ``r`` and the others
go to ``rank_pattern``/``alpha_pattern`` (keys are ``re.escape``d module names, matched by PEFT
as ``(.*\\.)?(KEY)$``). Factors keep their storage dtype.

What a LoRA cannot express is left out and reported, never silently: ``dense`` entries (1-D
norms and biases, embeddings and ``lm_head`` unless extracted with ``--lowrank-embeddings``,
matrices whose factors would not be smaller), ``sparse`` entries. The adapter then holds
only part of the patch; :attr:`ExportPlan.left_out` names those tensors (with their share
of Σ‖Δ‖²) for the warning, and ``--strict`` refuses instead. ``modules_to_save`` is not used
for them: it stores whole modules (base + Δ), so the adapter would carry base weights and
stop being a patch.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_math.errors import UserError
from mergekit_math.patch.format import Patch
from mergekit_math.patch.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONV1D_MODULES, PEFT_PREFIX

if TYPE_CHECKING:
    from mergekit_math.patch.extract import ExtractPlan

# Input embeddings (nn.Embedding) by module name; lm_head and GPT-NeoX's embed_out are Linear.
EMBEDDING_MODULE = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|embed_in)$")


@dataclass
class ExportModule:
    name: str  # the patch tensor (base weight)
    module: str  # PEFT's module name
    kind: str  # "linear", "embedding" or "conv1d"
    rank: int


@dataclass
class ExportPlan:
    patch: Patch
    modules: list[ExportModule]
    left_out: list[str] = field(default_factory=list)  # patch tensors not in the adapter
    left_out_share: float = 0.0  # their share of Σ‖Δ‖² (from the manifest)

    def warning(self) -> str | None:
        if not self.left_out:
            return None
        names = ", ".join(self.left_out[:5]) + (", ..." if len(self.left_out) > 5 else "")
        return (
            f"{len(self.left_out)} tensor(s) of the patch are not low-rank matrices and are not "
            f"in the adapter ({100 * self.left_out_share:.2g}% of Σ‖Δ‖²): {names}; "
            "apply them with `mmath patch apply` or re-extract with --encoding lowrank "
            "(--lowrank-embeddings for embeddings)"
        )


def plan_export(path: str | Path, strict: bool = False) -> ExportPlan:
    """Which patch tensors become LoRA modules (from the manifest only)."""
    patch = Patch.open(path)
    conv1d = CONV1D_MODULES.get(patch.model_type)
    modules: list[ExportModule] = []
    left_out: list[str] = []
    for name, e in patch.tensors.items():
        if e.encoding != "lowrank" or len(e.shape) != 2 or not name.endswith(".weight"):
            left_out.append(name)
            continue
        module = name.removesuffix(".weight")
        if EMBEDDING_MODULE.search(module):
            kind = "embedding"
        elif conv1d is not None and conv1d.search(module):
            kind = "conv1d"
        else:
            kind = "linear"
        assert e.rank is not None
        modules.append(ExportModule(name, module, kind, e.rank))
    total = sum(e.delta_norm**2 for e in patch.tensors.values())
    share = sum(patch.tensors[n].delta_norm ** 2 for n in left_out) / total if total else 0.0
    plan = ExportPlan(patch, modules, left_out, share)
    if not modules:
        patch.close()
        raise UserError(
            f"{path}: no low-rank tensor to export (encodings: "
            f"{', '.join(sorted({e.encoding for e in patch.tensors.values()}))}); extract the "
            "patch with --encoding lowrank"
        )
    if strict and left_out:
        patch.close()
        raise UserError(f"--strict: {plan.warning()}")
    return plan


def adapter_config(plan: ExportPlan) -> dict:
    """``adapter_config.json``: PEFT's LoraConfig fields, scaling 1 for every module."""
    ranks = Counter(m.rank for m in plan.modules)
    r = max(ranks, key=lambda k: (ranks[k], k))
    pattern = {re.escape(m.module): m.rank for m in plan.modules if m.rank != r}
    p = plan.patch
    arch = p.architecture
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if arch.endswith("ForCausalLM") else None,
        "base_model_name_or_path": p.manifest.source.base,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(m.module for m in plan.modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(m.kind == "conv1d" for m in plan.modules),
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _factors(plan: ExportPlan, m: ExportModule) -> dict[str, object]:
    """PEFT's stored factors of one module (see the module docstring for the layouts)."""
    from mergekit_math.patch.entry import PART_SEP

    b = plan.patch.read_part(f"{m.name}{PART_SEP}B")
    a = plan.patch.read_part(f"{m.name}{PART_SEP}A")
    key = f"{PEFT_PREFIX}{m.module}"
    if m.kind == "embedding":
        return {
            f"{key}.lora_embedding_A": b.T.contiguous(),
            f"{key}.lora_embedding_B": a.T.contiguous(),
        }
    if m.kind == "conv1d":
        return {f"{key}.lora_A.weight": b.T.contiguous(), f"{key}.lora_B.weight": a.T.contiguous()}
    return {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}


def export_peft(
    plan: ExportPlan, out_dir: str | Path, force: bool = False, provenance: str | None = None
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out_dir``
    (atomically, one module's factors in memory at a time); returns its absolute path.
    ``provenance`` (metadata ``mmath_source``): the patch folder unless given."""
    from mergekit_math.io.atomic import atomic_output
    from mergekit_math.patch.format import PatchFileWriter

    out_dir = Path(out_dir)
    try:
        with atomic_output(out_dir, force) as tmp:
            writer = PatchFileWriter(tmp / ADAPTER_WEIGHTS)
            try:
                for m in plan.modules:
                    for key, tensor in _factors(plan, m).items():
                        writer.add(key, tensor)  # type: ignore[arg-type]
                source = provenance or f"mmath patch export {plan.patch.path.resolve()}"
                meta = {"format": "pt", "mmath_source": source}
                if plan.left_out:
                    meta["mmath_left_out"] = json.dumps(plan.left_out)
                writer.finish(meta)
            except BaseException:
                writer.abort()
                raise
            text = json.dumps(adapter_config(plan), indent=2) + "\n"
            (tmp / ADAPTER_CONFIG).write_text(text)
    finally:
        plan.patch.close()
    return out_dir.absolute()


def extract_to_peft(
    extract_plan: ExtractPlan,
    out_dir: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    strict: bool = False,
) -> tuple[Path, ExportPlan]:
    """``mmath patch extract --format peft``: extract into a temporary patch next to
    ``out_dir``, export it, and remove it; returns the adapter folder and what was exported."""
    import shlex
    import tempfile

    from mergekit_math.patch.extract import command_line, extract

    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    command = command_line(extract_plan, out_dir) + " " + shlex.join(["--format", "peft"])
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.patch-", dir=out_dir.parent) as tmp:
        patch_dir = extract(extract_plan, Path(tmp) / "patch", progress=progress, command=command)
        plan = plan_export(patch_dir, strict=strict)
        return export_peft(plan, out_dir, force, provenance=command), plan
