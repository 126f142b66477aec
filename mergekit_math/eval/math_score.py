"""Scoring of the shipped boxed-answer tasks ``math_local`` and ``aime_local`` with Hugging
Face's math-verify: the model's final answer (``boxed.extract_answer``) and the reference are
parsed to sympy and compared for mathematical equivalence (``\\frac{1}{2}`` = ``0.5`` =
``\\dfrac12``; ``2\\sqrt{2}`` = ``\\sqrt{8}``), not as strings.

lm-eval calls ``process_docs`` and ``process_results`` through the task YAML (``!function
mmath_math.process_results``; ``tasks/mmath_math.py`` re-exports them). math-verify is imported
on first use only, so nothing on the merge path loads it.
"""

from __future__ import annotations

import threading
from typing import Any

from mergekit_math.eval.boxed import extract_answer, last_boxed

METRIC = "math_verify"
# Per-expression parse and compare limits (math-verify's own, via signal.alarm: main thread only).
TIMEOUT_S = 5


def _lower_keys(doc: dict) -> dict:
    """``Problem`` / ``Answer`` (some AIME dumps) read as ``problem`` / ``answer``."""
    return {str(k).lower(): v for k, v in doc.items()}


def process_docs(dataset: Any) -> Any:
    """lm-eval hook: lower-case the keys so ``{{problem}}`` finds ``Problem`` too."""
    return dataset.map(_lower_keys)


def reference_answer(doc: dict) -> str:
    """A row's reference: ``answer`` when present and not empty, else the last ``\\boxed{}`` of
    ``solution``; "" when neither gives one."""
    doc = _lower_keys(doc)
    answer = doc.get("answer")
    if answer is not None and str(answer).strip():
        return str(answer).strip()
    boxed = last_boxed(str(doc.get("solution") or ""))
    return boxed or ""


def _parse(answer: str, timeout: int | None) -> list:
    from math_verify import parse

    return parse(f"$\\boxed{{{answer}}}$", parsing_timeout=timeout)


def equivalent(predicted: str, reference: str) -> bool:
    """Whether two final answers (LaTeX or plain, without ``\\boxed``) are the same
    mathematical object by math-verify; an empty or unparsable answer is never equivalent."""
    from math_verify import verify

    if not predicted.strip() or not reference.strip():
        return False
    # math-verify's timeouts use signal.alarm, which only the main thread may set.
    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold = _parse(reference, timeout)
    pred = _parse(predicted, timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))


def score(doc: dict, generation: str) -> float:
    """1.0 when ``generation``'s final answer is equivalent to the row's reference, else 0.0."""
    return float(equivalent(extract_answer(generation), reference_answer(doc)))


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook: the ``math_verify`` metric of one problem (first generation)."""
    return {METRIC: score(doc, results[0] if results else "")}
