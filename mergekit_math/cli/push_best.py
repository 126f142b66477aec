"""``--push-best``: the one definition of its flags, shared by `mmath sweep` and `mmath
search`, and the step that publishes a recorded point through the eval gate
(:func:`mergekit_math.hub.publish.publish`, the path `mmath push` takes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from mergekit_math.cli.handler import fail, on_interrupt, warn, warn_token
from mergekit_math.errors import UserError

PushBestOption = Annotated[
    str | None,
    typer.Option(
        metavar="REPO_ID",
        help="Afterwards, publish the best point to this Hub repo if it clears every "
        "--require bar.",
    ),
]
RequireOption = Annotated[
    list[str] | None,
    typer.Option(
        "--require",
        help="Bar for --push-best, repeatable: 'TASK:METRIC[,FILTER]>=VALUE'.",
    ),
]
PrivateOption = Annotated[bool, typer.Option(help="--push-best: create the repo private.")]
TokenOption = Annotated[
    str | None,
    typer.Option(
        help="Hub token for --push-best. Visible in the process list while the command "
        "runs: prefer HF_TOKEN in the environment (default: HF_TOKEN, then the saved login).",
        show_default=False,
    ),
]


@dataclass(frozen=True)
class PushBest:
    """The checked --push-best flags."""

    repo: str
    requirements: list
    private: bool = False
    token: str | None = None


def push_flags(
    repo: str | None, require: list[str] | None, private: bool, token: str | None
) -> PushBest | None:
    """The --push-best flags checked before anything runs (None without --push-best)."""
    if token is not None:
        warn_token()
    if require and not repo:
        raise UserError("--require is the bar of --push-best; give --push-best REPO too")
    if not repo:
        return None
    from mergekit_math.cli.eval import check_repo_id
    from mergekit_math.hub.publish import parse_requirements

    check_repo_id(repo, "--push-best")
    if not require:
        raise UserError("--push-best needs a bar: --require 'TASK:METRIC,FILTER>=VALUE'")
    return PushBest(repo, parse_requirements(require), private, token)


def push_point(
    folder: Path,
    best: dict[str, Any] | None,
    eval_options: dict[str, Any],
    push: PushBest,
    quiet: bool,
) -> None:
    """Publish the recorded point ``best`` of the sweep or search ``folder``: its kept weights
    or a fresh merge of its recipe (:func:`~mergekit_math.sweep.best_model.point_model`),
    evaluated with ``eval_options`` (cache first) and gated by ``push.requirements``. A failing
    bar prints the gate table and exits 1 with nothing pushed."""
    from mergekit_math.eval.run import EvalOptions
    from mergekit_math.hub.publish import GateFailed, PushSettings, publish
    from mergekit_math.sweep.best_model import point_model

    if best is None:
        raise UserError("--push-best: no point has a value of the primary metric")
    on_interrupt("nothing was pushed")
    try:
        model_dir = point_model(folder, best, progress=not quiet)
        typer.echo(f"--push-best: point {best['id'][:8]} from {model_dir}")
        result = publish(
            model_dir,
            PushSettings(push.repo, private=push.private),
            requirements=push.requirements,
            options=EvalOptions(**eval_options),
            token=push.token,
            echo=typer.echo,
            warn=warn,
        )
    except GateFailed as exc:
        typer.echo(exc.table)
        fail(f"{exc}; the best point was not pushed", code=1)
    typer.echo(f"pushed to {result.url}")
    typer.echo(f"commit {result.commit_id}: {result.commit_url}")
