"""The ``mmath`` command line: one thin function per command; heavy imports inside them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mergekit_math import __version__
from mergekit_math.cli.handler import HandledGroup, fail, on_interrupt, warn, warn_token
from mergekit_math.cli.patch import patch_app, size_option
from mergekit_math.cli.valve import valve_app
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
    VerboseOption,
    eval_options,
)
from mergekit_math.io.writer import human_bytes

if TYPE_CHECKING:
    from mergekit_math.cli.merge import AfterMerge
    from mergekit_math.engine import Plan

app = typer.Typer(
    name="mmath",
    cls=HandledGroup,
    help="Merge and edit LLM weights for math reasoning: streaming, memory-bounded, "
    "mergekit-compatible recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(patch_app, name="patch")
app.add_typer(valve_app, name="valve")

TOKEN_HELP = (
    "Hub token{what}. Visible in the process list while mmath runs: prefer HF_TOKEN in the "
    "environment (default: HF_TOKEN, then the saved login). Never printed or stored."
)


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
    recipe: Annotated[
        Path,
        typer.Argument(metavar="RECIPE", help="Recipe YAML (mergekit format plus extensions)."),
    ],
    out_dir: Annotated[
        Path,
        typer.Argument(metavar="OUT_DIR", help="Output folder; must not exist unless --force."),
    ],
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
    verbose: VerboseOption = False,
    token: Annotated[
        str | None, typer.Option(help=TOKEN_HELP.format(what=" for --push"), show_default=False)
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
    from mergekit_math.cli.merge import plan_after_merge
    from mergekit_math.engine import build_plan, execute
    from mergekit_math.recipe import load_recipe

    shard_size = size_option("--out-shard-size", out_shard_size)
    memory = size_option("--max-memory", max_memory) if max_memory is not None else None
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device: expected cpu or cuda, got {device!r}")
    if threads is not None and threads < 1:
        raise UserError("--threads must be at least 1")
    if token is not None:
        warn_token()
    on_interrupt("nothing was written to the output folder")
    parsed = load_recipe(recipe)
    after = plan_after_merge(
        parsed,
        recipe.resolve().parent,
        source=str(recipe),
        evaluate=evaluate,
        push=push,
        no_push=no_push,
        require=require,
        tasks=tasks,
        data=data,
        limit=limit,
        device=device,
        verbose=verbose,
    )
    plan = build_plan(
        parsed, recipe_dir=recipe.resolve().parent, seed=seed, allow_pickle=allow_pickle
    )
    if out_dir.exists() and not force and not dry_run:
        raise UserError(f"{out_dir} already exists; pass --force to replace it")
    for w in plan.warnings:
        warn(w)
    if dry_run:
        _print_plan(plan, shard_size, memory, device, after)
        if memory is not None:
            from mergekit_math.engine import check_memory

            check_memory(plan, memory, device)
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
        max_memory=memory,
        strict_finite=strict_finite,
    )
    typer.echo(
        f"merged {len(plan.items)} tensors ({human_bytes(plan.write_bytes)}) with "
        f"{plan.method.name} into {final}"
    )
    if after is not None:
        _evaluate_and_push(final, after, token)


def _evaluate_and_push(model_dir: Path, after: AfterMerge, token: str | None) -> None:
    from mergekit_math.eval.run import evaluate, format_table
    from mergekit_math.hub.publish import GateFailed, publish, run_gate

    on_interrupt(f"the merge is kept at {model_dir}")
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
            warn=warn,
            report=report,
        )
    except GateFailed as exc:
        typer.echo(exc.table)
        pushed = ", nothing was pushed" if after.settings is not None else ""
        fail(f"{exc}; the merge is kept at {model_dir}{pushed}", code=1)
    except UserError as exc:
        raise UserError(f"{exc} (the merge is kept at {model_dir})") from None
    _echo_pushed(result)


def _print_plan(
    plan: Plan, shard_size: int, max_memory: int | None, device: str, after: AfterMerge | None
) -> None:
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
    for line in after.describe() if after is not None else []:
        typer.echo(line)
    typer.echo("dry run: nothing was read or written")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(metavar="MODEL_DIR", help="A model folder.")],
    tensors: Annotated[
        bool, typer.Option("--tensors", help="List every tensor (in layer order).")
    ] = False,
) -> None:
    """Describe a checkpoint from its headers only: architecture, dtypes, parameters, shards.

    Example: mmath inspect out/ties-merge --tensors
    """
    from collections import Counter

    from mergekit_math.io.reader import Checkpoint, tensor_order

    ckpt = Checkpoint(path, allow_pickle=False)
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
        for name in sorted(ckpt.tensors, key=tensor_order):
            t = ckpt.tensors[name]
            typer.echo(f"{name:<{width}}  {t.dtype:<9} {list(t.shape)}")


@app.command()
def methods() -> None:
    """List the merge methods: paper, inputs, and every parameter with its default (* marks a
    required one). Reads the method registry only; torch is not imported."""
    from mergekit_math.methods.listing import listing

    for line in listing():
        typer.echo(line)


# =============================================================================== mmath ul2r

from mergekit_math.cli.ul2r import ul2r_app  # noqa: E402  (typer only; torch loads in commands)

app.add_typer(ul2r_app, name="ul2r")

from mergekit_math.cli.sweep import sweep_app  # noqa: E402  (typer only; the rest in commands)

app.add_typer(sweep_app, name="sweep")


# =============================================================================== mmath data

data_app = typer.Typer(
    cls=HandledGroup,
    help="Offline evaluation data: generated GSM8K-format problem sets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(data_app, name="data")


def _list_templates(value: bool) -> None:
    if value:
        from mergekit_math.data.gsm_symbolic import TEMPLATES

        width = max(len(name) for name in TEMPLATES)
        for t in TEMPLATES.values():
            typer.echo(f"{t.name:<{width}}  {t.description}")
        raise typer.Exit()


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
    list_templates: Annotated[
        bool | None,
        typer.Option(
            "--list-templates",
            callback=_list_templates,
            is_eager=True,
            help="Print the template names with a one-line description and exit.",
        ),
    ] = None,
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
        raise UserError(f"{output} already exists; pass --force to replace it")
    problems = generate(n, seed=seed, templates=template or None)
    write_jsonl(problems, output)
    used = sorted({p.template for p in problems})
    typer.echo(
        f"wrote {len(problems)} problems from {len(used)} of {len(TEMPLATES)} templates "
        f"(seed {seed}) to {output}"
    )


# =============================================================================== mmath eval


@app.command("eval")
def eval_(
    model_dir: Annotated[
        Path, typer.Argument(metavar="MODEL_DIR", help="Model folder (e.g. a merge output).")
    ],
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
    verbose: VerboseOption = False,
) -> None:
    """Evaluate MODEL_DIR with lm-eval and print accuracy and chain-of-thought lengths.

    The model is loaded once for all tasks. Results are cached by (model fingerprint, task
    config, limit, few-shot, generation settings): a repeated evaluation is instant unless
    --no-cache. Runs offline unless --online. For generative tasks the table also shows the
    tokens generated per problem (the stored response re-tokenised with the model's tokenizer,
    cut at the first stop string): mean / median / 90th percentile.

    Example: mmath eval out/ties-merge --tasks gsm8k_cot_local --data problems.jsonl --limit 50
    """
    from mergekit_math.eval.run import evaluate, format_table, write_output

    on_interrupt("no result was cached for the tasks in progress")
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
        verbose=verbose,
    )
    report = evaluate(model_dir, options)
    if output is not None:
        write_output(report, options, output)
    typer.echo(format_table(report))
    hits = [t for t, hit in report.cached.items() if hit]
    note = f"; from cache: {', '.join(hits)}" if hits else ""
    typer.echo(f"\n{report.model} ({report.fingerprint[:20]}…) in {report.seconds:.1f} s{note}")
    if output is not None:
        typer.echo(f"results written to {output / 'results.json'}")


# =============================================================================== mmath push


@app.command()
def push(
    model_dir: Annotated[
        Path, typer.Argument(metavar="MODEL_DIR", help="Model folder to publish.")
    ],
    repo_id: Annotated[
        str, typer.Argument(metavar="REPO_ID", help="Hub repository, NAMESPACE/NAME.")
    ],
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
        str | None, typer.Option(help=TOKEN_HELP.format(what=""), show_default=False)
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
    verbose: VerboseOption = False,
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
    from mergekit_math.cli.merge import check_repo_id
    from mergekit_math.hub.publish import GateFailed, PushSettings, parse_requirements, publish

    if token is not None:
        warn_token()
    if no_eval and not force:
        raise UserError("--no-eval publishes an unevaluated model: add --force to confirm")
    if no_eval and require:
        raise UserError("--require and --no-eval contradict each other")
    check_repo_id(repo_id, "REPO_ID")
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
            verbose=verbose,
        )
    try:
        result = publish(
            model_dir,
            PushSettings(repo_id, private, revision, commit_message, create_pr),
            requirements=requirements,
            options=options,
            token=token,
            echo=typer.echo,
            warn=warn,
        )
    except GateFailed as exc:
        typer.echo(exc.table)
        fail(f"{exc}; nothing was pushed", code=1)
    _echo_pushed(result)


def _echo_pushed(result) -> None:
    typer.echo(f"pushed to {result.url}")
    typer.echo(f"commit {result.commit_id}: {result.commit_url}")
    if result.pr_url:
        typer.echo(f"pull request: {result.pr_url}")


def main() -> None:
    """The console script: ``app`` runs every command under the one error handler
    (:class:`~mergekit_math.cli.handler.HandledGroup`)."""
    app()


if __name__ == "__main__":
    main()
