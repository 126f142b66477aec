"""`mmath eval --samples K`: K generations per problem through lm-eval's ``repeats``, each
scored the way lm-eval scores the first, then avg@K / pass@k / maj@K (``sampling.py``) and
accuracy and generated tokens by level and subject.

lm-eval runs a task with ``repeats: K`` by sending each request K times; its filters then keep
the first response (``take_first``), so its own metric is the score of sample 1. Here every
sample ``j`` goes through the same filter pipeline alone and the task's own
``process_results``: sample 1 scores exactly what lm-eval logged, and any task (shipped,
YAML or built-in) gets the same treatment. Answers for maj@K: the final answer that
``math_verify`` tasks score (``boxed.extract_answer``), grouped by math-verify equivalence;
for other tasks the filtered answer, grouped by exact string match (lm-eval's regex fallback
``[invalid]`` and empty answers do not vote).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mergekit_math.errors import UserError
from mergekit_math.eval.sampling import aggregate, majority, problem_metrics

# Fields of a document that split the accuracy and length statistics (MATH's level, subject).
BREAKDOWN_FIELDS = ("level", "subject")
NO_ANSWER = ("", "[invalid]")


def sampling_gen_kwargs(samples: int, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The generation settings for K samples: a temperature above 0 samples (``do_sample``
    unless given; the shipped tasks say ``do_sample: false``, and HF then ignores the
    temperature). K > 1 needs one: K greedy generations would be K copies of one."""
    if samples < 1:
        raise UserError(f"--samples: expected a count of 1 or more, got {samples}")
    temperature = gen_kwargs.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise UserError(f"--gen-kwargs: temperature must be a number, got {temperature!r}")
    if samples > 1 and (temperature <= 0 or gen_kwargs.get("do_sample") is False):
        raise UserError(
            f"--samples {samples}: sampling needs --gen-kwargs temperature=T with T > 0 "
            "(e.g. temperature=0.7,top_p=0.95); greedy samples would all be the same"
        )
    if temperature > 0 and "do_sample" not in gen_kwargs:
        return {**gen_kwargs, "do_sample": True}
    return gen_kwargs


def record_tasks(manager: Any, repeats: int) -> dict[str, Any]:
    """Make ``manager.load`` set ``repeats`` on every generative task it loads and remember
    the task objects by name (the last load wins: simple_evaluate's, the one whose filters
    and scoring produced the samples). Returns that name -> task dict, filled as loads run."""
    tasks: dict[str, Any] = {}
    load = manager.load

    def load_with_repeats(*args: Any, **kwargs: Any) -> dict:
        loaded = load(*args, **kwargs)
        for name, task in loaded["tasks"].items():
            if repeats != 1 and task.get_config("output_type") == "generate_until":
                task.set_config(key="repeats", value=repeats)
            tasks[name] = task
        return loaded

    manager.load = load_with_repeats
    return tasks


@dataclass
class Problem:
    """One problem under one filter: each sample's scores by metric, answers and tokens."""

    doc: dict
    scores: dict[str, list[float]] = field(default_factory=dict)
    answers: list[Any] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def _responses(row: dict) -> list[str]:
    resps = row.get("resps") or [[]]
    first = resps[0]
    return list(first) if isinstance(first, list) else [first]


def _filter_one(ensemble: Any, response: str, doc: dict) -> Any:
    """One response through a filter pipeline alone, as lm-eval runs it over all of them."""
    resps: Any = [[response]]
    for make in ensemble.filters:
        resps = make().apply(resps, [doc])
    return list(resps)[0]


def _vote_key(task_metrics: list[str]) -> tuple[Callable[[Any], Any], Callable[[Any, Any], bool]]:
    """(answer of a filtered response, equality of two answers) for maj@K."""
    if "math_verify" in task_metrics:
        from mergekit_math.eval.boxed import extract_answer
        from mergekit_math.eval.math_score import equivalent

        def answer(resp: Any) -> str | None:
            return extract_answer(str(resp)) or None

        return answer, equivalent

    def plain(resp: Any) -> Any:
        text = resp.strip() if isinstance(resp, str) else resp
        return None if text in NO_ANSWER else text

    return plain, lambda a, b: a == b


def score_problem(row: dict, task: Any, ensembles: dict[str, Any]) -> Problem:
    """Every sample of a logged row scored by the task's filters and ``process_results``."""
    doc = row["doc"]
    problem = Problem(doc)
    tokens = row.get("gen_tokens", [])
    problem.tokens = list(tokens) if isinstance(tokens, list) else [tokens]
    ensemble = ensembles[row["filter"]]
    answer_of, _ = _vote_key(list(row.get("metrics", [])))
    for response in _responses(row):
        filtered = _filter_one(ensemble, response, doc)
        for metric, value in task.process_results(doc, [filtered]).items():
            problem.scores.setdefault(metric, []).append(float(value))
        problem.answers.append(answer_of(filtered))
    return problem


