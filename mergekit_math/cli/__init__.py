"""The ``mmath`` command line: the root group and its table of commands, one module per command
group (:mod:`.merge`, :mod:`.models`, :mod:`.eval`, :mod:`.data`, :mod:`.patch`, :mod:`.valve`,
:mod:`.ul2r`, :mod:`.sweep`, :mod:`.search`), all under the one error handler
(:mod:`.handler`). Each command is a thin typed function; heavy imports (torch, lm-eval,
huggingface_hub, ray, optuna) happen inside it, so ``mmath --help`` is instant."""

from __future__ import annotations

from typing import Annotated

import typer

from mergekit_math import __version__
from mergekit_math.cli import data as _data
from mergekit_math.cli import eval as _eval
from mergekit_math.cli import merge as _merge
from mergekit_math.cli import models as _models
from mergekit_math.cli import patch as _patch
from mergekit_math.cli import search as _search
from mergekit_math.cli import sweep as _sweep
from mergekit_math.cli import ul2r as _ul2r
from mergekit_math.cli import valve as _valve
from mergekit_math.cli.handler import HandledGroup

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

# The command table, in the order `mmath --help` lists it.
app.command()(_merge.merge)
app.command()(_models.inspect)
app.command()(_models.methods)
app.command("eval")(_eval.eval_)
app.command()(_eval.push)
app.add_typer(_patch.patch_app, name="patch")
app.add_typer(_valve.valve_app, name="valve")
app.add_typer(_ul2r.ul2r_app, name="ul2r")
app.add_typer(_sweep.sweep_app, name="sweep")
app.add_typer(_search.search_app, name="search")
app.add_typer(_data.data_app, name="data")


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


def main() -> None:
    """The console script: ``app`` runs every command under the one error handler
    (:class:`~mergekit_math.cli.handler.HandledGroup`), with one OpenBLAS thread
    (:func:`~mergekit_math.cli.startup.one_blas_thread`); after a merge, the exit skips the
    interpreter's final collections (:func:`~mergekit_math.cli.startup.freeze_for_exit`)."""
    from mergekit_math.cli.startup import freeze_for_exit, one_blas_thread

    one_blas_thread()  # before numpy loads
    try:
        app()
    finally:
        freeze_for_exit()


def run() -> None:
    """The ``mmath`` console script and ``python -m mergekit_math``: :func:`main`, and after a
    merge that succeeded, an exit without the interpreter's teardown
    (:func:`~mergekit_math.cli.startup.exit_after_merge`). :func:`main` itself always ends
    with ``SystemExit``, for callers in the same process."""
    from mergekit_math.cli.startup import exit_after_merge

    try:
        main()
    except SystemExit as done:
        if done.code in (0, None):
            exit_after_merge()
        raise


__all__ = ["app", "main", "run"]
