"""`mmath search`: an Optuna search over merge settings for accuracy against length.

``mmath search RECIPE --space ... --objective ... -o DIR`` runs it (it is ``mmath search
run``); ``mmath search report DIR`` rebuilds its reports with another ``--pick``. Optuna,
torch and lm-eval are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mergekit_math.cli.handler import fail, on_interrupt, warn
from mergekit_math.cli.push_best import (
    PrivateOption,
    PushBest,
    PushBestOption,
    RequireOption,
    TokenOption,
    push_flags,
    push_point,
)
from mergekit_math.cli.sweep import InMemoryOption, _RunByDefault
from mergekit_math.errors import UserError
from mergekit_math.eval.options import (
    BackendOption,
    BatchOption,
    ChatOption,
    DataOption,
    DtypeOption,
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

search_app = typer.Typer(
    cls=_RunByDefault,
    help="Search merge settings with Optuna for the best trade-off of accuracy against "
    "generated length (or any lm-eval metrics): each trial is a sweep point, merged, "
    "evaluated and recorded. `mmath search RECIPE ...` is `mmath search run RECIPE ...`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

PickOption = Annotated[
    str,
    typer.Option(
        help="Which point of the Pareto front becomes best_recipe.yaml: knee (farthest from "
        "the line between the front's extremes, objectives scaled to [0, 1]), max-accuracy, "
        "or min-tokens-within:D (fewest tokens among points within D of the best accuracy, "
        "e.g. 0.01).",
    ),
]


# Long: typer reads the 30 options from the signature; the body checks them and builds
# SearchSettings (running and reporting are in _execute).
@search_app.command("run")
def run(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML to search.")],
    space: Annotated[
        list[str],
        typer.Option(
            "--space",
            help="KEY=LOW:HIGH[:log], repeatable. KEY: a recipe path as for `mmath sweep --set` "
            "(models[1].parameters.weight, parameters.density, seed). LOW:HIGH is a real range "
            "(both ends included; :log samples it in log space); int:LOW:HIGH whole numbers "
            "(also what LOW:HIGH means for whole-number keys such as seed); a,b,c choices.",
        ),
    ],
    objective: Annotated[
        list[str],
        typer.Option(
            "--objective",
            help="Repeatable: TASK:METRIC[,FILTER]:max|min (an lm-eval metric, e.g. "
            "gsm8k_local:exact_match,flexible-extract:max) or tokens:min (mean tokens "
            "generated per sample). Two give a Pareto front; one, a plain optimum.",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="SEARCH_DIR: study.db, results.jsonl, points/, pareto.md, pareto.png, "
            "best_recipe.yaml.",
        ),
    ],
    trials: Annotated[
        int,
        typer.Option(
            help="Completed trials wanted in the study, in all: a rerun runs only the missing ones."
        ),
    ] = 20,
    sampler: Annotated[
        str,
        typer.Option(
            help="tpe (default; one or several objectives), nsga2 (several objectives), cmaes "
            "(one objective; needs the cmaes package) or random."
        ),
    ] = "tpe",
    seed: Annotated[int, typer.Option(help="Seed of the sampler.")] = 0,
    workers: Annotated[
        int, typer.Option("--workers", "-j", help="Local worker processes sharing the study.")
    ] = 1,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna RDB URL for the study (e.g. postgresql://HOST/DB), so searches on "
            "several machines share it; default: sqlite in SEARCH_DIR/study.db."
        ),
    ] = None,
    study_name: Annotated[
        str | None, typer.Option(help="The study's name in the storage (default: DIR's name).")
    ] = None,
    pick: PickOption = "knee",
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
    backend: BackendOption = "hf",
    vllm_args: VllmArgsOption = None,
    threads: Annotated[
        int | None, typer.Option(help="torch threads per trial (default: cores / workers).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda, for merging and evaluating.")] = "cpu",
    force: Annotated[
        bool, typer.Option(help="Discard SEARCH_DIR's study and recorded points; start over.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    lenient: Annotated[
        bool,
        typer.Option(help="Unknown recipe keys and parameters are warnings, as for sweep."),
    ] = False,
    baselines: Annotated[
        bool,
        typer.Option(
            help="Also evaluate the recipe's input models as they are (same settings; once, "
            "recorded in SEARCH_DIR/baselines.jsonl) and show them in pareto.md and "
            "pareto.png as reference points."
        ),
    ] = False,
    in_memory: InMemoryOption = False,
    push_best: PushBestOption = None,
    require: RequireOption = None,
    private: PrivateOption = False,
    token: TokenOption = None,
) -> None:
    """Search RECIPE's --space for the best --objective values with Optuna; every trial is
    merged, evaluated and recorded as a sweep point in SEARCH_DIR/results.jsonl.

    The study is stored in SEARCH_DIR/study.db (or --storage): the same command again runs
    only the trials missing to reach --trials; a trial interrupted by Ctrl-C is run again.
    At the end pareto.md (the non-dominated trials), pareto.png (accuracy against mean
    tokens) and best_recipe.yaml (the --pick point, for `mmath merge`) are written. With
    --push-best REPO the --pick point (its kept weights, or best_recipe.yaml merged again into
    SEARCH_DIR/best) is evaluated against the --require bars and pushed only if it clears them.

    Example: mmath search recipes/ties.yaml --space models[0].parameters.weight=0:1
    --space parameters.density=0.1:1 --objective gsm8k_local:exact_match,flexible-extract:max
    --objective tokens:min --tasks gsm8k_local --data problems.jsonl --limit 50 --trials 30
    --workers 2 -o sweeps/search
    """
    if not tasks:
        raise UserError("--tasks: name at least one task (e.g. gsm8k_local)")
    if workers < 1:
        raise UserError("--workers must be at least 1")
    push = push_flags(push_best, require, private, token)
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
        backend=backend,
        vllm_args=vllm_args,
    )
    from mergekit_math.sweep.search import SearchSettings, plan_search

    if sampler not in ("tpe", "nsga2", "cmaes", "random"):
        raise UserError(f"--sampler: expected tpe, nsga2, cmaes or random, got {sampler!r}")
    if trials < 1:
        raise UserError("--trials must be at least 1")
    settings = SearchSettings(
        recipe=recipe,
        space=space,
        objectives=objective,
        trials=trials,
        out=output,
        eval=options.model_dump(mode="json"),
        sampler=sampler,  # type: ignore[arg-type]
        seed=seed,
        workers=workers,
        storage=storage,
        study_name=study_name,
        pick=pick,
        threads=threads,
        device=device,
        force=force,
        lenient=lenient,
        baselines=baselines,
        in_memory=in_memory,
    )
    _execute(plan_search(settings), quiet, push)


def _execute(search: Any, quiet: bool, push: PushBest | None = None) -> None:
    """Run a planned search with its progress display, then write and print its reports;
    with ``push``, publish the picked point through the eval gate when no trial failed."""
    from mergekit_math.sweep.search import run_search

    s = search.settings
    for w in search.warnings:
        warn(w)
    where = f"in {s.workers} worker processes" if s.workers > 1 else "in this process"
    typer.echo(
        f"search: {s.trials} trials of {search.manifest.method} over "
        + ", ".join(d.describe() for d in search.manifest.space)
        + f" with {s.sampler} {where} -> {s.out}"
    )
    display = _Display(search, s.trials, quiet)
    on_interrupt(
        "every completed trial is recorded in "
        f"{s.out / 'study.db' if s.storage is None else s.storage}; the interrupted ones run "
        "again when you run the same command"
    )
    try:
        outcome = run_search(search, show=display.show)
    finally:
        display.close()
    failed = (
        f"{len(outcome.failed)} trials failed (first: {outcome.failed[0].error}); run the "
        "same command again to run more"
        if outcome.failed
        else ""
    )
    if outcome.complete == 0 and failed:
        fail(failed, code=1)
    if s.baselines:
        from mergekit_math.sweep.baselines import run_baselines

        _, notes = run_baselines(s.out, search.base, search.manifest.eval, typer.echo)
        for w in notes:
            warn(w)
    files = _report(s.out, s.pick, s.storage)
    if failed:
        fail(failed + ("; nothing was pushed" if push is not None else ""), code=1)
    if push is not None:
        push_point(s.out, files.picked.row, search.manifest.eval, push, quiet)


class _Display:
    """The progress bar over --trials, and one line per finished trial."""

    def __init__(self, search: Any, trials: int, quiet: bool):
        from mergekit_math.io.progress import progress as tqdm
        from mergekit_math.sweep.search import count_states, open_study

        self.objectives = search.manifest.objectives
        done = 0
        if search.out.is_dir() and not search.settings.force:
            try:
                done = count_states(open_study(search)).get("COMPLETE", 0)
            except UserError:
                done = 0  # no study yet
        typer.echo(f"  {done} trials complete, {max(0, trials - done)} to run")
        self.bar = tqdm(
            total=trials,
            initial=min(done, trials),
            unit="trial",
            desc="search",
            disable=quiet,
            dynamic_ncols=True,
        )

    def show(self, done: Any) -> None:
        from mergekit_math.sweep.grid import describe

        if done.error is not None:
            line = f"trial {done.number:>3}  {describe(done.point)}  FAILED: {done.error}"
        else:
            parts = [
                f"{'tokens' if o.is_tokens else o.spec} {v:.4g}"
                for o, v in zip(self.objectives, done.values)
            ]
            line = f"trial {done.number:>3}  {describe(done.point)}  " + "  ".join(parts)
            self.bar.update(1)
        with self.bar.external_write_mode():
            typer.echo(line)

    def close(self) -> None:
        self.bar.close()


def _report(folder: Path, pick: str, storage: str | None = None) -> Any:
    from mergekit_math.sweep.objectives import parse_pick
    from mergekit_math.sweep.pareto import table, write_pareto
    from mergekit_math.sweep.search import read_search_manifest

    manifest = read_search_manifest(folder)
    if manifest is None:
        raise UserError(f"{folder}: not a search folder (no search.json)")
    trials = _trial_points(folder, manifest, storage)
    files = write_pareto(folder, manifest, parse_pick(pick), trials)
    for w in files.warnings:
        warn(w)
    typer.echo("")
    typer.echo(f"Pareto front ({len(files.front)} of {len(files.points)} points):")
    typer.echo(table(manifest, files.front, files.picked, trials))
    typer.echo("")
    typer.echo(f"report: {files.markdown}")
    if files.plot is not None:
        typer.echo(f"plot:   {files.plot}")
    typer.echo(f"picked: {files.best_recipe} ({pick}, point {files.picked.id})")
    return files


def _trial_points(folder: Path, manifest: Any, storage: str | None) -> dict[str, list[int]]:
    """Point id -> trial numbers, from the study when it can be opened (else none)."""
    from mergekit_math.sweep.search import (
        STUDY_DB,
        Search,
        SearchSettings,
        open_study,
        trial_points,
    )

    if manifest.storage == "url" and storage is None:
        return {}
    if manifest.storage == "folder" and not (folder / STUDY_DB).is_file():
        return {}
    settings = SearchSettings(
        recipe=Path(manifest.recipe),
        space=[],
        objectives=[],
        trials=1,
        out=folder,
        eval={},
        storage=storage,
    )
    try:
        return trial_points(open_study(Search(settings, manifest, {})))
    except UserError:
        return {}


@search_app.command("report")
def report(
    search_dir: Annotated[
        Path, typer.Argument(metavar="SEARCH_DIR", help="A search folder (mmath search -o).")
    ],
    pick: PickOption = "knee",
    storage: Annotated[
        str | None,
        typer.Option(help="The study's --storage URL, when it was not SEARCH_DIR/study.db."),
    ] = None,
    push_best: PushBestOption = None,
    require: RequireOption = None,
    private: PrivateOption = False,
    token: TokenOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Rebuild SEARCH_DIR's pareto.md, pareto.png and best_recipe.yaml from its results,
    with another --pick if you like; --push-best publishes that pick as `mmath search` does.

    Example: mmath search report sweeps/search --pick min-tokens-within:0.02
    --push-best me/qwen-math-short --require 'gsm8k_local:exact_match,strict-match>=0.6'
    """
    push = push_flags(push_best, require, private, token)
    files = _report(search_dir, pick, storage)
    if push is not None:
        from mergekit_math.sweep.search import read_search_manifest

        manifest = read_search_manifest(search_dir)
        assert manifest is not None  # _report refused a folder without one
        push_point(search_dir, files.picked.row, manifest.eval, push, quiet)
