"""``mmath patch apply``: out = NEW + S·Δ, streamed tensor by tensor into an atomic output.

:func:`plan_apply` opens the patch and NEW and checks architecture, tensor presence and shapes
from headers; nothing is read or written when it fails. :func:`apply_patch` computes each
patched tensor in float32 (float64 for float64 patches or bases), casts it to NEW's dtype,
copies every other tensor byte for byte, and writes config, generation config, tokenizer files
and a model card recording the patch's provenance.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mergekit_math import __version__
from mergekit_math.errors import UserError
from mergekit_math.io.model_files import TOKENIZER_FILES
from mergekit_math.io.reader import Checkpoint, TensorInfo
from mergekit_math.patch.format import Patch

# Copied unchanged from NEW next to the weights.
MODEL_FILES = ("config.json", "generation_config.json") + TOKENIZER_FILES


@dataclass
class ApplyPlan:
    patch: Patch
    base: Checkpoint
    scale: float
    outputs: list[TensorInfo]  # every tensor of NEW, in its file order
    same_base: bool  # NEW is the base the patch was extracted against
    warnings: list[str] = field(default_factory=list)

    @property
    def write_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


def plan_apply(patch: str | Path, base: str | Path, scale: float = 1.0) -> ApplyPlan:
    """Open and check the patch and NEW (headers and a few sampled values only)."""
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise UserError(f"--scale must be a finite number, got {scale}")
    p = Patch.open(patch)
    try:
        ckpt = Checkpoint(base)
    except UserError as exc:
        raise UserError(f"--base: {exc}") from None
    same = p.check_against(ckpt, "--base")
    warnings = []
    if same:
        warnings.append(
            f"{ckpt.ref} is the base the patch was extracted from (same fingerprint): this "
            "rebuilds the fine-tune (exactly for a dense patch) rather than porting it"
        )
    outputs = sorted(ckpt.tensors.values(), key=lambda t: (str(t.file), t.offset))
    return ApplyPlan(p, ckpt, scale, outputs, same, warnings)


def apply_patch(
    plan: ApplyPlan,
    out_dir: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    max_shard_size: int = 5 * 10**9,
    command: str | None = None,
) -> Path:
    """Write NEW + scale·Δ to ``out_dir`` atomically; returns its absolute path."""
    import torch

    from mergekit_math.io.atomic import atomic_output
    from mergekit_math.io.progress import byte_progress
    from mergekit_math.io.writer import ShardedWriter

    out_dir = Path(out_dir)
    patch, base = plan.patch, plan.base
    with atomic_output(out_dir, force) as tmp:
        writer = ShardedWriter(tmp, plan.outputs, max_shard_size)
        bar = byte_progress(plan.write_bytes, "patch apply", progress)
        try:
            with torch.inference_mode():
                for info in plan.outputs:
                    tensor = base.read(info.name)
                    entry = patch.tensors.get(info.name)
                    if entry is not None:
                        wide = entry.storage_dtype == "float64" or info.dtype == "float64"
                        cdtype = torch.float64 if wide else torch.float32
                        delta = patch.delta(info.name, cdtype)
                        if plan.scale != 1:
                            delta.mul_(plan.scale)
                        tensor = (tensor.to(cdtype) + delta).to(tensor.dtype)
                        del delta
                    writer.write(info.name, tensor)
                    del tensor
                    bar.update(info.nbytes)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
            base.close()
            patch.close()
        copy_model_files(base.path, tmp)
        (tmp / "README.md").write_text(model_card(plan, command or apply_command(plan, out_dir)))
    return out_dir.absolute()


def copy_model_files(src: Path, out: Path) -> None:
    """config.json, generation_config.json and the tokenizer files of NEW, unchanged."""
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def apply_command(plan: ApplyPlan, out_dir: Path) -> str:
    """The ``mmath patch apply`` command that rebuilds the output."""
    args = ["mmath", "patch", "apply", "--patch", str(plan.patch.path), "--base", plan.base.ref]
    args += ["-o", str(out_dir)]
    if plan.scale != 1:
        args += ["--scale", repr(plan.scale)]
    return shlex.join(args)


def model_card(plan: ApplyPlan, command: str) -> str:
    from mergekit_math.hub.card import split_parents

    m = plan.patch.manifest
    src = m.source
    # base_model lists Hub ids only (the rule of mmath merge and push); the base is in the text.
    hub, _ = split_parents([plan.base.ref], {plan.base.ref: plan.base.path})
    front = {
        **({"base_model": hub} if hub else {}),
        "library_name": "transformers",
        "tags": ["mergekit-math", "portllm", "model-patch"],
    }
    encodings: dict[str, int] = {}
    for e in m.tensors.values():
        encodings[e.encoding] = encodings.get(e.encoding, 0) + 1
    enc = ", ".join(f"{k} ×{v}" for k, v in sorted(encodings.items()))
    made_from = f"LoRA adapter `{src.lora}`" if src.kind == "lora" else f"`{src.finetuned}`"
    provenance = {
        "patch": str(plan.patch.path.resolve()),
        "format_version": m.format_version,
        "created_by": m.created_by,
        "source": src.model_dump(exclude_none=True),
        "encoding": m.encoding,
        "options": m.options,
        "tensors": len(m.tensors),
        "scale": plan.scale,
    }
    return (
        "---\n"
        + yaml.safe_dump(front, sort_keys=False)
        + "---\n\n"
        + "# Patched model\n\n"
        + "This model was made with [mergekit-math](https://pypi.org/project/mergekit-math/) "
        + f"{__version__} by adding a portable patch ([PortLLM](https://arxiv.org/abs/2410.10870))"
        + f" to `{plan.base.path.resolve()}`: out = base + {plan.scale!r}·Δ.\n\n"
        + f"The patch Δ was extracted from {made_from} against the base `{src.base}` "
        + f"({m.architecture}), and covers {len(m.tensors)} tensors ({enc}).\n\n"
        + "## Commands\n\n"
        + f"```bash\n{m.command}\n{command}\n```\n\n"
        + "## Patch provenance\n\n"
        + f"```json\n{json.dumps(provenance, indent=2)}\n```\n"
    )
