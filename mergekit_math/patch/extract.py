"""``mmath patch extract``: Δ = finetuned − base (or a LoRA adapter's ΔW), encoded tensor by
tensor into a patch folder.

:func:`plan_extract` checks everything from headers (architectures, tensor sets, shapes, the
adapter) before any weight is read; :func:`extract` streams one tensor at a time (memory is a
few copies of the largest tensor), writes into a temporary folder and renames it into place.
:func:`measure_errors` compares a patch with the exact delta of two checkpoints.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergekit_math import __version__
from mergekit_math.errors import UserError
from mergekit_math.io.reader import FLOAT_DTYPES, Checkpoint
from mergekit_math.patch.entry import PART_SEP, Encoding, PatchEntry, StorageDtype
from mergekit_math.patch.format import (
    FORMAT,
    MANIFEST,
    WEIGHTS,
    Patch,
    PatchManifest,
    PatchSource,
    fingerprint,
)

if TYPE_CHECKING:
    import torch

    from mergekit_math.patch.encode import Encoded
    from mergekit_math.patch.lora import LoraAdapter


class ExtractOptions(BaseModel):
    """How deltas are selected and encoded (the options of ``mmath patch extract``)."""

    model_config = ConfigDict(extra="forbid")

    encoding: Encoding = "dense"
    rank: int | None = Field(None, ge=1, description="lowrank: fixed rank R.")
    energy: float | None = Field(
        None, gt=0.0, le=1.0, description="lowrank: smallest rank keeping this fraction of Σσ²."
    )
    drop: float = Field(0.9, ge=0.0, lt=1.0, description="sparse: DARE drop rate p.")
    seed: int = Field(0, description="sparse: seed of the per-tensor drop masks.")
    include: str | None = Field(None, description="Only tensors whose name matches (re.search).")
    exclude: str | None = Field(None, description="Leave out tensors whose name matches.")
    dtype: StorageDtype = Field("float32", description="Storage dtype of values and factors.")
    lowrank_embeddings: bool = Field(
        False, description="lowrank: also factorize embeddings and lm_head (default: dense)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ExtractOptions:
        if self.rank is not None and self.energy is not None:
            raise ValueError("--rank and --energy exclude each other")
        for flag in ("include", "exclude"):
            pattern = getattr(self, flag)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"--{flag}: invalid regular expression ({exc})") from None
        return self

    def selects(self, name: str) -> bool:
        if self.include is not None and not re.search(self.include, name):
            return False
        return self.exclude is None or not re.search(self.exclude, name)


@dataclass
class ExtractPlan:
    base: Checkpoint
    options: ExtractOptions
    names: list[str]  # base tensors to encode, in base order
    finetuned: Checkpoint | None = None
    lora: LoraAdapter | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def read_bytes(self) -> int:
        return sum(self.base.tensors[n].nbytes for n in self.names)


def make_options(**kwargs: object) -> ExtractOptions:
    """ExtractOptions from CLI values, validation errors as one-line UserErrors."""
    from pydantic import ValidationError

    try:
        return ExtractOptions(**kwargs)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = f"--{str(err['loc'][0]).replace('_', '-')}: " if err["loc"] else ""
        raise UserError(flag + err["msg"].removeprefix("Value error, ")) from None


def _check_compatible(base: Checkpoint, other: Checkpoint, where: str) -> None:
    if other.architecture != base.architecture or other.model_type != base.model_type:
        raise UserError(
            f"{where}: different architectures: {other.ref} is {other.architecture} "
            f"({other.model_type}), {base.ref} is {base.architecture} ({base.model_type})"
        )


def plan_extract(
    base: str | Path,
    options: ExtractOptions,
    finetuned: str | Path | None = None,
    lora: str | Path | None = None,
) -> ExtractPlan:
    """Open the inputs and check them from headers; no weight is read."""
    from mergekit_math.patch.lora import open_lora

    if (finetuned is None) == (lora is None):
        raise UserError("give exactly one of --finetuned and --from-lora")
    no_rank = options.rank is None and options.energy is None
    if options.encoding == "lowrank" and lora is None and no_rank:
        raise UserError("--encoding lowrank needs --rank R or --energy F")
    try:
        base_ckpt = Checkpoint(base)
    except UserError as exc:
        raise UserError(f"--base: {exc}") from None
    warnings: list[str] = []
    if lora is not None:
        adapter = open_lora(lora, base_ckpt)
        names = [n for n in adapter.modules if options.selects(n)]
        plan = ExtractPlan(base_ckpt, options, names, lora=adapter, warnings=warnings)
    else:
        assert finetuned is not None
        try:
            ft = Checkpoint(finetuned)
        except UserError as exc:
            raise UserError(f"--finetuned: {exc}") from None
        _check_compatible(base_ckpt, ft, "--finetuned")
        names = []
        for name, info in base_ckpt.tensors.items():
            if info.dtype not in FLOAT_DTYPES or not options.selects(name):
                continue
            stored = ft.resolve_name(name)
            if stored is None:
                raise UserError(f"--finetuned: {ft.ref} has no tensor {name} (the base has it)")
            if ft.tensors[stored].shape != info.shape:
                raise UserError(
                    f"--finetuned: shape mismatch for {name}: {ft.ref} has "
                    f"{list(ft.tensors[stored].shape)}, {base_ckpt.ref} has {list(info.shape)}"
                )
            names.append(name)
        extra = sorted(n for n in ft.tensors if base_ckpt.resolve_name(n) is None)
        if extra:
            warnings.append(
                f"{ft.ref} has {len(extra)} tensor(s) the base lacks (e.g. {extra[0]}); "
                "they are not in the patch"
            )
        plan = ExtractPlan(base_ckpt, options, names, finetuned=ft, warnings=warnings)
    if not names:
        raise UserError("no tensor to patch: check --include / --exclude")
    return plan


def command_line(plan: ExtractPlan, out_dir: Path) -> str:
    """The ``mmath patch extract`` command that reproduces the patch."""
    o = plan.options
    args = ["mmath", "patch", "extract", "--base", plan.base.ref]
    if plan.lora is not None:
        args += ["--from-lora", str(plan.lora.path)]
    else:
        assert plan.finetuned is not None
        args += ["--finetuned", plan.finetuned.ref]
    args += ["-o", str(out_dir), "--encoding", o.encoding]
    if o.rank is not None:
        args += ["--rank", str(o.rank)]
    if o.energy is not None:
        args += ["--energy", repr(o.energy)]
    if o.encoding == "sparse":
        args += ["--drop", repr(o.drop), "--seed", str(o.seed)]
    for flag in ("include", "exclude"):
        if getattr(o, flag) is not None:
            args += [f"--{flag}", getattr(o, flag)]
    if o.dtype != "float32":
        args += ["--dtype", o.dtype]
    if o.lowrank_embeddings:
        args.append("--lowrank-embeddings")
    return shlex.join(args)


def encode_delta(name: str, delta: torch.Tensor, source_dtype: str, o: ExtractOptions) -> Encoded:
    """Encode one exact delta as the options ask."""
    from mergekit_math.methods.masks import MaskStream
    from mergekit_math.patch.encode import encode_dense, encode_lowrank, encode_sparse, is_embedding

    if o.encoding == "sparse":
        # Keyed as the engine keys source 0 of a merge, so a sparse patch equals dare_linear.
        stream = MaskStream.of(o.seed, 0, name)
        return encode_sparse(delta, source_dtype, o.dtype, o.drop, stream)
    if o.encoding == "lowrank" and (o.lowrank_embeddings or not is_embedding(name)):
        return encode_lowrank(delta, source_dtype, o.dtype, o.rank, o.energy)
    return encode_dense(delta, source_dtype, o.dtype)


def _lora_encoded(plan: ExtractPlan, name: str, cdtype: torch.dtype) -> Encoded | None:
    """One module of a LoRA adapter: its factors kept as they are, or densified and encoded."""
    from mergekit_math.patch.encode import encode_factors

    assert plan.lora is not None
    m = plan.lora.modules[name]
    info = plan.base.tensors[name]
    factors = plan.lora.factors(m)
    delta = None
    full = plan.lora.full(m)
    if full is not None:
        delta = full.to(cdtype) - plan.base.read(name).to(cdtype)
        if not delta.any():
            delta = None
    o = plan.options
    if factors is not None and delta is None:
        if o.encoding == "lowrank" and o.rank is None and o.energy is None:
            b, a = factors
            return encode_factors(b.to(cdtype), a.to(cdtype), info.shape, info.dtype, o.dtype)
        delta = (factors[0].to(cdtype) @ factors[1].to(cdtype)).reshape(info.shape)
    elif factors is not None:
        assert delta is not None
        delta += (factors[0].to(cdtype) @ factors[1].to(cdtype)).reshape(info.shape)
    if delta is None or not delta.any():
        return None
    return encode_delta(name, delta, info.dtype, o)


# Long: the extraction of one patch reads as one sequence (open, plan tensors, encode each,
# write atomically with the manifest); its steps are the helpers above.
def extract(
    plan: ExtractPlan,
    out_dir: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Encode every planned tensor into ``out_dir`` (atomically); returns its absolute path."""
    import torch

    from mergekit_math.io.atomic import atomic_output
    from mergekit_math.io.progress import byte_progress
    from mergekit_math.patch.format import PatchFileWriter

    out_dir = Path(out_dir)
    o = plan.options
    cdtype = torch.float64 if o.dtype == "float64" else torch.float32
    entries: dict[str, PatchEntry] = {}
    unchanged = 0
    with atomic_output(out_dir, force) as tmp:
        writer = PatchFileWriter(tmp / WEIGHTS)
        bar = byte_progress(plan.read_bytes, f"extract {o.encoding}", progress)
        try:
            with torch.inference_mode():
                for name in plan.names:
                    if plan.lora is not None:
                        encoded = _lora_encoded(plan, name, cdtype)
                    else:
                        assert plan.finetuned is not None
                        old = plan.base.read(name).to(cdtype)
                        delta = plan.finetuned.read(name).to(cdtype) - old
                        del old
                        source_dtype = plan.finetuned.info(name).dtype
                        encoded = (
                            encode_delta(name, delta, source_dtype, o) if delta.any() else None
                        )
                        del delta
                    bar.update(plan.base.tensors[name].nbytes)
                    if encoded is None:
                        unchanged += 1
                        continue
                    for suffix, part in encoded.parts.items():
                        writer.add(f"{name}{PART_SEP}{suffix}" if suffix else name, part)
                    entries[name] = encoded.entry
            if not entries:
                raise UserError("the delta is zero for every selected tensor: nothing to patch")
            writer.finish({"format": FORMAT})
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
            plan.base.close()
            if plan.finetuned is not None:
                plan.finetuned.close()
            if plan.lora is not None:
                plan.lora.close()
        source = PatchSource(
            kind="lora" if plan.lora is not None else "finetuned",
            base=str(plan.base.path.resolve()),
            finetuned=str(plan.finetuned.path.resolve()) if plan.finetuned else None,
            lora=str(plan.lora.path.resolve()) if plan.lora else None,
            fingerprint=fingerprint(plan.base),
            base_parameters=plan.base.num_parameters,
            base_tensors=len(plan.base.tensors),
        )
        manifest = PatchManifest(
            created_by=f"mergekit-math {__version__}",
            command=command or command_line(plan, out_dir),
            architecture=plan.base.architecture,
            model_type=plan.base.model_type,
            encoding=o.encoding,
            options=o.model_dump(),
            source=source,
            unchanged=unchanged,
            tensors=entries,
        )
        text = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
        (tmp / MANIFEST).write_text(text)
    return out_dir.absolute()


