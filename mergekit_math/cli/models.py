"""``mmath inspect`` and ``mmath methods``: what a checkpoint holds (from its headers) and which
merge methods there are (from the registry). Neither imports torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_math.io.writer import human_bytes


def inspect(
    path: Annotated[Path, typer.Argument(metavar="MODEL_DIR", help="A model folder.")],
    tensors: Annotated[
        bool, typer.Option("--tensors", help="List every tensor (in layer order).")
    ] = False,
) -> None:
    """Describe a checkpoint from its headers only: architecture, dtypes, parameters, shards.

    Example: mmath inspect out/ties-merge --tensors
    """
    from collections import Counter

    from mergekit_math.io.reader import Checkpoint, tensor_order

    ckpt = Checkpoint(path, allow_pickle=False)
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
        typer.echo(f"  - {f.name} ({human_bytes(f.stat().st_size)})")
    typer.echo(f"tensor bytes:    {human_bytes(ckpt.total_bytes)}")
    if tensors:
        width = max((len(n) for n in ckpt.tensors), default=4)
        typer.echo("")
        typer.echo(f"{'name':<{width}}  {'dtype':<9} shape")
        for name in sorted(ckpt.tensors, key=tensor_order):
            t = ckpt.tensors[name]
            typer.echo(f"{name:<{width}}  {t.dtype:<9} {list(t.shape)}")


def methods() -> None:
    """List the merge methods: paper, inputs, and every parameter with its default (* marks a
    required one). Reads the method registry only; torch is not imported."""
    from mergekit_math.methods.listing import listing

    for line in listing():
        typer.echo(line)
