"""The ``mmath`` command line: one thin function per command; heavy imports inside them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mergekit_math import __version__
from mergekit_math.errors import UserError
from mergekit_math.eval.options import (
    BatchOption,
    ChatOption,
    DataOption,
    DtypeOption,
    EvalDeviceOption,
    EvalSeedOption,
    FewshotOption,
    GenKwargsOption,
    LimitOption,
    NoCacheOption,
    OnlineOption,
    RequireOption,
    TasksOption,
    eval_options,
)
from mergekit_math.io.writer import human_bytes

if TYPE_CHECKING:
    from mergekit_math.engine import Plan

app = typer.Typer(
    name="mmath",
    help="Merge and edit LLM weights for math reasoning: streaming, memory-bounded, "
    "mergekit-compatible recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmath {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = None,
) -> None:
    """Merge and edit LLM weights for math reasoning."""


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (mergekit format plus extensions).")],
    out_dir: Annotated[Path, typer.Argument(help="Output folder; must not exist unless --force.")],
    device: Annotated[str, typer.Option(help="Where to compute: cpu or cuda.")] = "cpu",
    threads: Annotated[
        int | None, typer.Option(help="torch intra-op threads (default: torch's choice).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for DARE/DELLA; overrides the recipe's seed.")
    ] = None,
    out_shard_size: Annotated[
        str, typer.Option(help="Maximum shard size: bytes or 500M, 2G, 5G.")
    ] = "5G",
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Bound the tensor data held at once (e.g. 2G): smaller chunks and read-ahead. "
            "Checked before any read; methods that need whole tensors (slerp, model_stock, "
            "breadcrumbs, della, L1 rescale) fail if their largest tensor does not fit. "
            "Python and torch themselves add about 300 MB.",
        ),
    ] = None,
    allow_pickle: Annotated[
        bool,
        typer.Option(help="Accept pytorch_model*.bin inputs (loaded with weights_only=True)."),
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing OUT_DIR.")] = False,
    strict_finite: Annotated[
        bool,
        typer.Option(help="Refuse inputs with NaN or inf values (default: warn per tensor)."),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Validate and print the plan; read no tensor, write nothing.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    evaluate: Annotated[
        bool | None,
        typer.Option(
            "--eval/--no-eval",
            help="Evaluate the merged model (default: when the recipe has an evaluate: block).",
        ),
    ] = None,
    push: Annotated[
        str | None,
        typer.Option(
            "--push",
            help="After evaluating, publish to this Hub repo if every --require bar is met "
            "(default: the recipe's push: block).",
        ),
    ] = None,
    no_push: Annotated[
        bool, typer.Option("--no-push", help="Ignore the recipe's push: block.")
    ] = False,
    require: RequireOption = None,
    tasks: TasksOption = None,
    data: DataOption = None,
    limit: LimitOption = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="Hub token for --push (default: HF_TOKEN or the saved login).", show_default=False
        ),
    ] = None,
) -> None:
    """Merge the models of RECIPE into OUT_DIR.

    Every problem in the recipe (unknown method or parameter, bad value, missing path,
    incompatible checkpoints) is reported before any tensor is read. The output appears at
    OUT_DIR only once complete: a failed or interrupted merge leaves nothing that looks like a
    model.

    With --eval (or an evaluate: block in the recipe) the output is evaluated as by `mmath
    eval`; with --push REPO (or a push: block) it is then published as by `mmath push`, only
    if it clears the --require bars (or evaluate.require).

    Example: mmath merge recipes/ties.yaml out/ties-merge

    Example: mmath merge recipes/ties.yaml out/ties-merge --eval --push me/ties-merge
    --tasks gsm8k_cot_local --require 'gsm8k_cot_local:exact_match,flexible-extract>=0.4'
    """
    from mergekit_math.engine import build_plan, execute
    from mergekit_math.io.writer import parse_size
    from mergekit_math.recipe import load_recipe

    try:
        shard_size = parse_size(out_shard_size)
    except ValueError as exc:
        _fail(f"--out-shard-size: {exc}")
    limit = None
    if max_memory is not None:
        try:
            limit = parse_size(max_memory)
        except ValueError as exc:
            _fail(f"--max-memory: {exc}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        _fail(f"--device: expected cpu or cuda, got {device!r}")
    if threads is not None and threads < 1:
        _fail("--threads must be at least 1")
    try:
        parsed = load_recipe(recipe)
        after = _after_merge(
            parsed,
            recipe.resolve().parent,
            evaluate,
            push,
            no_push,
            require,
            tasks,
            data,
            limit,
            device,
        )
        plan = build_plan(
            parsed, recipe_dir=recipe.resolve().parent, seed=seed, allow_pickle=allow_pickle
        )
        if out_dir.exists() and not force and not dry_run:
            raise UserError(f"{out_dir} already exists; pass --force to replace it")
        for w in plan.warnings:
            typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
        if dry_run:
            _print_plan(plan, shard_size, limit, device)
            if limit is not None:
                from mergekit_math.engine import check_memory

                check_memory(plan, limit, device)
            return
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        final = execute(
            plan,
            out_dir,
            device=device,
            max_shard_size=shard_size,
            force=force,
            progress=not quiet,
            max_memory=limit,
            strict_finite=strict_finite,
        )
    except UserError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written to the output folder", code=130)
    typer.echo(
        f"merged {len(plan.items)} tensors ({human_bytes(plan.write_bytes)}) with "
        f"{plan.method.name} into {final}"
    )
    if after is not None:
        _evaluate_and_push(final, after, token)


class _AfterMerge:
    """What `mmath merge` does with its output: evaluate, check the bar, publish."""

    def __init__(self, options, requirements, settings) -> None:
        self.options = options
        self.requirements = requirements
        self.settings = settings


def _after_merge(
    parsed, recipe_dir: Path, evaluate, push, no_push, require, tasks, data, limit, device
) -> _AfterMerge | None:
    """Validate the evaluate/push settings of a merge before any tensor is read."""
    from mergekit_math.hub.publish import PushSettings, parse_requirements

    block = parsed.evaluate
    if block is not None and block.data is not None:
        block.data = str((recipe_dir / block.data).resolve())
    settings = None
    if push is not None:
        settings = PushSettings(push)
    elif parsed.push is not None and not no_push:
        settings = PushSettings(**parsed.push.model_dump())
    do_eval = evaluate if evaluate is not None else block is not None or settings is not None
    if settings is not None and evaluate is False:
        raise UserError(
            "--push needs the evaluation (drop --no-eval); use `mmath push "
            "--no-eval --force` to publish unevaluated"
        )
    if not do_eval:
        return None
    requirements = parse_requirements(require or (block.require if block else None) or [])
    if settings is not None and not requirements:
        raise UserError(
            "--push needs a bar: --require 'TASK:METRIC,FILTER>=VALUE' or evaluate.require "
            "in the recipe"
        )
    task_list = tasks or (block.tasks if block else None)
    if isinstance(task_list, list):
        task_list = ",".join(task_list)
    if not task_list and not requirements:
        raise UserError("--eval: name the tasks with --tasks or an evaluate: block")
    b = block
    options = eval_options(
        task_list,
        data if data is not None else (Path(b.data) if b and b.data else None),
        device,
        (b.dtype if b and b.dtype else "auto"),
        str(b.batch_size) if b and b.batch_size is not None else "8",
        limit if limit is not None else (str(b.limit) if b and b.limit is not None else None),
        b.num_fewshot if b else None,
        bool(b.apply_chat_template) if b else False,
        ",".join(f"{k}={v}" for k, v in (b.gen_kwargs or {}).items()) if b else None,
        b.seed if b else None,
        False,
        False,
    )
    from mergekit_math.hub.publish import gate_options

    return _AfterMerge(gate_options(requirements, options), requirements, settings)


def _evaluate_and_push(model_dir: Path, after: _AfterMerge, token: str | None) -> None:
    from mergekit_math.eval.run import evaluate, format_table
    from mergekit_math.hub.publish import GateFailed, publish, run_gate

    try:
        report = evaluate(model_dir, after.options)
        typer.echo(format_table(report))
        if after.settings is None:
            if after.requirements:
                run_gate(model_dir, after.requirements, after.options, typer.echo, report)
            return
        result = publish(
            model_dir,
            after.settings,
            requirements=after.requirements,
            options=after.options,
            token=token,
            echo=typer.echo,
            warn=lambda m: typer.secho(f"warning: {m}", fg=typer.colors.YELLOW, err=True),
            report=report,
        )
    except GateFailed as exc:
        typer.echo(exc.table)
        pushed = ", nothing was pushed" if after.settings is not None else ""
        _fail(f"{exc}; the merge is kept at {model_dir}{pushed}", code=1)
    except UserError as exc:
        _fail(f"{exc} (the merge is kept at {model_dir})")
    except KeyboardInterrupt:
        _fail(f"interrupted; the merge is kept at {model_dir}", code=130)
    _echo_pushed(result)


def _print_plan(plan: Plan, shard_size: int, max_memory: int | None, device: str) -> None:
    from mergekit_math.io.writer import plan_shards

    shards = plan_shards([i.out for i in plan.items], shard_size)
    typer.echo(f"method:        {plan.method.name} ({plan.method.pretty_name})")
    typer.echo(f"inputs:        {len(plan.checkpoints)} checkpoints")
    for c in plan.checkpoints.values():
        typer.echo(f"  - {c.ref} -> {c.path}" if str(c.path) != c.ref else f"  - {c.ref}")
    typer.echo(f"output layers: {plan.num_layers}")
    typer.echo(f"tensors:       {len(plan.items)}")
    typer.echo(f"read:          {human_bytes(plan.read_bytes)}")
    typer.echo(f"write:         {human_bytes(plan.write_bytes)} in {len(shards)} shard(s)")
    peak = plan.estimated_peak_bytes(max_memory, device)
    typer.echo(f"est. peak mem: {human_bytes(peak)} of tensor data (plus ~300 MB for Python/torch)")
    typer.echo(f"seed:          {plan.seed}")
    typer.echo("dry run: nothing was read or written")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A model folder.")],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
) -> None:
    """Describe a checkpoint from its headers only: architecture, dtypes, parameters, shards.

    Example: mmath inspect out/ties-merge --tensors
    """
    from collections import Counter

    from mergekit_math.io.reader import Checkpoint

    try:
        ckpt = Checkpoint(path, allow_pickle=False)
    except UserError as exc:
        _fail(str(exc))
    dtypes = Counter(t.dtype for t in ckpt.tensors.values())
    typer.echo(f"path:            {ckpt.path.resolve()}")
    typer.echo(f"architecture:    {ckpt.architecture} ({ckpt.model_type})")
    typer.echo(f"layers:          {ckpt.num_layers}")
    typer.echo(f"vocab size:      {ckpt.vocab_size}")
    typer.echo(f"parameters:      {ckpt.num_parameters:,}")
    typer.echo(f"tensors:         {len(ckpt.tensors)}")
    typer.echo("dtypes:          " + ", ".join(f"{d} ×{n}" for d, n in dtypes.most_common()))
    typer.echo(f"tied embeddings: {'yes' if ckpt.tied_embeddings else 'no'}")
    typer.echo(f"shards:          {len(ckpt.files)}")
    for f in ckpt.files:
        typer.echo(f"  - {f.name} ({human_bytes(f.stat().st_size)})")
    typer.echo(f"tensor bytes:    {human_bytes(ckpt.total_bytes)}")
    if tensors:
        width = max((len(n) for n in ckpt.tensors), default=4)
        typer.echo("")
        typer.echo(f"{'name':<{width}}  {'dtype':<9} shape")
        for name in sorted(ckpt.tensors):
            t = ckpt.tensors[name]
            typer.echo(f"{name:<{width}}  {t.dtype:<9} {list(t.shape)}")


@app.command()
def methods() -> None:
    """List the merge methods with their parameters and papers."""
    from mergekit_math.methods import all_methods, param_keys

    for m in all_methods():
        shared = ", ".join(param_keys(m.shared_params))
        per_model = ", ".join(param_keys(m.model_params))
        typer.echo(f"{m.name:<17} {m.pretty_name} — {m.paper_url}")
        typer.echo(f"{'':<17} {m.description}")
        typer.echo(f"{'':<17} per model: {per_model or '-'}; recipe-level: {shared or '-'}")


# =============================================================================== mmath patch

patch_app = typer.Typer(
    help="PortLLM portable patches: extract a fine-tune's delta (dense, low-rank or sparse) or "
    "import a LoRA adapter, inspect it, and apply it to a new base.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(patch_app, name="patch")


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
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Extract Δ = FT − OLD (or a LoRA adapter's ΔW) into a patch folder.

    Checks architectures, tensor sets and shapes before reading any weight; streams one tensor
    at a time; the folder appears only once complete.

    Example: mmath patch extract --base old --finetuned ft -o p --encoding lowrank --rank 64
    """
    from mergekit_math.patch.extract import extract, make_options, plan_extract

    try:
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
        if output.exists() and not force:
            raise UserError(f"{output} already exists; pass --force to replace it")
        plan = plan_extract(base, options, finetuned=finetuned, lora=from_lora)
        for w in plan.warnings:
            typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
        final = extract(plan, output, force=force, progress=not quiet)
    except UserError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written to the output folder", code=130)
    from mergekit_math.patch import Patch

    p = Patch.open(final)
    typer.echo(
        f"extracted {len(p.tensors)} tensors ({options.encoding}, {human_bytes(p.stored_bytes)}, "
        f"{p.dense_bytes / p.stored_bytes:.2f}× smaller than dense float32) into {final}"
    )


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
    from mergekit_math.io.writer import parse_size
    from mergekit_math.patch.apply import apply_patch, plan_apply

    try:
        shard_size = parse_size(out_shard_size)
    except ValueError as exc:
        _fail(f"--out-shard-size: {exc}")
    try:
        if output.exists() and not force:
            raise UserError(f"{output} already exists; pass --force to replace it")
        plan = plan_apply(patch, base, scale)
        for w in plan.warnings:
            typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
        final = apply_patch(
            plan, output, force=force, progress=not quiet, max_shard_size=shard_size
        )
    except UserError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written to the output folder", code=130)
    typer.echo(
        f"applied {len(plan.patch.tensors)} patched tensors (scale {scale:g}) to "
        f"{plan.base.ref}: {final}"
    )


