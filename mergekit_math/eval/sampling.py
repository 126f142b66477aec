"""Metrics over K sampled generations per problem: avg@k, pass@k and maj@k, each with its
standard error over the problems.

Pure functions of per-sample scores and answers; nothing here knows lm-eval. The glue that
scores each sample of an lm-eval run is ``mergekit_math.eval.sample_scores``.

- avg@k: the mean score of the k samples of a problem, averaged over problems (an estimate
  of pass@1 at this temperature with k times the samples of a single greedy run).
- pass@k: the probability that at least one of k samples drawn without replacement from the
  n generated is correct, by the unbiased estimator of Chen et al. 2021 ("Evaluating Large
  Language Models Trained on Code", eq. 1): ``1 - C(n-c, k) / C(n, k)``.
- maj@k: the score of the answer most samples agree on (self-consistency, Wang et al. 2022).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct.

    ``1 - C(n-c, k) / C(n, k)`` written as ``1 - prod_{i=n-c+1..n} (1 - k/i)``, a product of
    ``c`` factors in [0, 1]: no huge binomials, no cancellation (Chen et al. 2021, fig. 3).
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0  # every draw of k samples holds a correct one
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... below n, and n."""
    ks = []
    k = 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def majority(answers: Sequence[T | None], same: Callable[[T, T], bool]) -> int | None:
    """Index of the sample whose answer most samples share; None when no sample gave one.

    ``None`` answers (nothing extracted) do not vote. Answers are grouped with ``same``
    against each group's first member (for math-verify, equivalence is checked against that
    representative). A tie between groups goes to the group whose first member came first,
    so the result does not depend on anything but the order the samples were drawn in.
    """
    groups: list[list[int]] = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for group in groups:
            if same(answers[group[0]], answer):  # type: ignore[arg-type]
                group.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return None
    best = max(len(g) for g in groups)
    return next(g[0] for g in groups if len(g) == best)


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n), as lm-eval's
    ``mean_stderr``); the stderr is None for fewer than two values."""
    if not values:
        raise ValueError("mean of no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def is_binary(scores: Sequence[float]) -> bool:
    return all(s in (0.0, 1.0) for s in scores)


def problem_metrics(scores: Sequence[float], winner: int | None) -> dict[str, float]:
    """One problem's ``avg@K``, ``pass@k`` (k from :func:`pass_ks`, 0/1 scores only) and
    ``maj@K`` (the winner's score; 0 when no sample gave an answer)."""
    n = len(scores)
    if n == 0:
        raise ValueError("a problem with no samples")
    out = {f"avg@{n}": statistics.fmean(scores)}
    if is_binary(scores):
        c = sum(1 for s in scores if s == 1.0)
        out.update({f"pass@{k}": pass_at_k(n, c, k) for k in pass_ks(n)})
    out[f"maj@{n}"] = 0.0 if winner is None else float(scores[winner])
    return out


def aggregate(per_problem: Sequence[dict[str, float]]) -> dict[str, float | None]:
    """Mean and ``NAME_stderr`` of each metric over the problems (a metric that some problem
    lacks, such as pass@k with a non-binary score, is left out)."""
    if not per_problem:
        return {}
    names = [k for k in per_problem[0] if all(k in p for p in per_problem)]
    out: dict[str, float | None] = {}
    for name in names:
        mean, stderr = mean_stderr([p[name] for p in per_problem])
        out[name] = mean
        out[f"{name}_stderr"] = stderr
    return out
