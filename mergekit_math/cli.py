"""The ``mmath`` command line: one thin function per command; heavy imports inside them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mergekit_math import __version__
from mergekit_math.errors import UserError

if TYPE_CHECKING:
    from mergekit_math.engine import Plan

app = typer.Typer(
    name="mmath",
    help="Merge and edit LLM weights for math reasoning: streaming, memory-bounded, "
    "mergekit-compatible recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


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


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (mergekit format plus extensions).")],
    out_dir: Annotated[Path, typer.Argument(help="Output folder; must not exist unless --force.")],
    device: Annotated[str, typer.Option(help="Where to compute: cpu or cuda.")] = "cpu",
    threads: Annotated[
        int | None, typer.Option(help="torch intra-op threads (default: torch's choice).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for DARE/DELLA; overrides the recipe's seed.")
    ] = None,
    out_shard_size: Annotated[
        str, typer.Option(help="Maximum shard size: bytes or 500M, 2G, 5G.")
    ] = "5G",
    allow_pickle: Annotated[
        bool,
        typer.Option(help="Accept pytorch_model*.bin inputs (loaded with weights_only=True)."),
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing OUT_DIR.")] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Validate and print the plan; read no tensor, write nothing.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Merge the models of RECIPE into OUT_DIR.

    Every problem in the recipe (unknown method or parameter, bad value, missing path,
    incompatible checkpoints) is reported before any tensor is read. The output appears at
    OUT_DIR only once complete: a failed or interrupted merge leaves nothing that looks like a
    model.

    Example: mmath merge recipes/ties.yaml out/ties-merge
    """
    from mergekit_math.engine import build_plan, execute
    from mergekit_math.io.writer import parse_size
    from mergekit_math.recipe import load_recipe

    try:
        shard_size = parse_size(out_shard_size)
    except ValueError as exc:
        _fail(f"--out-shard-size: {exc}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        _fail(f"--device: expected cpu or cuda, got {device!r}")
    if threads is not None and threads < 1:
        _fail("--threads must be at least 1")
    try:
        parsed = load_recipe(recipe)
        plan = build_plan(
            parsed, recipe_dir=recipe.resolve().parent, seed=seed, allow_pickle=allow_pickle
        )
        if out_dir.exists() and not force and not dry_run:
            raise UserError(f"{out_dir} already exists; pass --force to replace it")
        for w in plan.warnings:
            typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
        if dry_run:
            _print_plan(plan, shard_size)
            return
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        final = execute(
            plan,
            out_dir,
            device=device,
            max_shard_size=shard_size,
            force=force,
            progress=not quiet,
        )
    except UserError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written to the output folder", code=130)
    typer.echo(
        f"merged {len(plan.items)} tensors ({_human(plan.write_bytes)}) with "
        f"{plan.method.name} into {final}"
    )


def _print_plan(plan: Plan, shard_size: int) -> None:
    from mergekit_math.io.writer import plan_shards

    shards = plan_shards([i.out for i in plan.items], shard_size)
    typer.echo(f"method:        {plan.method.name} ({plan.method.pretty_name})")
    typer.echo(f"inputs:        {len(plan.checkpoints)} checkpoints")
    for c in plan.checkpoints.values():
        typer.echo(f"  - {c.ref} -> {c.path}" if str(c.path) != c.ref else f"  - {c.ref}")
    typer.echo(f"output layers: {plan.num_layers}")
    typer.echo(f"tensors:       {len(plan.items)}")
    typer.echo(f"read:          {_human(plan.read_bytes)}")
    typer.echo(f"write:         {_human(plan.write_bytes)} in {len(shards)} shard(s)")
    typer.echo(f"est. peak mem: {_human(plan.estimated_peak_bytes())} (working tensors)")
    typer.echo(f"seed:          {plan.seed}")
    typer.echo("dry run: nothing was read or written")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A model folder.")],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
) -> None:
    """Describe a checkpoint from its headers only: architecture, dtypes, parameters, shards.

    Example: mmath inspect out/ties-merge --tensors
    """
    from collections import Counter

    from mergekit_math.io.reader import Checkpoint

    try:
        ckpt = Checkpoint(path, allow_pickle=False)
    except UserError as exc:
        _fail(str(exc))
    dtypes = Counter(t.dtype for t in ckpt.tensors.values())
    typer.echo(f"path:            {ckpt.path.resolve()}")
    typer.echo(f"architecture:    {ckpt.architecture} ({ckpt.model_type})")
    typer.echo(f"layers:          {ckpt.num_layers}")
    typer.echo(f"vocab size:      {ckpt.vocab_size}")
    typer.echo(f"parameters:      {ckpt.num_parameters:,}")
    typer.echo(f"tensors:         {len(ckpt.tensors)}")
    typer.echo("dtypes:          " + ", ".join(f"{d} ×{n}" for d, n in dtypes.most_common()))
    typer.echo(f"tied embeddings: {'yes' if ckpt.tied_embeddings else 'no'}")
    typer.echo(f"shards:          {len(ckpt.files)}")
    for f in ckpt.files:
        typer.echo(f"  - {f.name} ({_human(f.stat().st_size)})")
    typer.echo(f"tensor bytes:    {_human(ckpt.total_bytes)}")
    if tensors:
        width = max((len(n) for n in ckpt.tensors), default=4)
        typer.echo("")
        typer.echo(f"{'name':<{width}}  {'dtype':<9} shape")
        for name in sorted(ckpt.tensors):
            t = ckpt.tensors[name]
            typer.echo(f"{name:<{width}}  {t.dtype:<9} {list(t.shape)}")


@app.command()
def methods() -> None:
    """List the merge methods with their parameters and papers."""
    from mergekit_math.methods import all_methods, param_keys

    for m in all_methods():
        shared = ", ".join(param_keys(m.shared_params))
        per_model = ", ".join(param_keys(m.model_params))
        typer.echo(f"{m.name:<17} {m.pretty_name} — {m.paper_url}")
        typer.echo(f"{'':<17} {m.description}")
        typer.echo(f"{'':<17} per model: {per_model or '-'}; recipe-level: {shared or '-'}")


def main() -> None:
    try:
        app()
    except UserError as exc:  # pragma: no cover - commands catch their own
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
