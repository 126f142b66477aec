"""``mmath valve``: CoT-Valve chain-length directions (extract, apply, sweep, mixchain). Thin
commands; errors go through the one handler (:mod:`mergekit_math.cli.handler`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_math.cli.handler import HandledGroup, on_interrupt, warn
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
    TasksOption,
    VerboseOption,
    eval_options,
)

valve_app = typer.Typer(
    cls=HandledGroup,
    help="CoT-Valve: a weight-space direction that sets chain-of-thought length. "
    "θ(α) = θ_long + α·Δ, Δ = θ_short − θ_long; α in (0, 1) interpolates, α > 1 shortens "
    "further, α < 0 lengthens.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
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

    on_interrupt("nothing was written to the output folder")
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
        warn(w)
    src = f"--short {short}" if short is not None else f"--lora {lora}"
    command = f"mmath valve extract --long {long} {src} -o {output} --encoding {options.encoding}"
    final = extract(plan, output, force=force, progress=not quiet, command=command)
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

    on_interrupt("nothing was written to the output folder")
    if output.exists() and not force:
        raise UserError(f"{output} already exists; pass --force to replace it")
    for w in check_direction(model, direction):
        warn(w)
    final = build_alpha(
        model, direction, alpha, output, device=device, force=force, progress=not quiet
    )
    typer.echo(f"wrote θ(α={alpha:g}) to {final}")


# Long by its signature: typer reads the options from it; the body builds one valve sweep.
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
    verbose: VerboseOption = False,
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

    on_interrupt("finished α values are cached and reused on the next run")
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
        verbose=verbose,
    )
    for w in check_direction(model, direction):
        warn(w)
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

    on_interrupt("nothing was written to the output file")
    if output.exists() and not force:
        raise UserError(f"{output} already exists; pass --force to replace it")
    if max_new_tokens < 1 or batch_size < 1:
        raise UserError("--max-new-tokens and --batch-size must be at least 1")
    values = parse_alphas(alphas)
    for w in check_direction(model, direction):
        warn(w)
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
    typer.echo(f"{'α':>6}  {'kept':>9}  {'mean tokens (kept)':>18}  {'mean tokens (all)':>17}")
    for alpha, st in stats.items():
        mean = "-" if st["mean_tokens"] is None else f"{st['mean_tokens']:.1f}"
        typer.echo(
            f"{alpha:>6g}  {st['kept']:>4}/{st['total']:<4}  {mean:>18}  "
            f"{st['mean_tokens_all']:>17.1f}"
        )
    typer.echo(f"wrote {written} questions with at least one correct solution to {output}")
