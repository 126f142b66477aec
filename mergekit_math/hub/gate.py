"""The eval gate: requirements such as ``gsm8k:exact_match,flexible-extract>=0.55`` checked
against lm-evaluation-harness results before a model is published.

lm-eval's ``results`` dict holds, per task, keys ``"METRIC,FILTER"`` (``"METRIC,none"`` when
the task has no filter), their standard errors under ``"METRIC_stderr,FILTER"``, and an
``"alias"``.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mergekit_math.errors import UserError

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}
FORM = "TASK:METRIC[,FILTER]>=VALUE (or >, <=, <), e.g. gsm8k:exact_match,flexible-extract>=0.55"
# Bookkeeping lm-eval puts among a task's results that is not a metric (0.4.13 adds the number
# of samples evaluated).
NOT_METRICS = frozenset({"alias", "sample_len"})
_OP = re.compile(r">=|<=|==|!=|=>|=<|>|<|=")
_NAME = re.compile(r"^[^\s:,<>=]+$")


@dataclass(frozen=True)
class Requirement:
    task: str
    metric: str
    filter: str | None
    """lm-eval's filter name (``flexible-extract``, ``strict-match``); None for ``none``."""
    op: str
    value: float

    @property
    def key(self) -> str:
        """The key of this metric in lm-eval's per-task results."""
        return f"{self.metric},{self.filter or 'none'}"

    def __str__(self) -> str:
        metric = f"{self.metric},{self.filter}" if self.filter else self.metric
        return f"{self.task}:{metric}{self.op}{self.value:g}"


@dataclass(frozen=True)
class GateRow:
    requirement: Requirement
    actual: float | None
    stderr: float | None
    passed: bool
    reason: str
    """Why the row failed ('' when it passed)."""


def parse_requirement(text: str) -> Requirement:
    """``"TASK:METRIC,FILTER>=VALUE"`` or ``"TASK:METRIC>=VALUE"``; spaces around the
    comparison are allowed."""

    def bad(why: str) -> UserError:
        return UserError(f"requirement {text!r}: {why}; expected {FORM}")

    ops = _OP.findall(text)
    if not ops:
        raise bad("no comparison")
    if len(ops) > 1:
        raise bad(f"more than one comparison ({', '.join(ops)})")
    op = ops[0]
    if op not in OPS:
        raise bad(f"unsupported comparison {op!r}")
    left, _, right = text.partition(op)
    try:
        value = float(right.strip())
    except ValueError:
        raise bad(f"{right.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise bad(f"{right.strip()!r} is not a finite number")
    task, colon, metric_part = left.strip().partition(":")
    if not colon:
        raise bad("missing ':' between task and metric")
    metric, comma, filt = (s.strip() for s in metric_part.partition(","))
    task = task.strip()
    for name, what in ((task, "task"), (metric, "metric")):
        if not name:
            raise bad(f"empty {what}")
        if not _NAME.match(name):
            raise bad(f"bad {what} name {name!r}")
    if comma and not _NAME.match(filt):
        raise bad(f"bad filter name {filt!r}" if filt else "empty filter after ','")
    return Requirement(task, metric, None if filt in ("", "none") else filt, op, value)


def check(requirements: Iterable[Requirement], results: dict) -> list[GateRow]:
    """One row per requirement, in order. A task or metric missing from ``results`` fails,
    with the keys that are there in the reason."""
    rows = []
    for req in requirements:
        metrics = results.get(req.task)
        if not isinstance(metrics, dict):
            evaluated = ", ".join(sorted(results)) or "none"
            rows.append(
                GateRow(req, None, None, False, f"task not evaluated (evaluated: {evaluated})")
            )
            continue
        key = req.key
        if key not in metrics and req.filter is None and req.metric in metrics:
            key = req.metric  # lm-eval < 0.4 keys have no filter part
        actual = _number(metrics.get(key))
        if actual is None:
            what = "metric not in results" if key not in metrics else f"{key} is not a number"
            available = ", ".join(metric_keys(metrics)) or "none"
            rows.append(GateRow(req, None, None, False, f"{what}; available: {available}"))
            continue
        metric, _, filt = key.partition(",")
        stderr = _number(metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr"))
        passed = OPS[req.op](actual, req.value)
        reason = "" if passed else f"{actual:.4g} is not {req.op} {req.value:g}"
        rows.append(GateRow(req, actual, stderr, passed, reason))
    return rows


def metric_keys(metrics: dict) -> list[str]:
    """The metric keys of one task's results: no stderr keys, no NOT_METRICS, numbers only."""
    return [
        k
        for k, v in metrics.items()
        if not k.partition(",")[0].endswith("_stderr")
        and k not in NOT_METRICS
        and _number(v) is not None
    ]


def format_gate_table(rows: list[GateRow]) -> str:
    """A plain-text table of the gate, one line per requirement; failing rows end with
    ``FAIL`` and the reason."""
    header = ("task", "metric", "filter", "required", "actual", "result")
    lines = [header]
    for row in rows:
        req = row.requirement
        if row.actual is None:
            actual = "-"
        elif row.stderr is None:
            actual = f"{row.actual:.4f}"
        else:
            actual = f"{row.actual:.4f} ± {row.stderr:.4f}"
        result = "PASS" if row.passed else f"FAIL  {row.reason}"
        lines.append(
            (req.task, req.metric, req.filter or "-", f"{req.op} {req.value:g}", actual, result)
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths)) + "  " + line[-1]
        for line in lines
    )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
