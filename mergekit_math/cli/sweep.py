"""`mmath sweep`: merge and evaluate a recipe at many settings, locally or on Ray.

``mmath sweep RECIPE --set ... -o DIR`` runs a sweep (it is ``mmath sweep run``);
``mmath sweep report DIR`` rebuilds its reports. Heavy imports happen inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mergekit_math.cli.handler import HandledGroup, fail, warn
from mergekit_math.cli.push_best import (
    PrivateOption,
    PushBestOption,
    RequireOption,
    TokenOption,
    push_flags,
    push_point,
)
from mergekit_math.errors import UserError
from mergekit_math.eval.options import (
    BatchOption,
    ChatOption,
    DataOption,
    DtypeOption,
    EvalBackendOption,
    EvalSeedOption,
    FewshotOption,
    GenKwargsOption,
    LimitOption,
    NoCacheOption,
    OnlineOption,
    TasksOption,
    VerboseOption,
    VllmArgsOption,
    eval_options,
)


class _RunByDefault(HandledGroup):
    """A group whose first argument, when it is not a subcommand, starts ``run``: so
    ``mmath sweep RECIPE ...`` is ``mmath sweep run RECIPE ...``."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


sweep_app = typer.Typer(
    cls=_RunByDefault,
    help="Sweep merge settings: merge and evaluate a recipe at every point of a grid (or a "
    "random sample of it), locally or on a Ray cluster. `mmath sweep RECIPE ...` is "
    "`mmath sweep run RECIPE ...`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


MetricOption = Annotated[
    str | None,
    typer.Option(
        help="Primary metric, TASK:METRIC[,FILTER] (e.g. gsm8k_local:exact_match,strict-match); "
        "default: the first metric of the first task.",
    ),
]


InMemoryOption = Annotated[
    bool,
    typer.Option(
        "--in-memory",
        help="Merge each point straight into a model kept loaded in this worker (RAM or "
        "GPU) and evaluate it there: no weights are written or read back, except for kept "
        "points. Same bytes as the files; a point whose model differs in shape is merged "
        "to disk.",
    ),
]


# Long: typer reads the 25 options from the signature (30 lines), and the body checks flag
# combinations, builds SweepSettings, runs the sweep and reports/pushes; splitting the
# reporting tail out is the next step.
@sweep_app.command("run")
def run(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML to sweep.")],
    sets: Annotated[
        list[str],
        typer.Option(
            "--set",
            "-s",
            help="KEY=VALUES, repeatable (several form a grid). KEY: a recipe path such as "
            "models[1].parameters.weight, parameters.density, parameters.lambda or seed. "
            "VALUES: START:STOP:STEP (STOP included), log:START:STOP:N, or a comma list.",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="SWEEP_DIR: results.jsonl, points/, report.md, sweep.png."
        ),
    ],
    tasks: TasksOption = None,
    data: DataOption = None,
    limit: LimitOption = None,
    num_fewshot: FewshotOption = None,
    gen_kwargs: GenKwargsOption = None,
    apply_chat_template: ChatOption = False,
    dtype: DtypeOption = "auto",
    batch_size: BatchOption = "8",
    eval_seed: EvalSeedOption = None,
    online: OnlineOption = False,
    no_cache: NoCacheOption = False,
    verbose: VerboseOption = False,
    eval_backend: EvalBackendOption = "hf",
    vllm_args: VllmArgsOption = None,
    metric: MetricOption = None,
    random: Annotated[
        int | None,
        typer.Option("--random", help="Sample N distinct grid points instead of all of them."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of --random (same seed, same points).")] = 0,
    keep: Annotated[
        str,
        typer.Option(help="Weights to keep after evaluating: none, all or best."),
    ] = "none",
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", help="Local worker processes (points at once).")
    ] = 1,
    threads: Annotated[
        int | None,
        typer.Option(help="torch threads per point (default: cores / jobs, or cpus-per-point)."),
    ] = None,
    backend: Annotated[str, typer.Option(help="local or ray.")] = "local",
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster: auto or ray://HOST:PORT (default: start Ray here)."),
    ] = None,
    cpus_per_point: Annotated[
        float | None, typer.Option(help="Ray: CPUs each point reserves (default 1).")
    ] = None,
    gpus_per_point: Annotated[
        float | None, typer.Option(help="Ray: GPUs each point reserves (default 0).")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="cpu or cuda for merging and evaluating (default: cuda with GPUs)."),
    ] = None,
    push_best: PushBestOption = None,
    require: RequireOption = None,
    private: PrivateOption = False,
    token: TokenOption = None,
    force: Annotated[
        bool, typer.Option(help="Discard SWEEP_DIR's recorded points and start over.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="List the points and which are recorded; run nothing.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    lenient: Annotated[
        bool,
        typer.Option(
            help="For recipes imported from elsewhere: unknown parameters and recipe keys are "
            "warnings (and left out of every point's recipe) instead of errors."
        ),
    ] = False,
    in_memory: InMemoryOption = False,
) -> None:
    """Merge and evaluate RECIPE at every point of the --set grid; rows go to
    SWEEP_DIR/results.jsonl as points finish.

    Each point's resolved recipe is written to SWEEP_DIR/points/ID/recipe.yaml; it is merged
    into a scratch folder, evaluated as by `mmath eval`, recorded (values, metrics,
    chain-of-thought lengths, timings, output fingerprint) and its weights deleted unless
    --keep. The same command again skips the points already recorded, so an interrupted
    sweep resumes where it stopped. At the end report.md, sweep.png and best_recipe.yaml are
    written (`mmath sweep report` rebuilds them).

    Example: mmath sweep recipes/ties.yaml --set models[0].parameters.density=0.2:1:0.2
    --set models[0].parameters.weight=0.5,1 --tasks gsm8k_local --data problems.jsonl
    --limit 50 -o sweeps/ties --jobs 2

    Example: mmath sweep recipes/dare_ties.yaml --set parameters.lambda=log:0.25:4:5
    --tasks gsm8k_cot_local --backend ray --address auto --gpus-per-point 1 -o sweeps/dare
    """
    push = push_flags(push_best, require, private, token)  # first: it warns about --token
    _check_run_flags(keep, backend, address, cpus_per_point, gpus_per_point, jobs, threads, random)
    if device is None:
        device = "cuda" if gpus_per_point else "cpu"
    if not tasks:
        raise UserError("--tasks: name at least one task (e.g. gsm8k_local)")
    options = eval_options(
        tasks,
        data.resolve() if data is not None else None,
        device,
        dtype,
        batch_size,
        limit,
        num_fewshot,
        apply_chat_template,
        gen_kwargs,
        eval_seed,
        online,
        no_cache,
        verbose=verbose,
        backend=eval_backend,
        vllm_args=vllm_args,
        backend_flag="--eval-backend",
    )
    from mergekit_math.sweep.report import parse_metric
    from mergekit_math.sweep.runner import SweepSettings, plan_sweep

    if metric is not None:
        parse_metric(metric)
    settings = SweepSettings(
        recipe=recipe,
        sets=sets,
        out=output,
        eval=options.model_dump(mode="json"),
        random=random,
        seed=seed,
        metric=metric,
        keep=keep,  # type: ignore[arg-type]
        jobs=jobs,
        threads=threads,
        backend=backend,  # type: ignore[arg-type]
        address=address,
        cpus_per_point=cpus_per_point or 1.0,
        gpus_per_point=gpus_per_point or 0.0,
        device=device,
        force=force,
        lenient=lenient,
        in_memory=in_memory,
    )
    sweep = plan_sweep(settings)
    for w in sweep.warnings:
        warn(w)
    done = len(sweep.points) - len(sweep.todo)
    if dry_run:
        _print_points(sweep)
        return
    where = (
        f"on Ray ({address or 'a local instance'})"
        if backend == "ray"
        else f"in {jobs} worker processes"
        if jobs > 1
        else "in this process"
    )
    typer.echo(
        f"sweep: {len(sweep.points)} points of {sweep.manifest.method} "
        f"({done} recorded, {len(sweep.todo)} to run) {where} -> {output}"
    )
    outcome = None
    try:
        if sweep.todo:
            from mergekit_math.sweep.runner import run_sweep

            outcome = run_sweep(sweep, echo=typer.echo, progress=not quiet)
    except KeyboardInterrupt:
        _try_report(output, metric)  # the report of what was recorded, then the one message
        fail(
            "interrupted; every finished point is recorded in "
            f"{output / 'results.jsonl'}; run the same command again to resume",
            code=130,
        )
    files = _report(output, metric)
    if outcome is not None and outcome.failed:
        fail(
            f"{len(outcome.failed)} of {len(sweep.todo)} points failed (first: "
            f"{outcome.failed[0][1]}); run the same command again to retry them",
            code=1,
        )
    if outcome is not None and outcome.busy:
        fail(
            f"{len(outcome.busy)} of {len(sweep.todo)} points are being run by another "
            "process (an earlier sweep's worker?) and were not recorded; run the same command "
            "again once it ends",
            code=1,
        )
    if push is not None and files is not None:
        push_point(output, files.best, sweep.manifest.eval, push, quiet)


def _check_run_flags(
    keep: str,
    backend: str,
    address: str | None,
    cpus_per_point: float | None,
    gpus_per_point: float | None,
    jobs: int,
    threads: int | None,
    random: int | None,
) -> None:
    """The flags of `mmath sweep run` that only need each other, checked before planning."""
    if keep not in ("none", "all", "best"):
        raise UserError(f"--keep: expected none, all or best, got {keep!r}")
    if backend not in ("local", "ray"):
        raise UserError(f"--backend: expected local or ray, got {backend!r}")
    if backend == "local":
        for flag, value in (
            ("--address", address),
            ("--cpus-per-point", cpus_per_point),
            ("--gpus-per-point", gpus_per_point),
        ):
            if value is not None:
                raise UserError(f"{flag} is for --backend ray")
    elif jobs != 1:
        raise UserError(
            "--jobs is for --backend local; on Ray as many points run at once as "
            "--cpus-per-point and --gpus-per-point allow"
        )
    if jobs < 1:
        raise UserError("--jobs must be at least 1")
    if threads is not None and threads < 1:
        raise UserError("--threads must be at least 1")
    if random is not None and random < 1:
        raise UserError("--random: N must be at least 1")
    if (cpus_per_point is not None and cpus_per_point <= 0) or (
        gpus_per_point is not None and gpus_per_point < 0
    ):
        raise UserError("--cpus-per-point must be positive and --gpus-per-point not negative")


def _print_points(sweep: Any) -> None:
    from mergekit_math.sweep.grid import describe

    recorded = {r.get("recipe_hash") for r in sweep.rows}
    for p in sweep.points:
        status = "recorded" if p.hash in recorded else "to run"
        typer.echo(f"{p.id}  {status:<8}  {describe(p.point)}")
    typer.echo(
        f"dry run: {len(sweep.points)} points ({len(sweep.points) - len(sweep.todo)} recorded, "
        f"{len(sweep.todo)} to run); nothing was merged"
    )


def _report(folder: Path, metric: str | None) -> Any:
    from mergekit_math.sweep.report import markdown_table, write_report

    files = write_report(folder, metric)
    for w in files.warnings:
        warn(w)
    typer.echo("")
    typer.echo(markdown_table(files.manifest, files.rows, files.ranking, limit=10))
    if len(files.rows) > 10:
        typer.echo(f"({len(files.rows) - 10} more in {files.markdown})")
    typer.echo("")
    typer.echo(f"report: {files.markdown}")
    if files.plot is not None:
        typer.echo(f"plot:   {files.plot}")
    if files.best_recipe is not None:
        typer.echo(f"best:   {files.best_recipe}")
    return files


def _try_report(folder: Path, metric: str | None) -> None:
    """After an interrupt: the report of what was recorded, if anything was."""
    from mergekit_math.sweep.report import write_report

    try:
        write_report(folder, metric)
    except (UserError, ImportError, OSError):
        pass


@sweep_app.command("report")
def report(
    sweep_dir: Annotated[
        Path, typer.Argument(metavar="SWEEP_DIR", help="A sweep folder (mmath sweep -o).")
    ],
    metric: MetricOption = None,
) -> None:
    """Rebuild SWEEP_DIR's report.md, sweep.png and best_recipe.yaml from its results.jsonl.

    Example: mmath sweep report sweeps/ties --metric gsm8k_local:exact_match,flexible-extract
    """
    if metric is not None:
        from mergekit_math.sweep.report import parse_metric

        parse_metric(metric)
    _report(sweep_dir, metric)
