"""Boxed-answer math tasks: answer extraction, math-verify scoring through the function the
task YAMLs call, the math-symbolic generator's answers re-derived with sympy, the JSONL
checkers, and math_local / aime_local run end to end through `mmath eval` on a tiny model."""

from __future__ import annotations

import json
from fractions import Fraction
from itertools import product
from pathlib import Path

import pytest
from conftest import mmath

from mergekit_math.data.math_symbolic import FAMILIES, generate, parse_levels, write_jsonl
from mergekit_math.errors import UserError
from mergekit_math.eval.boxed import extract_answer, last_boxed
from mergekit_math.eval.math_score import equivalent, process_results, reference_answer
from mergekit_math.eval.tasks import check_math_jsonl

pytest.importorskip("math_verify")

# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "boxed", "answer"),
    [
        (r"so $\boxed{\frac{1}{2}}$ then \boxed{\frac{\sqrt{3}}{2}}.", r"\frac{\sqrt{3}}{2}", None),
        (r"nested \boxed{\{1, \{2\}\}} end", r"\{1, \{2\}\}", None),
        (r"The answer is $\boxed 5$.", "5", None),
        (r"\fbox{7} is it", "7", None),
        (r"unclosed \boxed{3 + (", None, "3"),
        ("The answer is $12$.", None, "12"),
        ("Answer: x = 4\nnext line 9", None, "x = 4"),
        (r"we get $\frac12$ in the end", None, r"\frac12"),
        ("first 3, then 4.5 and 7/8", None, "7/8"),
        ("no answer at all", None, ""),
    ],
)
def test_boxed_extraction(text, boxed, answer):
    assert last_boxed(text) == boxed
    assert extract_answer(text) == (boxed if answer is None else answer)


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("0.5", r"\frac{1}{2}"),
        (r"\dfrac12", r"\frac{1}{2}"),
        (r"\frac12", "0.5"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        (r"3\sqrt{2}/2", r"\frac{3\sqrt2}{2}"),
        ("x = 3", "3"),
        ("033", "33"),
        ("1,000", "1000"),
        (r"(x+1)^2", "x^2+2x+1"),
        (r"\frac{-41}{60}", r"-\frac{41}{60}"),
    ],
)
def test_equivalent_answers(predicted, reference):
    assert equivalent(predicted, reference)


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("5", "6"),
        (r"\frac{1}{3}", "0.33"),
        (r"\sqrt{2}", "2"),
        ("", r"\frac{1}{2}"),
        ("3", ""),
        ("x^2+1", "(x+1)^2"),
        (r"\frac{2}{3}", r"\frac{3}{2}"),
    ],
)
def test_different_answers(predicted, reference):
    assert not equivalent(predicted, reference)


def test_process_results_scores_the_reference_one():
    doc = {"problem": "Compute 1/2 + 1/4.", "answer": r"\frac{3}{4}", "level": 1}
    assert process_results(doc, [r"Adding, we get $\boxed{\dfrac{3}{4}}$."]) == {"math_verify": 1.0}
    assert process_results(doc, ["It is 0.75."]) == {"math_verify": 1.0}  # last-number fallback
    assert process_results(doc, [r"$\boxed{\frac{3}{5}}$"]) == {"math_verify": 0.0}
    assert process_results(doc, [""]) == {"math_verify": 0.0}
    # No "answer": the last \boxed of the solution is the reference; AIME keys in any case.
    solved = {"problem": "p", "solution": r"First \boxed{1}, finally \boxed{2\sqrt{3}}."}
    assert reference_answer(solved) == r"2\sqrt{3}"
    assert process_results(solved, [r"\boxed{\sqrt{12}}"]) == {"math_verify": 1.0}
    aime = {"Problem": "p", "Answer": 33}
    assert process_results(aime, [r"so the answer is \boxed{033}"]) == {"math_verify": 1.0}


# ----------------------------------------------------------------------------- generator


