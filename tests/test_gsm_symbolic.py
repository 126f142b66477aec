"""GSM-Symbolic generator: answers re-checked independently of the generator's arithmetic."""

from __future__ import annotations

import ast
import json
import random
import re
import subprocess
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest

from mergekit_math.data.gsm_symbolic import (
    TEMPLATES,
    Problem,
    Template,
    generate,
    write_jsonl,
)

ANNOTATION = re.compile(r"<<(?P<expr>[^=<>]*)=(?P<value>[^<>]*)>>(?P<after>\d+)(?!\d)")
# lm-eval's gsm8k "strict-match" filter (lm_eval/tasks/gsm8k/gsm8k.yaml).
STRICT_MATCH = re.compile(r"#### (\-?[0-9\.\,]+)")


def evaluate(expr: str) -> Fraction:
    """Evaluate numbers, + - * / and parentheses only; anything else is an error."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return Fraction(str(node.value))
        if isinstance(node, ast.BinOp):
            ops = {
                ast.Add: lambda a, b: a + b,
                ast.Sub: lambda a, b: a - b,
                ast.Mult: lambda a, b: a * b,
                ast.Div: lambda a, b: a / b,
            }
            if type(node.op) in ops:
                return ops[type(node.op)](walk(node.left), walk(node.right))
        raise AssertionError(f"unexpected syntax in {expr!r}: {ast.dump(node)}")

    return walk(ast.parse(expr, mode="eval").body)


def numbers(question: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", question)]


def exact(value: Fraction) -> int:
    assert value.denominator == 1 and value >= 0, value
    return int(value)


F = Fraction

# One hand-written solver per template, from the numbers in the question in reading order.
SOLVERS: dict[str, Callable[[list[int]], int]] = {
    "shopping_change": lambda n: n[6] - (n[0] * n[1] + n[2] * n[3] + n[4] * n[5]),
    "age_relation": lambda n: n[2] + (n[2] + n[0]) + n[1] * n[2],
    "percent_discount": lambda n: exact(n[2] * F(n[0]) * (100 - n[1]) / 100),
    "factory_rate": lambda n: n[0] * n[1] * n[2] - n[3],
    "equal_sharing": lambda n: exact(F(n[0] - n[1], n[2] + 1)),
    "activity_comparison": lambda n: n[0] * n[1] - n[2] * n[3],
    "savings_goal": lambda n: exact(F(n[0] - n[1] - n[2], n[3])),
    "group_fractions": lambda n: exact(F(n[0]) * (100 - n[1]) / 100 / n[2]),
    "trip_distance": lambda n: n[0] - n[1] * n[2] - n[3] * n[4],
    "recipe_scaling": lambda n: exact(F(n[3], n[0]) * (n[1] + n[2])),
    "inventory_sales": lambda n: n[0] * n[1] - n[2] * (1 + n[3]),
    "hourly_earnings": lambda n: (n[0] * n[1] + n[3]) * n[2],
    "garden_harvest": lambda n: exact(F(n[0] * n[1] * n[2] - n[3], n[4])),
    "unit_price_comparison": lambda n: exact(F(n[1], n[0]) - F(n[3], n[2])),
    "spending_left": lambda n: exact(F(n[0], 2) * (100 - n[1]) / 100),
    "practice_hours": lambda n: exact(F(n[0] * n[1] * n[2], 60)),
    "vehicles_needed": lambda n: exact(F(n[0] + n[1], n[2])),
}


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return generate(200, seed=0)


def test_every_template_has_an_independent_solver() -> None:
    assert set(SOLVERS) == set(TEMPLATES)
    assert len(TEMPLATES) >= 12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_answers_match_hand_written_solvers(seed: int) -> None:
    for problem in generate(30 * len(TEMPLATES), seed=seed):
        expected = SOLVERS[problem.template](numbers(problem.question))
        assert expected == problem.final, problem.question


def test_calculator_annotations_are_correct(problems: list[Problem]) -> None:
    for p in problems:
        found = list(ANNOTATION.finditer(p.answer))
        assert len(found) == p.answer.count("<<") == p.answer.count(">>") == p.steps
        for m in found:
            value = evaluate(m["expr"])
            assert value == Fraction(m["value"]), m.group(0)
            assert value.denominator == 1 and value >= 0, m.group(0)
            assert m["after"] == m["value"], m.group(0)
        last = p.answer.splitlines()[-1]
        assert last == f"#### {p.final}"
        assert int(found[-1]["value"]) == p.final


def test_steps_and_template_coverage(problems: list[Problem]) -> None:
    assert all(2 <= p.steps <= 5 for p in problems)
    assert len({p.template for p in problems}) >= 12
    first_round = generate(len(TEMPLATES), seed=5)
    assert {p.template for p in first_round} == set(TEMPLATES)


def test_deterministic_per_seed() -> None:
    assert generate(50, 3) == generate(50, 3)
    assert generate(50, 3) != generate(50, 4)


def test_questions_are_distinct() -> None:
    questions = [p.question for p in generate(500, seed=0)]
    assert len(set(questions)) == 500


def test_strict_match_extracts_final(problems: list[Problem]) -> None:
    for p in problems:
        assert STRICT_MATCH.findall(p.answer) == [str(p.final)]


def test_write_jsonl_round_trip(tmp_path: Path, problems: list[Problem]) -> None:
    out = tmp_path / "sub" / "gsm.jsonl"
    write_jsonl(problems, out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(problems)
    ids = set()
    for line, p in zip(lines, problems):
        record = json.loads(line)
        assert record["question"] == p.question and record["answer"] == p.answer
        assert record["template"] == p.template
        assert re.fullmatch(r"#### -?\d+", record["answer"].splitlines()[-1])
        ids.add(record["id"])
    assert len(ids) == len(problems)
    assert [f.name for f in out.parent.iterdir()] == ["gsm.jsonl"]  # no temporary left behind


def test_template_subset_and_bad_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    subset = generate(10, seed=0, templates=["savings_goal"])
    assert {p.template for p in subset} == {"savings_goal"}
    assert generate(0) == []
    with pytest.raises(ValueError, match="non-negative"):
        generate(-1)
    with pytest.raises(ValueError, match="unknown template"):
        generate(3, templates=["no_such_template"])

    fixed = TEMPLATES["age_relation"]
    tiny = Template("tiny", "always the same question", lambda rng: fixed.build(random.Random(0)))
    monkeypatch.setitem(TEMPLATES, "tiny", tiny)
    with pytest.raises(ValueError, match="only 1 distinct problems"):
        generate(2, templates=["tiny"])


def test_import_stays_light() -> None:
    code = "import sys, mergekit_math.data.gsm_symbolic; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
