"""``mmath data``: offline evaluation data (generated GSM8K- and MATH-format problem sets)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_math.cli.handler import HandledGroup
from mergekit_math.errors import UserError

data_app = typer.Typer(
    cls=HandledGroup,
    help="Offline evaluation data: generated GSM8K-format and MATH-format problem sets.",
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


@data_app.command("math-symbolic")
def data_math_symbolic(
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL file to write.")],
    n: Annotated[int, typer.Option("-n", help="Number of problems.")] = 200,
    seed: Annotated[int, typer.Option(help="Same seed, same problems.")] = 0,
    level: Annotated[
        str, typer.Option(help="Difficulty levels as in MATH: N, LOW-HIGH or N,M,...")
    ] = "1-5",
    family: Annotated[
        list[str] | None,
        typer.Option(
            help="Only these families (repeatable): fractions, radicals, polynomials, "
            "systems, probability, modular."
        ),
    ] = None,
    integer_answers: Annotated[
        bool,
        typer.Option(help="Only problems whose answer is an integer 0-999 (for aime_local)."),
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Write N MATH-style problems with boxed answers in MATH-500 JSONL format.

    Rows hold problem, solution (ending in \\boxed{answer}), answer (LaTeX), level (1-5),
    subject and unique_id; every answer is computed with sympy. Use the file with
    `mmath eval MODEL --tasks math_local --data FILE` (or aime_local with --integer-answers).

    Example: mmath data math-symbolic -n 200 --seed 0 --level 1-5 -o math.jsonl
    """
    from mergekit_math.data.math_symbolic import generate, parse_levels, write_jsonl

    if output.exists() and not force:
        raise UserError(f"{output} already exists; pass --force to replace it")
    levels = parse_levels(level)
    problems = generate(
        n, seed=seed, levels=levels, families=family or None, integer_answers=integer_answers
    )
    write_jsonl(problems, output)
    used = sorted({p.family for p in problems})
    typer.echo(
        f"wrote {len(problems)} problems from {len(used)} families, levels "
        f"{','.join(map(str, levels))} (seed {seed}) to {output}"
    )