@patch_app.command("info")
def patch_info(
    patch: Annotated[Path, typer.Argument(help="Patch folder.")],
    against: Annotated[
        tuple[Path, Path] | None,
        typer.Option(metavar="OLD FT", help="Measure the error against the exact delta FT − OLD."),
    ] = None,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
) -> None:
    """Describe a patch: source, encodings, parameters covered, size vs dense, error.

    Example: mmath patch info p --against old ft
    """
    from collections import Counter

    from mergekit_math.patch import Patch
    from mergekit_math.patch.extract import measure_errors, overall_relative

    try:
        p = Patch.open(patch)
        errors = measure_errors(p, against[0], against[1]) if against else None
    except UserError as exc:
        _fail(str(exc))
    m = p.manifest
    src = m.source
    base_params = src.base_parameters or 1
    counts = Counter(e.encoding for e in p.tensors.values())
    ranks = sorted({e.rank for e in p.tensors.values() if e.rank is not None})
    encodings = ", ".join(f"{k} ×{n}" for k, n in counts.most_common())
    if ranks:
        encodings += f" (ranks {ranks[0]}–{ranks[-1]})" if len(ranks) > 1 else f" (rank {ranks[0]})"
    origin = f"LoRA adapter {src.lora}" if src.kind == "lora" else str(src.finetuned)
    typer.echo(f"patch:          {p.path.resolve()}")
    typer.echo(f"format:         {m.format} v{m.format_version} ({m.created_by})")
    typer.echo(f"architecture:   {p.architecture} ({p.model_type})")
    typer.echo(f"source:         {origin}")
    typer.echo(f"base:           {src.base}")
    typer.echo(f"fingerprint:    {p.fingerprint}")
    typer.echo(f"command:        {m.command}")
    typer.echo(f"encodings:      {encodings}")
    typer.echo(f"tensors:        {len(p.tensors)} ({m.unchanged} unchanged left out)")
    typer.echo(
        f"parameters:     {p.num_parameters:,} of {src.base_parameters:,} "
        f"({100 * p.num_parameters / base_params:.1f}%)"
    )
    typer.echo(f"size on disk:   {human_bytes(p.stored_bytes)}")
    typer.echo(f"dense size:     {human_bytes(p.dense_bytes)} (float32)")
    typer.echo(f"compression:    {p.dense_bytes / p.stored_bytes:.2f}×")
    if p.recorded_error is not None:
        typer.echo(f"relative error: {p.recorded_error:.4g} (recorded at extraction)")
    if tensors and errors is None:
        width = max(len(n) for n in p.tensors)
        typer.echo("")
        for name, e in p.tensors.items():
            rel = e.error_norm / e.delta_norm if e.error_norm is not None and e.delta_norm else 0
            typer.echo(f"{name:<{width}}  {e.label:<28} {list(e.shape)}  rel. error {rel:.4g}")
    if errors is not None:
        width = max(len(e.name) for e in errors)
        typer.echo("")
        typer.echo(f"{'tensor':<{width}}  {'encoding':<28} relative error")
        for e in errors:
            typer.echo(f"{e.name:<{width}}  {e.encoding:<28} {e.relative:.4g}")
        typer.echo(f"overall relative error vs FT − OLD: {overall_relative(errors):.4g}")