def _sympy_check(p) -> object:
    """The answer of problem ``p`` derived again from its parameters, another way than the
    generator (brute force, plugging in, Python fractions)."""
    import sympy

    c = p.check
    if p.family == "fractions":
        return sympy.Rational(eval(c["expr"], {"Fraction": Fraction}))  # noqa: S307 - generated
    if p.family == "radicals":
        return sympy.sympify(c["expr"])
    if p.family == "polynomials":
        x = sympy.Symbol("x")
        if c["kind"] == "coef_sum":
            a, b = c["factors"]
            return sympy.expand((1 + a) * (1 + b)) - 1  # p + q = f(1) - 1
        poly = sympy.Poly(c["coeffs"], x)
        if c["kind"] in ("value_at", "remainder"):
            return sum(k * c["x"] ** i for i, k in enumerate(reversed(c["coeffs"])))
        found = sympy.solve(poly.as_expr(), x)
        return max(found) if c["kind"] == "max_root" else sum(found)
    if p.family == "systems":
        unknowns = sympy.symbols("x y z")[: len(c["rhs"])]
        eqs = [
            sympy.Eq(sum(k * v for k, v in zip(row, unknowns)), b)
            for row, b in zip(c["matrix"], c["rhs"])
        ]
        sol = sympy.solve(eqs, unknowns)
        return sum(w * sol[v] for w, v in zip(c["weights"], unknowns))
    if p.family == "probability":
        if c["kind"] == "bag":
            balls = ["r"] * c["red"] + ["b"] * c["blue"]
            draws = list(product(range(len(balls)), repeat=c["draws"]))
            draws = [d for d in draws if len(set(d)) == len(d)]
            good = [d for d in draws if all(balls[i] == "r" for i in d)]
            return sympy.Rational(len(good), len(draws))
        if c["kind"] == "dice":
            rolls = list(product(range(1, 7), repeat=c["dice"]))
            return sympy.Rational(sum(sum(r) == c["total"] for r in rolls), len(rolls))
        flips = list(product("HT", repeat=c["flips"]))
        return sympy.Rational(sum(f.count("H") == c["heads"] for f in flips), len(flips))
    kind = c["kind"]
    if kind == "mod":
        return c["a"] % c["m"]
    if kind == "affine":
        return (c["a"] * c["b"] + c["c"]) % c["m"]
    if kind == "power":
        return pow(c["a"], c["k"], c["m"])
    if kind == "inverse":
        return next(n for n in range(c["m"]) if c["a"] * n % c["m"] == 1)
    m1, m2 = c["moduli"]
    r1, r2 = c["residues"]
    return next(n for n in range(1, m1 * m2 + 1) if n % m1 == r1 and n % m2 == r2)


def test_generated_answers_check_with_sympy():
    import sympy
    from math_verify import parse

    problems = generate(120, seed=5)
    assert {p.family for p in problems} == set(FAMILIES)
    assert {p.level for p in problems} == {1, 2, 3, 4, 5}
    for p in problems:
        expected = sympy.nsimplify(_sympy_check(p))
        assert sympy.simplify(p.value - expected) == 0, (p.problem, p.answer, expected)
        # The LaTeX written in the row is that value too, and the solution boxes it.
        (written, *_) = parse(f"$\\boxed{{{p.answer}}}$")
        assert sympy.simplify(written - expected) == 0, (p.answer, expected)
        assert last_boxed(p.solution) == p.answer
        assert p.subject == FAMILIES[p.family][0]