def _logged_problem(row: dict) -> Problem:
    """A one-sample row's scores as lm-eval logged them (no scoring again)."""
    tokens = row.get("gen_tokens", [])
    problem = Problem(row["doc"], tokens=list(tokens) if isinstance(tokens, list) else [tokens])
    for metric in row.get("metrics", []):
        if isinstance(row.get(metric), (int, float)):
            problem.scores[metric] = [float(row[metric])]
    return problem


def task_problems(rows: list[dict], task: Any | None, samples: int) -> dict[str, list[Problem]]:
    """The problems of one task's logged rows by filter name. One sample: lm-eval's logged
    scores; K samples: each scored again (needs the lm-eval task)."""
    by_filter: dict[str, list[Problem]] = {}
    ensembles = {e.name: e for e in getattr(task, "_filters", [])}
    for row in sorted(rows, key=lambda r: r.get("doc_id", 0)):
        if samples == 1:
            problem = _logged_problem(row)
        else:
            problem = score_problem(row, task, ensembles)
            # Logged with the sample: each generation's scores and the answer it voted for.
            row["sample_scores"] = problem.scores
            row["sample_answers"] = problem.answers
        by_filter.setdefault(row.get("filter", "none"), []).append(problem)
    return by_filter


def sampling_results(by_filter: dict[str, list[Problem]]) -> dict[str, float | None]:
    """lm-eval-style result keys ``METRIC_avg@K,FILTER``, ``METRIC_pass@k,FILTER``,
    ``METRIC_maj@K,FILTER`` and their ``_stderr`` companions."""
    out: dict[str, float | None] = {}
    for filt, problems in by_filter.items():
        if not problems:
            continue
        metrics = list(problems[0].scores)
        _, same = _vote_key(metrics)
        winners = [majority(p.answers, same) for p in problems]
        for metric in metrics:
            per_problem = [problem_metrics(p.scores[metric], w) for p, w in zip(problems, winners)]
            for name, value in aggregate(per_problem).items():
                stat, stderr, _ = name.partition("_stderr")
                out[f"{metric}_{stat}{stderr},{filt}"] = value
    return out


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def breakdown(by_filter: dict[str, list[Problem]]) -> dict[str, dict[str, dict]]:
    """Per value of each BREAKDOWN_FIELDS field the docs have: the number of problems, the
    mean generated tokens per sample, and the mean score over samples and problems for each
    ``METRIC,FILTER``. Empty when no doc has such a field."""
    out: dict[str, dict[str, dict]] = {}
    first = next(iter(by_filter.values()), [])
    for fld in BREAKDOWN_FIELDS:
        if not any(fld in p.doc and p.doc[fld] not in (None, "") for p in first):
            continue
        groups: dict[str, dict] = {}
        for filt, problems in by_filter.items():
            split: dict[str, list[Problem]] = {}
            for p in problems:
                split.setdefault(str(p.doc.get(fld, "?")), []).append(p)
            for value, members in split.items():
                group = groups.setdefault(value, {"n": len(members)})
                tokens = [t for p in members for t in p.tokens]
                if tokens:
                    group["tokens_mean"] = statistics.fmean(tokens)
                for metric in members[0].scores:
                    accuracy = [statistics.fmean(p.scores[metric]) for p in members]
                    group[f"{metric},{filt}"] = statistics.fmean(accuracy)
        out[fld] = {k: groups[k] for k in sorted(groups, key=_natural)}
    return out


def summarize(rows: list[dict], task: Any | None, samples: int) -> tuple[dict, dict]:
    """(result keys to add to lm-eval's results of the task, breakdown by level/subject) of
    one generative task's logged rows; no result keys for one sample (lm-eval's metric is
    the whole story then)."""
    if samples > 1 and task is None:
        raise RuntimeError("the lm-eval task that produced the samples was not recorded")
    by_filter = task_problems(rows, task, samples)
    more = sampling_results(by_filter) if samples > 1 else {}
    return more, breakdown(by_filter)


def format_breakdown(tables: dict[str, dict[str, dict]]) -> str:
    """The breakdown of each task as a table under the main one ("" when there is none):
    one row per level or subject, with problems, mean score per METRIC,FILTER and mean
    generated tokens per sample."""
    out: list[str] = []
    for task, fields in tables.items():
        for fld, groups in fields.items():
            metrics = list(dict.fromkeys(k for g in groups.values() for k in g if "," in k))
            header = [f"{task} by {fld}", "n", *metrics, "tokens mean"]
            lines = [
                [
                    value,
                    str(g["n"]),
                    *(f"{g[m]:.4f}" if m in g else "" for m in metrics),
                    f"{g['tokens_mean']:.1f}" if "tokens_mean" in g else "",
                ]
                for value, g in groups.items()
            ]
            widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]
            out.append("")
            out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
            out.append("  ".join("-" * w for w in widths))
            out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
    return "\n" + "\n".join(out) if out else ""