# =============================================================================== mmath ul2r

from mergekit_math.ul2r.cli import ul2r_app  # noqa: E402  (typer only; torch loads in commands)

app.add_typer(ul2r_app, name="ul2r")

from mergekit_math.sweep.cli import sweep_app  # noqa: E402  (typer only; the rest in commands)

app.add_typer(sweep_app, name="sweep")


# =============================================================================== mmath data

data_app = typer.Typer(
    help="Offline evaluation data: generated GSM8K-format problem sets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(data_app, name="data")


@data_app.command("gsm-symbolic")
def data_gsm_symbolic(
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL file to write.")],
    n: Annotated[int, typer.Option("-n", help="Number of problems.")] = 200,
    seed: Annotated[int, typer.Option(help="Same seed, same problems.")] = 0,
    template: Annotated[
        list[str] | None,
        typer.Option(help="Only these templates (repeatable); see --list-templates."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Write N grade-school word problems with worked solutions in GSM8K format.

    Problems come from symbolic templates (GSM-Symbolic style) with varied names, objects and
    numbers; each has 2-5 calculation steps written as <<a*b=c>> annotations and ends with
    '#### N', and every answer is computed by the generator. Use the file with
    `mmath eval MODEL --tasks gsm8k_local --data FILE`.

    Example: mmath data gsm-symbolic -n 200 --seed 0 -o problems.jsonl
    """
    from mergekit_math.data.gsm_symbolic import TEMPLATES, generate, write_jsonl

    if output.exists() and not force:
        _fail(f"{output} already exists; pass --force to replace it")
    try:
        problems = generate(n, seed=seed, templates=template or None)
        write_jsonl(problems, output)
    except UserError as exc:
        _fail(str(exc))
    used = sorted({p.template for p in problems})
    typer.echo(
        f"wrote {len(problems)} problems from {len(used)} of {len(TEMPLATES)} templates "
        f"(seed {seed}) to {output}"
    )


# =============================================================================== mmath eval


@app.command("eval")
def eval_(
    model_dir: Annotated[Path, typer.Argument(help="Model folder (e.g. a merge output).")],
    tasks: TasksOption = None,
    data: DataOption = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write results.json and samples_<task>.jsonl here."),
    ] = None,
    device: EvalDeviceOption = "cpu",
    dtype: DtypeOption = "auto",
    batch_size: BatchOption = "8",
    limit: LimitOption = None,
    num_fewshot: FewshotOption = None,
    apply_chat_template: ChatOption = False,
    gen_kwargs: GenKwargsOption = None,
    seed: EvalSeedOption = None,
    online: OnlineOption = False,
    no_cache: NoCacheOption = False,
    verbose: Annotated[bool, typer.Option(help="Show lm-eval's log messages.")] = False,
) -> None:
    """Evaluate MODEL_DIR with lm-eval and print accuracy and chain-of-thought lengths.

    The model is loaded once for all tasks. Results are cached by (model fingerprint, task
    config, limit, few-shot, generation settings): a repeated evaluation is instant unless
    --no-cache. Runs offline unless --online. For generative tasks the table also shows the
    tokens generated per problem (the stored response re-tokenised with the model's tokenizer,
    cut at the first stop string): mean / median / 90th percentile.

    Example: mmath eval out/ties-merge --tasks gsm8k_cot_local --data problems.jsonl --limit 50
    """
    try:
        if not tasks:
            raise UserError("--tasks: name at least one task (e.g. gsm8k_cot_local)")
        options = eval_options(
            tasks,
            data,
            device,
            dtype,
            batch_size,
            limit,
            num_fewshot,
            apply_chat_template,
            gen_kwargs,
            seed,
            online,
            no_cache,
        )
        from mergekit_math.eval.run import evaluate, format_table, write_output

        report = evaluate(model_dir, options, verbose=verbose)
        if output is not None:
            write_output(report, options, output)
    except UserError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; no result was cached for the tasks in progress", code=130)
    typer.echo(format_table(report))
    hits = [t for t, hit in report.cached.items() if hit]
    note = f"; from cache: {', '.join(hits)}" if hits else ""
    typer.echo(f"\n{report.model} ({report.fingerprint[:20]}…) in {report.seconds:.1f} s{note}")
    if output is not None:
        typer.echo(f"results written to {output / 'results.json'}")


# =============================================================================== mmath push


@app.command()
def push(
    model_dir: Annotated[Path, typer.Argument(help="Model folder to publish.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repository, NAMESPACE/NAME.")],
    require: RequireOption = None,
    private: Annotated[bool, typer.Option(help="Create the repository private.")] = False,
    revision: Annotated[
        str | None, typer.Option(help="Branch to commit to (created from main).")
    ] = None,
    commit_message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
    create_pr: Annotated[
        bool, typer.Option(help="Open a pull request instead of committing.")
    ] = False,
    token: Annotated[
        str | None,
        typer.Option(
            help="Hub token (default: HF_TOKEN, then the saved login). Never printed or stored.",
            show_default=False,
        ),
    ] = None,
    no_eval: Annotated[
        bool, typer.Option("--no-eval", help="Skip the eval gate (needs --force too).")
    ] = False,
    force: Annotated[bool, typer.Option(help="With --no-eval: publish unevaluated.")] = False,
    tasks: TasksOption = None,
    data: DataOption = None,
    device: EvalDeviceOption = "cpu",
    dtype: DtypeOption = "auto",
    batch_size: BatchOption = "8",
    limit: LimitOption = None,
    num_fewshot: FewshotOption = None,
    apply_chat_template: ChatOption = False,
    gen_kwargs: GenKwargsOption = None,
    seed: EvalSeedOption = None,
    online: OnlineOption = False,
    no_cache: NoCacheOption = False,
) -> None:
    """Publish MODEL_DIR to the Hub as REPO_ID, only if it clears every --require bar.

    The gate uses the cached evaluation of this exact model (same fingerprint, task config
    and options) or runs it first, with the same task options as `mmath eval`; the required
    tasks are evaluated even when --tasks does not name them. If a bar is missed, the table
    shows the failing row, the command exits with status 1 and nothing is sent to the Hub.
    The uploaded README gets the results as model-index metadata and an Evaluation table;
    base_model keeps Hub ids only.

    Example: mmath push out/ties-merge me/qwen-math-ties --data problems.jsonl --limit 200
    --require 'gsm8k_cot_local:exact_match,flexible-extract>=0.40'
    """
    from mergekit_math.hub.publish import GateFailed, PushSettings, parse_requirements, publish

    try:
        if no_eval and not force:
            raise UserError("--no-eval publishes an unevaluated model: add --force to confirm")
        if no_eval and require:
            raise UserError("--require and --no-eval contradict each other")
        requirements = parse_requirements(require or [])
        options = None
        if not no_eval:
            options = eval_options(
                tasks,
                data,
                device,
                dtype,
                batch_size,
                limit,
                num_fewshot,
                apply_chat_template,
                gen_kwargs,
                seed,
                online,
                no_cache,
            )
        result = publish(
            model_dir,
            PushSettings(repo_id, private, revision, commit_message, create_pr),
            requirements=requirements,
            options=options,
            token=token,
            echo=typer.echo,
            warn=lambda m: typer.secho(f"warning: {m}", fg=typer.colors.YELLOW, err=True),
        )
    except GateFailed as exc:
        typer.echo(exc.table)
        _fail(f"{exc}; nothing was pushed", code=1)
    except UserError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    _echo_pushed(result)


def _echo_pushed(result) -> None:
    typer.echo(f"pushed to {result.url}")
    typer.echo(f"commit {result.commit_id}: {result.commit_url}")
    if result.pr_url:
        typer.echo(f"pull request: {result.pr_url}")


# =============================================================================== mmath valve

valve_app = typer.Typer(
    help="CoT-Valve: a weight-space direction that sets chain-of-thought length. "
    "θ(α) = θ_long + α·Δ, Δ = θ_short − θ_long; α in (0, 1) interpolates, α > 1 shortens "
    "further, α < 0 lengthens.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(valve_app, name="valve")

AlphasOption = Annotated[
    str, typer.Option(help="Comma-separated α values, e.g. 0,0.25,0.5,0.75,1,1.25.")
]


@valve_app.command("extract")
def valve_extract(
    long: Annotated[
        Path, typer.Option("--long", "--base", help="The long-chain model L (the origin).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Direction folder to write.")],
    short: Annotated[
        Path | None, typer.Option(help="The short-chain model S tuned from L: Δ = S − L.")
    ] = None,
    lora: Annotated[
        Path | None,
        typer.Option(help="A PEFT LoRA adapter trained on L to shorten chains, instead of S."),
    ] = None,
    encoding: Annotated[
        str | None, typer.Option(help="dense or lowrank (default: dense; lowrank with --lora).")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="lowrank: rank R.")] = None,
    energy: Annotated[
        float | None, typer.Option(help="lowrank: smallest rank keeping this fraction of Σσ².")
    ] = None,
    dtype: Annotated[str, typer.Option(help="Storage dtype.")] = "float32",
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Store the chain-length direction Δ = S − L (or a LoRA's ΔW) in the patch format.

    Example: mmath valve extract --long qwq --short qwq-short -o valve/dir --encoding lowrank
    --rank 64
    """
    from mergekit_math.patch.extract import extract, make_options, plan_extract

    try:
        if encoding not in (None, "dense", "lowrank"):
            raise UserError(f"--encoding: expected dense or lowrank, got {encoding!r}")
        if (short is None) == (lora is None):
            raise UserError("give exactly one of --short and --lora")
        options = make_options(
            encoding=encoding or ("lowrank" if lora is not None else "dense"),
            rank=rank,
            energy=energy,
            dtype=dtype,
        )
        if output.exists() and not force:
            raise UserError(f"{output} already exists; pass --force to replace it")
        plan = plan_extract(long, options, finetuned=short, lora=lora)
        for w in plan.warnings:
            typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
        src = f"--short {short}" if short is not None else f"--lora {lora}"
        command = (
            f"mmath valve extract --long {long} {src} -o {output} --encoding {options.encoding}"
        )
        final = extract(plan, output, force=force, progress=not quiet, command=command)
    except UserError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written to the output folder", code=130)
    typer.echo(f"wrote the direction ({options.encoding}) to {final}")
    typer.echo(f"next: mmath valve apply --model {long} --direction {final} --alpha 0.5 -o OUT")


@valve_app.command("apply")
def valve_apply(
    model: Annotated[Path, typer.Option(help="The long-chain model L.")],
    direction: Annotated[Path, typer.Option(help="Direction folder (mmath valve extract).")],
    alpha: Annotated[
        float, typer.Option(help="Any real α: 0 is L, 1 is S, >1 shorter, <0 longer.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model folder to write.")],
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Write θ(α) = θ_L + α·Δ: a task-arithmetic merge through the engine.

    The output holds its recipe (mmath_recipe.yaml), so `mmath merge` rebuilds it;
    recipes/cot_valve.yaml is the same merge written with the short model as origin.

    Example: mmath valve apply --model qwq --direction valve/dir --alpha 0.8 -o out/qwq-a0.8
    """
    from mergekit_math.valve.build import build_alpha, check_direction

    try:
        if output.exists() and not force:
            raise UserError(f"{output} already exists; pass --force to replace it")
        for w in check_direction(model, direction):
            typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
        final = build_alpha(
            model, direction, alpha, output, device=device, force=force, progress=not quiet
        )
    except UserError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written to the output folder", code=130)
    typer.echo(f"wrote θ(α={alpha:g}) to {final}")


@valve_app.command("sweep")
def valve_sweep(
    model: Annotated[Path, typer.Option(help="The long-chain model L.")],
    direction: Annotated[Path, typer.Option(help="Direction folder (mmath valve extract).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Sweep folder.")],
    alphas: AlphasOption = "0,0.25,0.5,0.75,1,1.25",
    tasks: TasksOption = "gsm8k_cot_local",
    metric: Annotated[
        str | None,
        typer.Option(
            help="Accuracy key, e.g. exact_match,strict-match (default: "
            "exact_match,flexible-extract when the task has it)."
        ),
    ] = None,
    tolerance: Annotated[
        float, typer.Option(help="Accuracy drop allowed vs α=0 when picking α (0.01 = 1 point).")
    ] = 0.01,
    keep_models: Annotated[
        bool, typer.Option(help="Keep each θ(α) under OUTPUT/models for reuse.")
    ] = True,
    data: DataOption = None,
    device: EvalDeviceOption = "cpu",
    dtype: DtypeOption = "auto",
    batch_size: BatchOption = "8",
    limit: LimitOption = None,
    num_fewshot: FewshotOption = None,
    apply_chat_template: ChatOption = False,
    gen_kwargs: GenKwargsOption = None,
    seed: EvalSeedOption = None,
    online: OnlineOption = False,
    no_cache: NoCacheOption = False,
) -> None:
    """Evaluate θ(α) for every α: accuracy and generated tokens, valve.md and valve.png.

    Models are built into OUTPUT/models/alpha_A (reused when already there; α = 0 is the
    model itself) and evaluated as by `mmath eval` (cached). valve.md lists α, accuracy, mean
    and median tokens and the tokens saved against α = 0; valve.png plots accuracy against
    mean tokens, points labelled by α (the paper's figure). Prints the α with the fewest
    tokens whose accuracy is within --tolerance of α = 0.

    Example: mmath valve sweep --model qwq --direction valve/dir --alphas 0,0.5,1,1.25
    --tasks gsm8k_cot_local --data problems.jsonl --limit 100 -o valve/sweep
    """
    from mergekit_math.valve.build import check_direction, parse_alphas
    from mergekit_math.valve.sweep import run_sweep

    try:
        values = parse_alphas(alphas)
        options = eval_options(
            tasks,
            data,
            device,
            dtype,
            batch_size,
            limit,
            num_fewshot,
            apply_chat_template,
            gen_kwargs,
            seed,
            online,
            no_cache,
        )
        for w in check_direction(model, direction):
            typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
        rows = run_sweep(
            model,
            direction,
            values,
            options,
            output,
            metric=metric,
            device=device,
            keep_models=keep_models,
            tolerance=tolerance,
            echo=typer.echo,
        )
    except UserError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; finished α values are cached and reused on the next run", code=130)
    typer.echo((output / "valve.md").read_text())
    typer.echo(f"wrote {output / 'valve.md'} and {output / 'valve.png'}")
    base = next(r for r in rows if r.alpha == 0)
    typer.echo(f"α = 0 accuracy {base.accuracy:.4f} at {base.mean_tokens:.1f} mean tokens")


@valve_app.command("mixchain")
def valve_mixchain(
    model: Annotated[Path, typer.Option(help="The long-chain model L.")],
    direction: Annotated[Path, typer.Option(help="Direction folder (mmath valve extract).")],
    data: Annotated[Path, typer.Option(help="Questions: GSM8K JSONL ({question, answer}).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="MixChain JSONL to write.")],
    alphas: AlphasOption = "0,0.5,1",
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget per solution.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Questions generated at once.")] = 8,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: DtypeOption = "auto",
    apply_chat_template: ChatOption = False,
    prompt: Annotated[
        str, typer.Option(help="Prompt template with {question} (default: gsm8k_cot_local's).")
    ] = "Q: {question}\nA: Let's think step by step.",
    models_dir: Annotated[
        Path | None, typer.Option(help="Where θ(α) are built (default: OUTPUT.models/).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Build a MixChain dataset: per question, greedy solutions at every α, correct ones only.

    Each line of OUTPUT is {question, answer, solutions: [{alpha, text, tokens}]}, solutions
    ordered long to short; questions with no correct solution are left out. Answers are
    extracted as lm-eval's gsm8k filters do ('#### N', else the last number).

    Example: mmath valve mixchain --model qwq --direction valve/dir --alphas 0,0.5,1
    --data problems.jsonl -o mixchain.jsonl
    """
    from mergekit_math.valve.build import check_direction, parse_alphas
    from mergekit_math.valve.mixchain import mixchain

    try:
        if output.exists() and not force:
            raise UserError(f"{output} already exists; pass --force to replace it")
        if max_new_tokens < 1 or batch_size < 1:
            raise UserError("--max-new-tokens and --batch-size must be at least 1")
        values = parse_alphas(alphas)
        for w in check_direction(model, direction):
            typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
        stats, written = mixchain(
            model,
            direction,
            values,
            data,
            output,
            models_dir=models_dir or output.with_name(output.name + ".models"),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            chat=apply_chat_template,
            prompt=prompt.replace("\\n", "\n"),
            echo=typer.echo,
        )
    except UserError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written to the output file", code=130)
    typer.echo(f"{'α':>6}  {'kept':>9}  {'mean tokens (kept)':>18}  {'mean tokens (all)':>17}")
    for alpha, st in stats.items():
        mean = "-" if st["mean_tokens"] is None else f"{st['mean_tokens']:.1f}"
        typer.echo(
            f"{alpha:>6g}  {st['kept']:>4}/{st['total']:<4}  {mean:>18}  "
            f"{st['mean_tokens_all']:>17.1f}"
        )
    typer.echo(f"wrote {written} questions with at least one correct solution to {output}")


def main() -> None:
    try:
        app()
    except UserError as exc:  # pragma: no cover - commands catch their own
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