def test_generator_is_deterministic_and_levels_hold(tmp_path):
    a = [p.row() for p in generate(30, seed=2, levels=(2, 4))]
    assert a == [p.row() for p in generate(30, seed=2, levels=(2, 4))]
    assert a != [p.row() for p in generate(30, seed=3, levels=(2, 4))]
    assert {r["level"] for r in a} == {2, 4}
    ints = generate(30, seed=0, integer_answers=True)
    assert all(r.answer.isdigit() and 0 <= int(r.answer) <= 999 for r in ints)
    assert parse_levels("1-3") == (1, 2, 3) and parse_levels("5,1") == (1, 5)
    for bad in ("0-2", "x", "6"):
        with pytest.raises(UserError, match="--level"):
            parse_levels(bad)

    out = tmp_path / "m.jsonl"
    res = mmath("data", "math-symbolic", "-n", 12, "--seed", 2, "--level", "3", "-o", out)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [p.row() for p in generate(12, seed=2, levels=(3,))]
    assert set(rows[0]) == {"problem", "solution", "answer", "level", "subject", "unique_id"}
    assert check_math_jsonl(out) == 12
    again = mmath("data", "math-symbolic", "-n", 3, "-o", out)
    assert again.exit_code != 0 and "already exists" in again.output


# ----------------------------------------------------------------------------- data checks


@pytest.mark.parametrize(
    ("lines", "aime", "message"),
    [
        (['{"problem": "p", "answer": "1"}', "{oops"], False, ":2: not JSON"),
        (['{"question": "q", "answer": "1"}'], False, ':1: a MATH row needs a "problem"'),
        (['{"problem": "p", "solution": "no box"}'], False, ":1: no reference answer"),
        (
            ['{"problem": "p", "answer": "1"}', '{"problem": "p", "answer": 2}'],
            False,
            ':2: "answer" is a int here but a str on line 1',
        ),
        (
            ['{"problem": "p", "answer": "12"}', '{"problem": "p", "answer": 1000}'],
            True,
            ':2: the "answer" must be an integer 0-999',
        ),
        (['{"Problem": "p", "Answer": "x"}'], True, ':1: the "answer" must be an integer'),
        ([], False, "holds no problems"),
    ],
)
def test_math_jsonl_checks_name_the_line(tmp_path, lines, aime, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=None) as err:
        check_math_jsonl(path, aime=aime)
    assert message in str(err.value) and str(err.value).startswith("--data: ")


def test_math_jsonl_accepts_math500_and_aime_rows(tmp_path):
    math500 = tmp_path / "math500.jsonl"
    math500.write_text(
        json.dumps(
            {
                "problem": "p",
                "solution": r"so \boxed{\frac{1}{2}}",
                "answer": "",
                "subject": "Algebra",
                "level": 2,
                "unique_id": "x",
            }
        )
        + "\n"
    )
    assert check_math_jsonl(math500) == 1
    aime = tmp_path / "aime.jsonl"
    aime.write_text(
        '{"ID": "2024-I-1", "Problem": "p", "Answer": 204}\n'
        '{"ID": "2024-I-2", "Problem": "q", "Answer": 25}\n'
    )
    assert check_math_jsonl(aime, aime=True) == 2


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMATH_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tiny_math import new_model

    folder = tmp_path_factory.mktemp("tiny") / "model"
    new_model(folder, seed=1).save_pretrained(folder)
    return folder


def test_math_and_aime_tasks_end_to_end(tmp_path, tiny):
    data = tmp_path / "math.jsonl"
    write_jsonl(generate(4, seed=0, levels=(1,)), data)
    aime = tmp_path / "aime.jsonl"
    aime.write_text('{"Problem": "What is 2+3?", "Answer": 5}\n{"Problem": "7*8?", "Answer": 56}\n')
    for task, path, n in (("math_local", data, 3), ("aime_local", aime, 2)):
        args = [
            "eval",
            tiny,
            "--tasks",
            task,
            "--data",
            path,
            "--limit",
            3,
            "--gen-kwargs",
            "max_gen_toks=8",
            "-o",
            tmp_path / task,
        ]
        res = mmath(*args)
        assert res.exit_code == 0, res.output
        doc = json.loads((tmp_path / task / "results.json").read_text())
        result = doc["results"][task]
        assert 0.0 <= result["math_verify,none"] <= 1.0
        assert doc["n-samples"][task]["effective"] == n
        assert doc["configs"][task]["dataset_kwargs"]["data_files"]["test"] == str(path)
        rows = [json.loads(x) for x in (tmp_path / task / f"samples_{task}.jsonl").open()]
        assert len(rows) == n
        for r in rows:  # the logged score is the scoring function's on the logged generation
            assert (
                r["math_verify"]
                == process_results(r["doc"], [r["filtered_resps"][0]])["math_verify"]
            )
        assert doc["mmath"]["cot_lengths"][task]["max"] <= 8


