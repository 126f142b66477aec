"""`mmath search --baselines`: the recipe's input models evaluated as they are, with the
search's evaluation settings, as reference points for its Pareto report.

Each input model (``base_model``, every ``models[].model`` and ``slices[].sources[].model``)
that is a model folder is evaluated once; its row goes to ``SEARCH_DIR/baselines.jsonl``. A
rerun reuses the rows of models whose fingerprint is unchanged (the search folder's manifest
already pins the evaluation settings), so nothing is evaluated twice. The rows have the shape
of a point's row (``metrics``, ``lengths``), so the objectives read them the same way; they
are never part of the front or the pick.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

BASELINES = "baselines.jsonl"


def input_models(recipe: dict[str, Any]) -> list[str]:
    """The model references of a resolved recipe, base first, each once, in recipe order."""
    refs: list[Any] = [recipe.get("base_model")]
    refs += [m.get("model") for m in recipe.get("models") or [] if isinstance(m, dict)]
    for piece in recipe.get("slices") or []:
        for src in (piece or {}).get("sources") or []:
            if isinstance(src, dict):
                refs.append(src.get("model"))
    out: list[str] = []
    for ref in refs:
        if isinstance(ref, str) and ref not in out:
            out.append(ref)
    return out


def read_baselines(folder: Path) -> list[dict[str, Any]]:
    """The rows of ``baselines.jsonl`` (none when there is no file), last row per model."""
    rows: dict[str, dict[str, Any]] = {}
    try:
        text = (folder / BASELINES).read_text()
    except OSError:
        return []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by an interrupt
        if isinstance(row, dict) and isinstance(row.get("model"), str):
            rows[row["model"]] = row
    return list(rows.values())


def run_baselines(
    folder: Path, recipe: dict[str, Any], eval_options: dict[str, Any], echo: Callable[[str], None]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Evaluate each input model of ``recipe`` not recorded yet in ``folder``; returns all
    the baseline rows and warnings (references that are not model folders)."""
    from mergekit_math.eval.run import EvalOptions, evaluate
    from mergekit_math.io.fingerprint import model_fingerprint

    options = EvalOptions(**eval_options)
    done = {r["model"]: r for r in read_baselines(folder)}
    rows, warnings = [], []
    for ref in input_models(recipe):
        path = Path(ref)
        if not (path / "config.json").is_file():
            warnings.append(f"--baselines: {ref} is not a model folder; not evaluated")
            continue
        old = done.get(ref)
        if old is not None and old.get("fingerprint") == model_fingerprint(path):
            echo(f"baseline {path.name}: recorded")
            rows.append(old)
            continue
        echo(f"baseline {path.name}: evaluating")
        row = baseline_row(ref, evaluate(path, options))
        _append(folder / BASELINES, row)
        rows.append(row)
    return rows, warnings


def baseline_row(ref: str, report: Any) -> dict[str, Any]:
    """A point-shaped row for a plain model: metrics ``TASK:METRIC,FILTER`` and lengths."""
    from mergekit_math.hub.gate import metric_keys

    metrics: dict[str, float] = {}
    for task_name, values in report.results.items():
        for key in metric_keys(values):
            if "," in key:
                metrics[f"{task_name}:{key}"] = values[key]
    return {
        "id": f"input:{Path(ref).name}",
        "model": ref,
        "point": {},
        "metrics": metrics,
        "lengths": report.lengths,
        "fingerprint": report.fingerprint,
        "eval_seconds": round(report.seconds, 3),
    }


def _append(path: Path, row: dict[str, Any]) -> None:
    from mergekit_math.eval.cache import to_json

    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(row, default=to_json) + "\n")
