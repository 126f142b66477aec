"""``mmath ul2r``: write a UL2R config, preview its examples, continue training a model.

Thin commands: parse, validate, call one library function. torch and transformers are imported
inside the command bodies only.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from mergekit_math.cli.handler import HandledGroup, on_interrupt, warn
from mergekit_math.errors import UserError

ul2r_app = typer.Typer(
    cls=HandledGroup,
    help="UL2R continued training: a mixture of denoisers (span corruption, prefix LM, causal "
    "LM) with mode tokens and sentinels, optional domain upsampling at the end, checkpoints "
    "that mmath merge accepts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


DataOption = Annotated[
    list[str] | None,
    typer.Option(
        "--data",
        metavar="FILE[,FILE...]",
        help="Training files, comma-separated or repeated: JSONL (a 'text' field per line) or "
        "plain text (documents separated by blank lines); replaces data.paths. With "
        "domain_upsampling: NAME=FILE per source.",
    ),
]


@ul2r_app.command("config")
def config_cmd(
    model: Annotated[str, typer.Option(help="Model folder or Hub id to continue training.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Config YAML to write.")],
    preset: Annotated[
        str, typer.Option(help="Denoiser mixture: ul2r (U-PaLM), ul2 (UL2 paper) or causal-mix.")
    ] = "ul2r",
    data: DataOption = None,
    sequence_length: Annotated[
        int | None, typer.Option(help="Tokens per example (default 512).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default 1000).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step (default 8).")] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help="Peak learning rate (default 2e-5).")
    ] = None,
    text_template: Annotated[
        str | None,
        typer.Option(
            help="JSONL text from several fields, e.g. 'Question: {question}\\nAnswer: {answer}' "
            "for mmath data gsm-symbolic files (\\n is a newline)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Write a complete, commented UL2R config that `mmath ul2r train` runs unchanged.

    The comments cite the preset's source and note where the UL2 and U-PaLM papers disagree.
    The number of sentinels is set to what the longest example needs.

    Example: mmath ul2r config --model HuggingFaceTB/SmolLM2-135M -o ul2r.yaml --preset ul2r
    """
    from mergekit_math.ul2r.presets import build_config, render_config

    if output.exists() and not force:
        raise UserError(f"{output} already exists; pass --force to replace it")
    overrides = {
        "training.sequence_length": sequence_length,
        "training.steps": steps,
        "training.batch_size": batch_size,
        "training.learning_rate": learning_rate,
        "data.text_template": text_template.replace("\\n", "\n") if text_template else None,
    }
    files = [p for item in data or [] for p in item.split(",") if p.strip()]
    config = build_config(
        model,
        preset,
        data=files,
        overrides={k: v for k, v in overrides.items() if v is not None},
    )
    data_arg = "" if files else " --data FILE"
    command = f"mmath ul2r train {shlex.quote(str(output))}{data_arg} -o out/ul2r"
    text = render_config(config, command)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(output)
    n = len(config.denoisers)
    typer.echo(
        f"wrote {output}: preset {preset}, {n} denoisers, {config.tokens.num_sentinels} sentinels, "
        f"sequence length {config.training.sequence_length}"
    )
    typer.echo(f"run it with: {command}")


@ul2r_app.command("preview")
def preview_cmd(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="UL2R config YAML.")],
    data: DataOption = None,
    examples: Annotated[int, typer.Option("--examples", "-n", help="Examples per denoiser.")] = 2,
    length: Annotated[
        int | None,
        typer.Option(help="Sequence length for the preview (default: the config's)."),
    ] = None,
    color: Annotated[
        bool | None,
        typer.Option("--color/--no-color", help="ANSI colour (default: when stdout is a tty)."),
    ] = None,
) -> None:
    """Print examples of every denoiser: inputs with sentinels, targets and the loss mask.

    Only the tokenizer is loaded; the examples are made as training makes them.

    Example: mmath ul2r preview ul2r.yaml --data problems.jsonl -n 2 --length 128
    """
    from mergekit_math.ul2r.config import load_config
    from mergekit_math.ul2r.preview import preview

    if color is None:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    parsed = load_config(config)
    text = preview(
        parsed,
        config_dir=config.resolve().parent,
        data=data,
        examples=examples,
        length=length,
        color=color,
    )
    typer.echo(text, nl=False, color=color)


@ul2r_app.command("train")
def train_cmd(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="UL2R config YAML.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")],
    data: DataOption = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (cuda:N).")] = "cpu",
    resume: Annotated[
        bool, typer.Option(help="Continue from the latest checkpoint in OUTPUT.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Delete an existing OUTPUT and start over.")] = False,
    stop_after: Annotated[
        int | None,
        typer.Option(help="Save a checkpoint and stop after this many steps (then --resume)."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch intra-op threads (default: torch's choice).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Continue training the config's model with its mixture of denoisers.

    Checkpoints go to OUTPUT/checkpoint-NNNNNN (resumable: weights, optimizer, scheduler, RNG
    and data position) and the finished model to OUTPUT/final, in HF layout with safetensors,
    ready for mmath merge, patch extract and eval. Loss per step is logged to OUTPUT/log.jsonl.

    Memory (float32 on a CPU): about 0.6 GB of libraries, 16 bytes per parameter (weights,
    gradients, AdamW's two moments) and the activations of one micro-batch, which grow with
    training.batch_size x training.sequence_length x layers. SmolLM2-135M at 8 x 512 tokens
    peaks at about 9 GB, 4.6 GB with training.gradient_checkpointing: true; halving
    batch_size (doubling gradient_accumulation_steps) halves the activations.

    Example: mmath ul2r train ul2r.yaml --data math.jsonl,web.jsonl -o out/ul2r --device cuda

    Example: mmath ul2r train ul2r.yaml --data math.jsonl -o out/ul2r --resume
    """
    from mergekit_math.ul2r.config import load_config
    from mergekit_math.ul2r.train import train

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if threads is not None:
        if threads < 1:
            raise UserError("--threads must be at least 1")
        import torch

        torch.set_num_threads(threads)
    on_interrupt(f"continue with --resume from the last checkpoint in {output}")
    parsed = load_config(config)
    result = train(
        parsed,
        output,
        config_dir=config.resolve().parent,
        data=data,
        device=device,
        resume=resume,
        force=force,
        stop_after=stop_after,
        progress=not quiet,
        echo=typer.echo,
        warn=warn,
    )
    last = next((r for r in reversed(result.history) if "loss" in r), None)
    loss = f", last loss {last['loss']:.4f}" if last else ""
    if result.final is not None:
        typer.echo(f"trained {result.step} steps{loss}; model: {result.final}")
    else:
        typer.echo(
            f"stopped after {result.step} steps{loss}; continue with --resume "
            f"(checkpoint {result.checkpoints[-1] if result.checkpoints else output})"
        )