def test_eval_data_errors_for_math_tasks(tmp_path, tiny):
    data = tmp_path / "math.jsonl"
    write_jsonl(generate(2, seed=0), data)
    mixed = mmath("eval", tiny, "--tasks", "gsm8k_local,math_local", "--data", data)
    assert mixed.exit_code != 0 and "one file cannot serve tasks of different formats" in (
        mixed.output
    )
    bad = mmath("eval", tiny, "--tasks", "aime_local", "--data", data)
    assert bad.exit_code != 0 and f'{data}:1: the "answer" must be an integer' in bad.output


MATH_PROMPT = (
    "Problem: {}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    "\nSolution:"
)
BOXED_CHARS = "\\{}^()"
"""What level-1 math-symbolic problems and their boxed answers need beyond tiny_math.CHARS."""


def test_boxed_answers_score_as_trained(tmp_path):
    """A tiny model trained here to answer eight level-1 problems with `\\boxed{...}`: five
    with the reference answer, two in another form of the same value (a decimal for a
    fraction, an unsimplified radical) and one wrong. Greedy `mmath eval --tasks math_local`
    must score exactly 7/8, and each logged sample as trained."""
    from tiny_math import CHARS, train, vocabulary

    assert not set("\\{}") & set(CHARS)  # the default vocabulary cannot write \boxed{}
    default = list(vocabulary())
    assert list(vocabulary(BOXED_CHARS))[: len(default)] == default  # its ids stay as they are
    problems = generate(8, seed=0, levels=(1,))
    references = [p.answer for p in problems]
    assert references == [
        "1", r"5 \sqrt{7}", "33", "-1", r"\frac{2}{3}", "3", r"\frac{7}{10}", r"5 \sqrt{14}"
    ]  # fmt: skip
    assert problems[1].problem == r"Simplify $\sqrt{175}$."
    # 7/10 as a decimal and 5√7 unsimplified (right), a wrong remainder (3 + 1)
    trained = references[:]
    trained[6], trained[1], trained[5] = "0.7", r"\sqrt{175}", "4"
    expected = [0.0 if i == 5 else 1.0 for i in range(8)]
    index = {p.unique_id: i for i, p in enumerate(problems)}
    data = tmp_path / "math.jsonl"
    write_jsonl(problems, data)
    model = train(
        tmp_path / "model",
        problems,
        lambda p: f" The answer is $\\boxed{{{trained[index[p.unique_id]]}}}$.",
        prompt=lambda p: MATH_PROMPT.format(p.problem),
        steps=200,
        extra_chars=BOXED_CHARS,
    )
    out = tmp_path / "eval"
    res = mmath(
        "eval", model, "--tasks", "math_local", "--data", data,
        "--gen-kwargs", "max_gen_toks=40", "-o", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (out / "samples_math_local.jsonl").open()]
    assert sorted(index[r["doc"]["unique_id"]] for r in rows) == list(range(8))
    for r in rows:
        i = index[r["doc"]["unique_id"]]
        assert extract_answer(r["filtered_resps"][0]) == trained[i], r["filtered_resps"]
        assert r["math_verify"] == expected[i], (i, r["filtered_resps"])
    doc = json.loads((out / "results.json").read_text())
    assert doc["results"]["math_local"]["math_verify,none"] == pytest.approx(7 / 8)
