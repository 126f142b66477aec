"""Evaluate, check the bar, then publish: the one path from a model folder to the Hub.

Nothing reaches the Hub before the gate has passed: the evaluation runs (or comes from the
cache) locally, and a failing requirement raises :class:`GateFailed` before any request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_math.errors import UserError
from mergekit_math.hub.gate import GateRow, Requirement, check, format_gate_table, parse_requirement

if TYPE_CHECKING:
    from mergekit_math.eval.run import EvalOptions, EvalReport
    from mergekit_math.hub.push import PushResult


class GateFailed(Exception):
    """The model did not clear a ``--require`` bar; ``table`` shows which."""

    def __init__(self, rows: list[GateRow]):
        self.rows = rows
        self.table = format_gate_table(rows)
        failed = [str(r.requirement) for r in rows if not r.passed]
        super().__init__(f"eval gate failed: {', '.join(failed)}")


@dataclass
class PushSettings:
    repo_id: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    create_pr: bool = False


def parse_requirements(texts: list[str]) -> list[Requirement]:
    return [parse_requirement(t) for t in texts]


def gate_options(requirements: list[Requirement], options: EvalOptions) -> EvalOptions:
    """``options`` with its task list covering every required task."""
    tasks = list(options.tasks)
    for req in requirements:
        if req.task not in tasks:
            tasks.append(req.task)
    return options.model_copy(update={"tasks": tasks})


def run_gate(
    model_dir: Path,
    requirements: list[Requirement],
    options: EvalOptions,
    echo: Callable,
    report: EvalReport | None = None,
) -> EvalReport:
    """Check ``requirements`` against ``report`` (an evaluation already made of this model
    with ``options``), evaluating first (cache first) when there is none or it lacks a
    required task; raises GateFailed."""
    from mergekit_math.eval.run import evaluate

    if not requirements:
        raise UserError(
            "publishing needs a bar: --require 'TASK:METRIC,FILTER>=VALUE' (e.g. "
            "'gsm8k_cot_local:exact_match,flexible-extract>=0.4'); skip the gate with "
            "--no-eval --force"
        )
    if report is None or any(req.task not in report.results for req in requirements):
        report = evaluate(model_dir, gate_options(requirements, options))
    rows = check(requirements, report.results)
    if not all(r.passed for r in rows):
        raise GateFailed(rows)
    echo(format_gate_table(rows))
    return report


def publish(
    model_dir: Path,
    settings: PushSettings,
    *,
    requirements: list[Requirement],
    options: EvalOptions | None,
    token: str | None,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
    report: EvalReport | None = None,
) -> PushResult:
    """Gate (unless ``options`` is None: --no-eval --force), then push with an updated card.

    ``report`` is an evaluation already made of this model with ``options`` (``mmath merge
    --eval``); the gate checks it, evaluating again only when it lacks a required task.
    """
    from mergekit_math.hub.card import local_parents, publish_card, rows_from_lm_eval
    from mergekit_math.hub.push import files_to_upload, push_model

    model_dir = Path(model_dir)
    files_to_upload(model_dir)  # a folder that cannot be pushed fails before the evaluation
    if options is not None:
        report = run_gate(model_dir, requirements, options, echo, report)
    rows = None
    if report is not None:
        limit = options.limit if options is not None else None
        rows = rows_from_lm_eval(report.results, n_shot=report.data["n-shot"], limit=limit)
    dropped = local_parents(model_dir)
    if dropped:
        warn(
            "the card's base_model lists Hub ids only; these local parents are named in its "
            f"text instead: {', '.join(dropped)}"
        )
    card = publish_card(model_dir, rows, settings.repo_id)
    return push_model(
        model_dir,
        settings.repo_id,
        token=token,
        private=settings.private,
        revision=settings.revision,
        commit_message=settings.commit_message,
        create_pr=settings.create_pr,
        card_text=card,
    )