# =============================================================================== measuring


@dataclass
class TensorError:
    name: str
    encoding: str
    delta_norm: float  # ‖FT − OLD‖_F
    error_norm: float  # ‖(FT − OLD) − decoded‖_F

    @property
    def relative(self) -> float:
        return self.error_norm / self.delta_norm if self.delta_norm else float(self.error_norm > 0)


def overall_relative(errors: list[TensorError]) -> float:
    """sqrt(Σ error²) / sqrt(Σ ‖Δ‖²) over the tensors."""
    num = sum(e.error_norm**2 for e in errors)
    den = sum(e.delta_norm**2 for e in errors)
    return (num / den) ** 0.5 if den else float(num > 0)


def measure_errors(
    patch: Patch, old: str | Path, finetuned: str | Path, progress: bool = False
) -> list[TensorError]:
    """Relative Frobenius error of each patched tensor against the exact FT − OLD."""
    import torch

    from mergekit_math.io.progress import progress as tqdm
    from mergekit_math.patch.encode import frobenius

    try:
        old_ckpt = Checkpoint(old)
        ft_ckpt = Checkpoint(finetuned)
    except UserError as exc:
        raise UserError(f"--against: {exc}") from None
    patch.check_against(old_ckpt, "--against")
    patch.check_against(ft_ckpt, "--against")
    out: list[TensorError] = []
    try:
        with torch.inference_mode():
            for name, entry in tqdm(
                patch.tensors.items(), desc="measure", disable=not progress, file=sys.stderr
            ):
                cdtype = torch.float64 if entry.storage_dtype == "float64" else torch.float32
                exact = ft_ckpt.read(name).to(cdtype) - old_ckpt.read(name).to(cdtype)
                decoded = patch.delta(name, cdtype)
                out.append(
                    TensorError(name, entry.label, frobenius(exact), frobenius(exact - decoded))
                )
    finally:
        old_ckpt.close()
        ft_ckpt.close()
    return out
