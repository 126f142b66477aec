"""``mmath data``: offline evaluation data (generated GSM8K-format problem sets)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_math.cli.handler import HandledGroup
from mergekit_math.errors import UserError

data_app = typer.Typer(
    cls=HandledGroup,
    help="Offline evaluation data: generated GSM8K-format problem sets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


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
