"""The model card a published model carries.

It starts from the card ``mmath merge`` wrote (lineage, method, recipe) and changes what the Hub
reads: ``base_model`` keeps Hub ids only (a local path means nothing there and the Hub rejects
it), evaluation results go into ``model-index`` and into an "Evaluation" table in the body.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

from mergekit_math.errors import UserError
from mergekit_math.hub.gate import NOT_METRICS
from mergekit_math.io.resolve import HUB_ID

LM_EVAL_NAME = "lm-evaluation-harness"
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"


class EvalRow(TypedDict, total=False):
    """One evaluation result. ``task``, ``metric`` and ``value`` are required."""

    task: str  # lm-eval task name, e.g. "gsm8k"
    metric: str  # e.g. "exact_match"
    filter: str | None  # e.g. "flexible-extract"; None when lm-eval says "none"
    value: float
    stderr: float | None
    num_fewshot: int | None
    limit: float | None  # lm-eval --limit: a count of examples, or a fraction below 1


def rows_from_lm_eval(
    results: dict, n_shot: dict | None = None, limit: float | None = None
) -> list[EvalRow]:
    """lm-eval's ``results`` dict as :class:`EvalRow` s, each value paired with its stderr.

    ``n_shot`` is lm-eval's ``"n-shot"`` dict (task → shots); ``limit`` its ``--limit``.
    Stderr keys, :data:`NOT_METRICS` and values that are not finite numbers are left out.
    """
    rows: list[EvalRow] = []
    for task, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        for key, raw in metrics.items():
            metric, comma, filt = key.partition(",")
            value = _number(raw)
            if metric.endswith("_stderr") or key in NOT_METRICS or value is None:
                continue
            stderr_key = f"{metric}_stderr,{filt}" if comma else f"{metric}_stderr"
            shots = (n_shot or {}).get(task)
            rows.append(
                EvalRow(
                    task=task,
                    metric=metric,
                    filter=None if filt in ("", "none") else filt,
                    value=value,
                    stderr=_number(metrics.get(stderr_key)),
                    num_fewshot=shots if isinstance(shots, int) else None,
                    limit=limit,
                )
            )
    return rows


def is_hub_id(ref: str, resolved: Path | None = None) -> bool:
    """Whether a parent reference names a Hub repository rather than a local folder: it reads
    ``NAMESPACE/NAME`` and no such local path exists. When the folder it was resolved to is
    known (at merge time), that folder must also be the repository's snapshot in the Hub cache
    (``.../models--NAMESPACE--NAME/snapshots/REV``): a ``demo/base`` found next to the recipe
    is local."""
    if not HUB_ID.match(ref) or Path(ref).expanduser().exists():
        return False
    if resolved is None:
        return True
    return "models--" + ref.replace("/", "--") in Path(resolved).parts


def split_parents(
    refs: list[str], resolved: Mapping[str, Path] | None = None
) -> tuple[list[str], list[str]]:
    """``(hub ids, local paths)``, each in the given order; ``resolved`` maps a reference to
    the folder it was resolved to, where known (see :func:`is_hub_id`).

    The one rule for a card's ``base_model``: the card ``mmath merge`` writes and the card
    ``mmath push`` uploads list the Hub ids only (local parents stay in the text)."""
    resolved = resolved or {}
    hub = [r for r in refs if is_hub_id(r, resolved.get(r))]
    return hub, [r for r in refs if r not in hub]


def local_parents(model_dir: Path) -> list[str]:
    """The ``base_model`` entries of ``model_dir``'s card that :func:`publish_card` drops
    because they are local paths (for the caller to warn about)."""
    return split_parents(_base_models(_read_card(model_dir, "model")))[1]


def publish_card(model_dir: Path, eval_results: list[EvalRow] | None, repo_id: str) -> str:
    """The card to upload as ``README.md`` of ``repo_id``.

    Read from ``model_dir/README.md`` (a minimal card when there is none; the file is not
    changed). ``base_model`` keeps only Hub ids (see :func:`local_parents`); the body, with its
    Parents and Recipe sections, is kept. With ``eval_results``, ``model-index`` is replaced by
    them and an "Evaluation" section with a table is added or replaced.
    """
    from huggingface_hub import EvalResult

    name = repo_id.split("/")[-1]
    card = _read_card(model_dir, name)
    hub, _ = split_parents(_base_models(card))
    card.data.base_model = hub or None
    if eval_results:
        rows = [_checked(row, f"eval_results[{i}]") for i, row in enumerate(eval_results)]
        card.data.model_name = name
        card.data.eval_results = [
            EvalResult(
                task_type="text-generation",
                dataset_type=row["task"],
                dataset_name=row["task"],
                metric_type=row["metric"],
                metric_name=_metric_name(row),
                metric_value=row["value"],
                dataset_args=(
                    {"num_few_shot": row["num_fewshot"]}
                    if row.get("num_fewshot") is not None
                    else None
                ),
                source_name=LM_EVAL_NAME,
                source_url=LM_EVAL_URL,
            )
            for row in rows
        ]
        card.text = _with_section(card.text, "Evaluation", eval_section(rows), before="Recipe")
    return str(card)


def eval_section(rows: list[EvalRow]) -> str:
    """The "## Evaluation" section: a markdown table, n-shot and limit columns when known."""
    shots = any(r.get("num_fewshot") is not None for r in rows)
    limit = any(r.get("limit") is not None for r in rows)
    header = ["Task", "Metric", "Filter", "Value"] + ["n-shot"] * shots + ["Limit"] * limit
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        value = f"{r['value']:.4f}"
        if r.get("stderr") is not None:
            value += f" ± {r['stderr']:.4f}"
        cells = [r["task"], r["metric"], r.get("filter") or "-", value]
        if shots:
            cells.append(_plain(r.get("num_fewshot")))
        if limit:
            cells.append(_plain(r.get("limit")))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return (
        "## Evaluation\n\n"
        f"Scores from [{LM_EVAL_NAME}]({LM_EVAL_URL}); ± is the standard error.\n\n"
        + "\n".join(lines)
        + "\n"
    )


# ------------------------------------------------------------------------------ helpers


def _read_card(model_dir: Path, name: str):
    from huggingface_hub import ModelCard

    readme = Path(model_dir) / "README.md"
    if not readme.is_file():
        return ModelCard(
            "---\nlibrary_name: transformers\ntags:\n- merge\n- mergekit-math\n---\n\n"
            f"# {name}\n\nPublished with [mergekit-math](https://pypi.org/project/mergekit-math/).\n"
        )
    try:
        return ModelCard(readme.read_text(encoding="utf-8"))
    except ValueError as exc:  # malformed YAML metadata
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{readme}: cannot read its metadata: {first}") from None


def _base_models(card) -> list[str]:
    refs = card.data.base_model
    if refs is None:
        return []
    return [str(r) for r in ([refs] if isinstance(refs, str) else refs)]


def _checked(row: EvalRow, where: str) -> EvalRow:
    for key in ("task", "metric"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise UserError(f"{where}.{key}: expected a name, got {row.get(key)!r}")
    if _number(row.get("value")) is None:
        raise UserError(f"{where}.value: expected a finite number, got {row.get('value')!r}")
    return row


def _metric_name(row: EvalRow) -> str:
    return f"{row['metric']} ({row['filter']})" if row.get("filter") else row["metric"]


def _plain(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


_HEADING = re.compile(r"^##\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _sections(text: str) -> list[tuple[str | None, str]]:
    """``text`` cut before each level-2 heading outside code fences: ``(title, chunk)``."""
    chunks: list[tuple[str | None, list[str]]] = [(None, [])]
    fence = False
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            fence = not fence
        heading = None if fence else _HEADING.match(line.rstrip("\n"))
        if heading:
            chunks.append((heading.group(1), []))
        chunks[-1][1].append(line)
    return [(title, "".join(lines)) for title, lines in chunks if lines or title]


def _with_section(text: str, title: str, section: str, before: str) -> str:
    """``text`` with its ``## title`` section replaced by ``section``; when it has none, the
    section goes before ``## before`` (else at the end)."""
    chunks = _sections(text)
    same = [i for i, (t, _) in enumerate(chunks) if t and t.lower() == title.lower()]
    if same:
        at = same[0]
        chunks = [c for i, c in enumerate(chunks) if i not in same]
    else:
        later = [i for i, (t, _) in enumerate(chunks) if t and t.lower() == before.lower()]
        at = later[0] if later else len(chunks)
    chunks.insert(at, (title, section))
    parts = [chunk.strip("\n") for _, chunk in chunks]
    lead = "\n" if text.startswith("\n") else ""
    return lead + "\n\n".join(p for p in parts if p) + "\n"
