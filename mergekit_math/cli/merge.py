"""``mmath merge``, and what it does with its output: evaluate it, check the bar, publish it.

The after-merge settings come from the merge's flags and the recipe's ``evaluate:``/``push:``
blocks, and :func:`plan_after_merge` checks everything they need before the first tensor is
read: the data file exists and every line is a GSM8K row, task files exist and declare a task,
the ``require`` bars parse, the repo id is a valid Hub id. (Built-in lm-eval task names are not
looked up here: lm-eval's task index takes about 20 s to build; a wrong name fails at
evaluation.)

Only typer- and pydantic-level modules are imported at the top; the engine, torch and lm-eval
load inside the command.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mergekit_math.cli.eval import TOKEN_HELP, check_repo_id, echo_pushed
from mergekit_math.cli.handler import fail, on_interrupt, warn, warn_token
from mergekit_math.cli.patch import size_option
from mergekit_math.errors import UserError
from mergekit_math.eval.options import (
    DataOption,
    LimitOption,
    RequireOption,
    TasksOption,
    VerboseOption,
)
from mergekit_math.io.writer import human_bytes
from mergekit_math.stages.run import StageOptions

if TYPE_CHECKING:
    from mergekit_math.eval.run import EvalOptions
    from mergekit_math.hub.gate import Requirement
    from mergekit_math.hub.publish import PushSettings
    from mergekit_math.merge import Plan
    from mergekit_math.recipe import Recipe
    from mergekit_math.stages import StageRun


@dataclass
class AfterMerge:
    """The evaluation (and the push, when ``settings`` is set) that follows a merge."""

    options: EvalOptions
    requirements: list[Requirement]
    settings: PushSettings | None
    problems: int | None = None  # problems in the data file of the shipped tasks, if given

    def describe(self) -> list[str]:
        """Lines for `mmath merge --dry-run`."""
        o = self.options
        data = "the default gsm-symbolic set" if o.data is None else str(o.data)
        if self.problems is not None:
            data += f" ({self.problems} problems)"
        limit = "all" if o.limit is None else f"{o.limit:g}"
        lines = [f"evaluate:      tasks {', '.join(o.tasks)}, data {data}, limit {limit}"]
        bars = " and ".join(str(r) for r in self.requirements)
        if self.settings is not None:
            lines.append(f"push:          {self.settings.repo_id} if {bars}")
        elif bars:
            lines.append(f"require:       {bars} (nothing is pushed)")
        return lines


def check_eval_inputs(options: EvalOptions) -> int | None:
    """What the evaluation will read, checked without running it: the data file of the
    shipped tasks (every line), task YAML files and folders. Returns the number of problems in
    the data file, when one is given."""
    from mergekit_math.eval.tasks import LOCAL_TASKS, count_data, select_tasks

    specs = list(options.tasks)
    if options.data is None:
        # The default set is generated at evaluation; nothing to check.
        specs = [s for s in specs if s not in LOCAL_TASKS]
    if specs:
        with tempfile.TemporaryDirectory(prefix="mmath-check-") as work:
            select_tasks(specs, options.data, Path(work))
    return count_data(options.tasks, options.data) if options.data is not None else None


def _renamed(exc: UserError, flag: str, key: str) -> UserError:
    """A message about ``--data``/``--tasks`` that came from the recipe names its key."""
    text = str(exc)
    return UserError(key + text[len(flag) :] if text.startswith(flag) else text)


def _push_settings(parsed: Recipe, source: str, push: str | None, no_push: bool):
    from mergekit_math.hub.publish import PushSettings

    if push is not None:
        check_repo_id(push, "--push")
        return PushSettings(push)
    if parsed.push is not None and not no_push:
        check_repo_id(parsed.push.repo_id, f"{source}: push.repo_id")
        return PushSettings(**parsed.push.model_dump())
    return None


def plan_after_merge(
    parsed: Recipe,
    recipe_dir: Path,
    *,
    source: str,
    evaluate: bool | None,
    push: str | None,
    no_push: bool,
    require: list[str] | None,
    tasks: str | None,
    data: Path | None,
    limit: str | None,
    device: str,
    verbose: bool = False,
) -> AfterMerge | None:
    """The evaluate/push settings of a merge (flags over the recipe's blocks), validated
    before any tensor is read; None when the merge is not evaluated. ``source`` names the
    recipe in messages."""
    from mergekit_math.eval.options import eval_options
    from mergekit_math.hub.publish import gate_options, parse_requirements

    b = parsed.evaluate
    if b is not None and b.data is not None:
        b.data = str((recipe_dir / b.data).resolve())
    settings = _push_settings(parsed, source, push, no_push)
    do_eval = evaluate if evaluate is not None else b is not None or settings is not None
    if settings is not None and evaluate is False:
        raise UserError(
            "--push needs the evaluation (drop --no-eval); use `mmath push "
            "--no-eval --force` to publish unevaluated"
        )
    if not do_eval:
        return None
    bars = require or (b.require if b else None) or []
    try:
        requirements = parse_requirements(bars)
    except UserError as exc:
        if require:
            raise
        raise UserError(f"{source}: evaluate.require: {exc}") from None
    if settings is not None and not requirements:
        raise UserError(
            "--push needs a bar: --require 'TASK:METRIC,FILTER>=VALUE' or evaluate.require "
            "in the recipe"
        )
    task_list = tasks or (b.tasks if b else None)
    if isinstance(task_list, list):
        task_list = ",".join(task_list)
    if not task_list and not requirements:
        raise UserError("--eval: name the tasks with --tasks or an evaluate: block")
    data_path = data if data is not None else (Path(b.data) if b and b.data else None)
    options = eval_options(
        task_list,
        data_path,
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
        verbose=verbose,
    )
    options = gate_options(requirements, options)
    try:
        problems = check_eval_inputs(options)
    except UserError as exc:
        if data is None and str(exc).startswith("--data"):
            raise _renamed(exc, "--data", f"{source}: evaluate.data") from None
        if tasks is None and str(exc).startswith("--tasks"):
            raise _renamed(exc, "--tasks", f"{source}: evaluate.tasks") from None
        raise
    return AfterMerge(options, requirements, settings, problems)


# Long by its signature: the 30-odd typer options of `mmath merge` are declared here (typer reads
# them from the signature); the body parses them and calls plan/execute/after_merge.
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
        int | None,
        typer.Option(
            help="Compute threads: chunks run on N worker threads (whole-tensor torch steps "
            "on N intra-op threads); with 2 or more, methods that prepare whole tensors "
            "prepare the next two while one merges (default: the CPUs available)."
        ),
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
    lenient: Annotated[
        bool,
        typer.Option(
            help="For recipes imported from elsewhere: unknown parameters and unknown recipe "
            "keys are warnings (and ignored, as mergekit does) instead of errors."
        ),
    ] = False,
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
    stage: Annotated[
        str | None,
        typer.Option(
            help="Multi-document recipe: build the stages document NAME needs and write NAME "
            "to OUT_DIR (default: the unnamed document, else the last).",
            metavar="NAME",
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

    A RECIPE with several YAML documents (mergekit-multi's format: each has a name: that
    later documents use as a model) is merged stage by stage; intermediate stages are kept in
    OUT_DIR.stages/NAME and reused while their recipe and inputs are unchanged.

    Example: mmath merge recipes/ties.yaml out/ties-merge --eval --push me/ties-merge
    --tasks gsm8k_cot_local --require 'gsm8k_cot_local:exact_match,flexible-extract>=0.4'
    """
    from mergekit_math.merge import build_plan, execute
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
    after_flags = dict(
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
    if stage is not None or is_multi_document(recipe):
        options = StageOptions(
            seed, allow_pickle, device, shard_size, memory, strict_finite, not quiet, force, lenient
        )
        _merge_stages(recipe, out_dir, stage, options, dry_run, threads, after_flags, token)
        return
    early: list[str] = []
    parsed = load_recipe(recipe, warnings=early if lenient else None)
    after = plan_after_merge(parsed, recipe.resolve().parent, source=str(recipe), **after_flags)
    plan = build_plan(
        parsed,
        recipe_dir=recipe.resolve().parent,
        seed=seed,
        allow_pickle=allow_pickle,
        lenient=lenient,
    )
    if out_dir.exists() and not force and not dry_run:
        raise UserError(f"{out_dir} already exists; pass --force to replace it")
    for w in early + plan.warnings:
        warn(w)
    if dry_run:
        _print_plan(plan, shard_size, memory, device, after)
        if memory is not None:
            from mergekit_math.merge import check_memory

            check_memory(plan, memory, device)
        return
    _load_torch(threads)
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
    else:  # the whole command done: the console script may end the process at once
        from mergekit_math.cli.startup import merge_done

        merge_done()


def _load_torch(threads: int | None) -> None:
    """Ready the process for a merge once planning is done (see
    :mod:`mergekit_math.cli.startup`): torch is imported by the merge where it needs it
    (:mod:`mergekit_math.merge.host`), with ``threads`` intra-op threads."""
    from mergekit_math.cli.startup import tune_malloc
    from mergekit_math.merge.host import set_threads

    tune_malloc()
    set_threads(threads)


def is_multi_document(path: Path) -> bool:
    """Whether ``path`` holds more than one recipe document (errors are left to the loader)."""
    from mergekit_math.stages import read_documents

    try:
        return len(read_documents(path)) > 1
    except UserError:
        return False


# The multi-document form of `mmath merge`: plan every stage (checks first), print or run them.
def _merge_stages(
    recipe: Path,
    out_dir: Path,
    stage: str | None,
    options: StageOptions,
    dry_run: bool,
    threads: int | None,
    after_flags: dict,
    token: str | None,
) -> None:
    from mergekit_math.stages import load_staged, plan_stages, run_stages

    on_interrupt(f"stages already merged are kept in {out_dir}.stages; {out_dir} is unchanged")
    early: list[str] = []
    staged = load_staged(recipe, early if options.lenient else None)
    target = staged.target(stage)
    after = plan_after_merge(
        target.recipe,
        recipe.resolve().parent,
        source=f"{recipe}: {target.label}",
        **after_flags,
    )
    if out_dir.exists() and not options.force and not dry_run:
        raise UserError(f"{out_dir} already exists; pass --force to replace it")
    warnings: list[str] = list(early)
    runs = plan_stages(
        staged,
        out_dir,
        stage,
        seed=options.seed,
        allow_pickle=options.allow_pickle,
        warnings=warnings,
        lenient=options.lenient,
    )
    for w in warnings:
        warn(w)
    if dry_run:
        _print_stages(runs)
        final = runs[-1]
        if final.plan is not None:
            _print_plan(
                final.plan, options.max_shard_size, options.max_memory, options.device, after
            )
            if options.max_memory is not None:
                from mergekit_math.merge import check_memory

                check_memory(final.plan, options.max_memory, options.device)
        else:
            typer.echo("the output is planned once the stages it reads are built")
            typer.echo("dry run: nothing was read or written")
        return
    _load_torch(threads)
    plan = run_stages(staged, runs, options, typer.echo, warn)
    final_dir = runs[-1].out
    typer.echo(
        f"merged {len(plan.items)} tensors ({human_bytes(plan.write_bytes)}) with "
        f"{plan.method.name} into {final_dir}"
    )
    if after is not None:
        _evaluate_and_push(final_dir, after, token)


def _print_stages(runs: list[StageRun]) -> None:
    typer.echo(f"stages:        {len(runs)}, in the order they run")
    for r in runs:
        what = "output" if r.final else "reused (unchanged)" if r.reuse else "to merge"
        n = r.stage.number
        title = f"{r.stage.name} (document {n})" if r.stage.name else f"document {n}"
        typer.echo(f"  {r.index}. {title} -> {r.out}: {what}")


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
    echo_pushed(result)


def _print_plan(
    plan: Plan, shard_size: int, max_memory: int | None, device: str, after: AfterMerge | None
) -> None:
    from mergekit_math.io.writer import plan_shards
    from mergekit_math.merge import estimated_peak_bytes

    shards = plan_shards([i.out for i in plan.items], shard_size)
    typer.echo(f"method:        {plan.method.name} ({plan.method.pretty_name})")
    typer.echo(f"inputs:        {len(plan.checkpoints)} checkpoints")
    for c in plan.checkpoints.values():
        where = c.resolved_ref
        typer.echo(f"  - {c.ref} -> {where}" if where != c.ref else f"  - {c.ref}")
    typer.echo(f"output layers: {plan.num_layers}")
    if plan.vocabulary is not None:
        source = plan.recipe.vocabulary_source
        typer.echo(f"vocabulary:    {source}: {plan.vocabulary.describe()}")
    typer.echo(f"tensors:       {len(plan.items)}")
    typer.echo(f"read:          {human_bytes(plan.read_bytes)}")
    typer.echo(f"write:         {human_bytes(plan.write_bytes)} in {len(shards)} shard(s)")
    peak = estimated_peak_bytes(plan, max_memory, device)
    typer.echo(f"est. peak mem: {human_bytes(peak)} of tensor data (plus ~300 MB for Python/torch)")
    typer.echo(f"seed:          {plan.seed}")
    for line in after.describe() if after is not None else []:
        typer.echo(line)
    typer.echo("dry run: nothing was read or written")
