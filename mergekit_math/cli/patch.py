"""``mmath patch``: PortLLM portable patches (extract, apply, info). Thin commands; torch is
imported inside the library functions they call. Errors go through the one handler
(:mod:`mergekit_math.cli.handler`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mergekit_math.cli.handler import HandledGroup, on_interrupt, warn
from mergekit_math.errors import UserError
from mergekit_math.io.writer import human_bytes

if TYPE_CHECKING:
    from mergekit_math.patch import Patch
    from mergekit_math.patch.extract import ExtractPlan, TensorError

patch_app = typer.Typer(
    cls=HandledGroup,
    help="PortLLM portable patches: extract a fine-tune's delta (dense, low-rank or sparse) or "
    "import a LoRA adapter, inspect it, apply it to a new base, or export it as a PEFT "
    "LoRA adapter.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

NOTHING_WRITTEN = "nothing was written to the output folder"


def size_option(flag: str, text: str) -> int:
    """A size flag's value in bytes (``5G``, ``500M``, a number)."""
    from mergekit_math.io.writer import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise UserError(f"{flag}: {exc}") from None


@patch_app.command("extract")
def patch_extract(
    base: Annotated[Path, typer.Option(help="The base the fine-tune started from (OLD).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Patch folder to write.")],
    finetuned: Annotated[
        Path | None, typer.Option(help="The fine-tuned model (FT); Δ = FT − OLD.")
    ] = None,
    from_lora: Annotated[
        Path | None,
        typer.Option("--from-lora", help="A PEFT LoRA adapter folder instead of --finetuned."),
    ] = None,
    encoding: Annotated[
        str | None,
        typer.Option(help="dense, lowrank or sparse (default: dense; lowrank with --from-lora)."),
    ] = None,
    rank: Annotated[
        int | None, typer.Option(help="lowrank: rank R of every factorization.")
    ] = None,
    energy: Annotated[
        float | None, typer.Option(help="lowrank: smallest rank keeping this fraction of Σσ².")
    ] = None,
    drop: Annotated[float, typer.Option(help="sparse: DARE drop rate p in [0, 1).")] = 0.9,
    seed: Annotated[int, typer.Option(help="sparse: seed of the per-tensor masks.")] = 0,
    include: Annotated[
        str | None, typer.Option(help="Only tensors whose name matches this regex.")
    ] = None,
    exclude: Annotated[
        str | None, typer.Option(help="Leave out tensors whose name matches this regex.")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Storage dtype: float32, bfloat16, float16 or float64.")
    ] = "float32",
    lowrank_embeddings: Annotated[
        bool, typer.Option(help="lowrank: also factorize embeddings and lm_head.")
    ] = False,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="patch (an mmath patch folder) or peft (a PEFT LoRA adapter of the low-rank "
            "tensors, as `mmath patch export`; needs --encoding lowrank).",
        ),
    ] = "patch",
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Extract Δ = FT − OLD (or a LoRA adapter's ΔW) into a patch folder, or with
    --format peft into a PEFT LoRA adapter.

    Checks architectures, tensor sets and shapes before reading any weight; streams one tensor
    at a time; the folder appears only once complete.

    Example: mmath patch extract --base old --finetuned ft -o p --encoding lowrank --rank 64
    """
    from mergekit_math.patch import Patch
    from mergekit_math.patch.extract import extract, make_options, plan_extract

    on_interrupt(NOTHING_WRITTEN)
    options = make_options(
        encoding=encoding or ("lowrank" if from_lora is not None else "dense"),
        rank=rank,
        energy=energy,
        drop=drop,
        seed=seed,
        include=include,
        exclude=exclude,
        dtype=dtype,
        lowrank_embeddings=lowrank_embeddings,
    )
    _check_format(fmt, options.encoding)
    if output.exists() and not force:
        raise UserError(f"{output} already exists; pass --force to replace it")
    plan = plan_extract(base, options, finetuned=finetuned, lora=from_lora)
    for w in plan.warnings:
        warn(w)
    if fmt == "peft":
        _extract_peft(plan, output, force, quiet)
        return
    final = extract(plan, output, force=force, progress=not quiet)
    p = Patch.open(final)
    typer.echo(
        f"extracted {len(p.tensors)} tensors ({options.encoding}, {human_bytes(p.stored_bytes)}, "
        f"{p.dense_bytes / p.stored_bytes:.2f}× smaller than dense float32) into {final}"
    )


def _check_format(fmt: str, encoding: str) -> None:
    if fmt not in ("patch", "peft"):
        raise UserError(f"--format: {fmt!r} is not a known format (patch, peft)")
    if fmt == "peft" and encoding != "lowrank":
        raise UserError(
            "--format peft: a LoRA adapter holds low-rank tensors; use --encoding lowrank"
        )


def _extract_peft(plan: ExtractPlan, output: Path, force: bool, quiet: bool) -> None:
    from mergekit_math.patch.peft_export import extract_to_peft

    final, exported = extract_to_peft(plan, output, force=force, progress=not quiet)
    message = exported.warning()
    if message is not None:
        warn(message)
    typer.echo(f"extracted {len(exported.modules)} LoRA modules into {final}")


@patch_app.command("apply")
def patch_apply(
    patch: Annotated[Path, typer.Option(help="Patch folder (from mmath patch extract).")],
    base: Annotated[Path, typer.Option(help="The model to patch (NEW).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output model folder.")],
    scale: Annotated[float, typer.Option(help="out = NEW + scale·Δ.")] = 1.0,
    out_shard_size: Annotated[
        str, typer.Option(help="Maximum shard size: bytes or 500M, 2G, 5G.")
    ] = "5G",
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Write NEW + scale·Δ: patched tensors computed in float32 and cast to NEW's dtype, the
    rest copied bit for bit.

    Architecture, tensor presence and shapes are checked before any weight is read. Applying a
    patch to its own source base is allowed, with a warning.

    Example: mmath patch apply --patch p --base new -o out/ported
    """
    from mergekit_math.patch.apply import apply_patch, plan_apply

    on_interrupt(NOTHING_WRITTEN)
    shard_size = size_option("--out-shard-size", out_shard_size)
    if output.exists() and not force:
        raise UserError(f"{output} already exists; pass --force to replace it")
    plan = plan_apply(patch, base, scale)
    for w in plan.warnings:
        warn(w)
    final = apply_patch(plan, output, force=force, progress=not quiet, max_shard_size=shard_size)
    typer.echo(
        f"applied {len(plan.patch.tensors)} patched tensors (scale {scale:g}) to "
        f"{plan.base.ref}: {final}"
    )


@patch_app.command("export")
def patch_export(
    patch: Annotated[Path, typer.Argument(metavar="PATCH", help="Patch folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Adapter folder to write.")],
    fmt: Annotated[
        str, typer.Option("--format", help="Output format; peft: a PEFT LoRA adapter.")
    ] = "peft",
    strict: Annotated[
        bool,
        typer.Option(help="Refuse a patch with tensors a LoRA cannot hold (instead of a warning)."),
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Write a patch's low-rank tensors as a PEFT LoRA adapter (adapter_config.json and
    adapter_model.safetensors) that peft.PeftModel.from_pretrained(base, OUT) loads.

    Only lowrank entries become LoRA modules (scaling 1, per-module ranks in rank_pattern).
    Dense and sparse entries (norms, biases; embeddings too, unless the patch was made by
    `mmath patch extract --lowrank-embeddings`) are left out and listed in a warning;
    --strict refuses them.

    Example: mmath patch export p -o adapter
    """
    from mergekit_math.patch.peft_export import export_peft, plan_export

    if fmt != "peft":
        raise UserError(f"--format: {fmt!r} is not a known format (peft)")
    on_interrupt(NOTHING_WRITTEN)
    if output.exists() and not force:
        raise UserError(f"{output} already exists; pass --force to replace it")
    plan = plan_export(patch, strict=strict)
    message = plan.warning()
    if message is not None:
        warn(message)
    final = export_peft(plan, output, force=force)
    ranks = sorted({m.rank for m in plan.modules})
    rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}–{ranks[-1]}"
    typer.echo(f"exported {len(plan.modules)} LoRA modules ({rank}) into {final}")


@patch_app.command("info")
def patch_info(
    patch: Annotated[Path, typer.Argument(metavar="PATCH", help="Patch folder.")],
    against: Annotated[
        tuple[Path, Path] | None,
        typer.Option(metavar="OLD FT", help="Measure the error against the exact delta FT − OLD."),
    ] = None,
    tensors: Annotated[
        bool, typer.Option("--tensors", help="List every tensor (in layer order).")
    ] = False,
) -> None:
    """Describe a patch: source, encodings, parameters covered, size vs dense, error.

    Without --tensors only the summary is printed (with --against: the overall error against
    FT − OLD); with --tensors also one line per tensor, in layer order.

    Example: mmath patch info p --against old ft --tensors
    """
    from mergekit_math.patch import Patch
    from mergekit_math.patch.extract import measure_errors, overall_relative

    p = Patch.open(patch)
    errors = measure_errors(p, against[0], against[1]) if against else None
    for line in _summary(p):
        typer.echo(line)
    if errors is not None:
        typer.echo(f"overall relative error vs FT − OLD: {overall_relative(errors):.3e}")
    if tensors:
        typer.echo("")
        for line in _tensor_lines(p, errors):
            typer.echo(line)


def _summary(p: Patch) -> list[str]:
    from collections import Counter

    m = p.manifest
    src = m.source
    base_params = src.base_parameters or 1
    counts = Counter(e.encoding for e in p.tensors.values())
    ranks = sorted({e.rank for e in p.tensors.values() if e.rank is not None})
    encodings = ", ".join(f"{k} ×{n}" for k, n in counts.most_common())
    if ranks:
        encodings += f" (ranks {ranks[0]}–{ranks[-1]})" if len(ranks) > 1 else f" (rank {ranks[0]})"
    origin = f"LoRA adapter {src.lora}" if src.kind == "lora" else str(src.finetuned)
    lines = [
        f"patch:          {p.path.resolve()}",
        f"format:         {m.format} v{m.format_version} ({m.created_by})",
        f"architecture:   {p.architecture} ({p.model_type})",
        f"source:         {origin}",
        f"base:           {src.base}",
        f"fingerprint:    {p.fingerprint}",
        f"command:        {m.command}",
        f"encodings:      {encodings}",
        f"tensors:        {len(p.tensors)} ({m.unchanged} unchanged left out)",
        f"parameters:     {p.num_parameters:,} of {src.base_parameters:,} "
        f"({100 * p.num_parameters / base_params:.1f}%)",
        f"size on disk:   {human_bytes(p.stored_bytes)}",
        f"dense size:     {human_bytes(p.dense_bytes)} (float32)",
        f"compression:    {p.dense_bytes / p.stored_bytes:.2f}×",
    ]
    if p.recorded_error is not None:
        lines.append(f"relative error: {p.recorded_error:.3e} (recorded at extraction)")
    return lines


def _tensor_lines(p: Patch, errors: list[TensorError] | None) -> list[str]:
    """One line per tensor in layer order; the error measured with --against, else the one
    recorded at extraction."""
    from mergekit_math.io.reader import tensor_order

    if errors is not None:
        rows = [(e.name, e.encoding, list(p.tensors[e.name].shape), e.relative) for e in errors]
        label = "relative error vs FT − OLD"
    else:
        rows = []
        for name, e in p.tensors.items():
            rel = e.error_norm / e.delta_norm if e.error_norm is not None and e.delta_norm else 0
            rows.append((name, e.label, list(e.shape), rel))
        label = "relative error (recorded)"
    rows.sort(key=lambda r: tensor_order(r[0]))
    width = max((len(r[0]) for r in rows), default=6)
    out = [f"{'tensor':<{width}}  {'encoding':<28} {'shape':<14} {label}"]
    for name, encoding, shape, rel in rows:
        out.append(f"{name:<{width}}  {encoding:<28} {str(shape):<14} {rel:.3e}")
    return out
