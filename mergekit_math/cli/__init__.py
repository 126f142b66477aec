"""The ``mmath`` command line: the root group and its table of commands, one module per command
group (:mod:`.merge`, :mod:`.models`, :mod:`.eval`, :mod:`.data`, :mod:`.patch`, :mod:`.valve`,
:mod:`.ul2r`, :mod:`.sweep`, :mod:`.search`), all under the one error handler
(:mod:`.handler`). Each command is a thin typed function; heavy imports (torch, lm-eval,
huggingface_hub, ray, optuna) happen inside it, so ``mmath --help`` is instant."""

from __future__ import annotations

import sys
from collections.abc import Callable
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


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmath {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = None,
) -> None:
    """Merge and edit LLM weights for math reasoning."""


def _new_root() -> typer.Typer:
    """The root group, without commands."""
    root = typer.Typer(
        name="mmath",
        cls=HandledGroup,
        help="Merge and edit LLM weights for math reasoning: streaming, memory-bounded, "
        "mergekit-compatible recipes.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    root.callback()(_root)
    return root


# The command table, in the order `mmath --help` lists it: how each command or group joins
# a root group.
_TABLE: dict[str, Callable[[typer.Typer], object]] = {
    "merge": lambda root: root.command()(_merge.merge),
    "inspect": lambda root: root.command()(_models.inspect),
    "methods": lambda root: root.command()(_models.methods),
    "eval": lambda root: root.command("eval")(_eval.eval_),
    "push": lambda root: root.command()(_eval.push),
    "patch": lambda root: root.add_typer(_patch.patch_app, name="patch"),
    "valve": lambda root: root.add_typer(_valve.valve_app, name="valve"),
    "ul2r": lambda root: root.add_typer(_ul2r.ul2r_app, name="ul2r"),
    "sweep": lambda root: root.add_typer(_sweep.sweep_app, name="sweep"),
    "search": lambda root: root.add_typer(_search.search_app, name="search"),
    "data": lambda root: root.add_typer(_data.data_app, name="data"),
}

app = _new_root()
for _join in _TABLE.values():
    _join(app)


def app_for(args: list[str]) -> typer.Typer:
    """The group that runs ``mmath ARGS``: where the first argument names a command or group,
    a root group with only that one (typer builds the click parameters of every command it
    holds from their signatures on each call: 33 ms for the 22 commands here, a tenth of
    ``mmath methods``); else :data:`app` (``--help``, ``--version``, a wrong name)."""
    if not args or args[0] not in _TABLE:
        return app
    one = _new_root()
    _TABLE[args[0]](one)
    return one


def main() -> None:
    """The console script: :func:`app_for`'s group runs the command under the one error handler
    (:class:`~mergekit_math.cli.handler.HandledGroup`), with one OpenBLAS thread
    (:func:`~mergekit_math.cli.startup.one_blas_thread`); after a merge, the exit skips the
    interpreter's final collections (:func:`~mergekit_math.cli.startup.freeze_for_exit`)."""
    from mergekit_math.cli.startup import freeze_for_exit, one_blas_thread

    one_blas_thread()  # before numpy loads
    try:
        app_for(sys.argv[1:])()
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


__all__ = ["app", "app_for", "main", "run"]
