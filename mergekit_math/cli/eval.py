"""``mmath eval`` and ``mmath push``: evaluate a model folder with lm-eval; publish it to the
Hub behind the eval gate. Also what ``mmath merge --eval --push`` and ``mmath sweep --push-best``
share with them: the repo id check, the --token help, the printed result of a push. lm-eval and
huggingface_hub are imported inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_math.cli.handler import fail, on_interrupt, warn, warn_token
from mergekit_math.errors import UserError
from mergekit_math.eval.options import (
    BackendOption,
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
    SamplesOption,
    TasksOption,
    VerboseOption,
    VllmArgsOption,
    eval_options,
)

TOKEN_HELP = (
    "Hub token{what}. Visible in the process list while mmath runs: prefer HF_TOKEN in the "
    "environment (default: HF_TOKEN, then the saved login). Never printed or stored."
)


def check_repo_id(repo_id: str, where: str) -> None:
    """A Hub model id NAMESPACE/NAME as the Hub accepts it."""
    from mergekit_math.io.resolve import HUB_ID

    problem = None
    if not HUB_ID.match(repo_id):
        problem = "expected NAMESPACE/NAME, e.g. my-name/qwen-math-ties"
    else:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            problem = str(exc).splitlines()[0]
    if problem:
        raise UserError(f"{where}: repo id {repo_id!r}: {problem}")


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
    samples: SamplesOption = 1,
    seed: EvalSeedOption = None,
    online: OnlineOption = False,
    no_cache: NoCacheOption = False,
    verbose: VerboseOption = False,
    backend: BackendOption = "hf",
    vllm_args: VllmArgsOption = None,
) -> None:
    """Evaluate MODEL_DIR with lm-eval and print accuracy and chain-of-thought lengths.

    The model is loaded once for all tasks. Results are cached by (model fingerprint, task
    config, limit, few-shot, generation settings): a repeated evaluation is instant unless
    --no-cache. Runs offline unless --online. For generative tasks the table also shows the
    tokens generated per problem (the stored response re-tokenised with the model's tokenizer,
    cut at the first stop string): mean / median / 90th percentile. With --samples K each
    problem is generated K times and the table adds avg@K, pass@k and maj@K; tasks whose
    problems have a level or subject (math_local) also get accuracy and tokens per level and
    subject.

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
        samples=samples,
        backend=backend,
        vllm_args=vllm_args,
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


# Long by its signature: typer reads `mmath push`'s options from it; the body checks them and
# calls hub.push once.
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
    backend: BackendOption = "hf",
    vllm_args: VllmArgsOption = None,
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
            backend=backend,
            vllm_args=vllm_args,
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
    echo_pushed(result)


def echo_pushed(result) -> None:
    typer.echo(f"pushed to {result.url}")
    typer.echo(f"commit {result.commit_id}: {result.commit_url}")
    if result.pr_url:
        typer.echo(f"pull request: {result.pr_url}")
