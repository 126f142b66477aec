"""MATH-style problems with boxed answers, generated offline (``mmath data math-symbolic``).

Six families, each with five difficulty levels as in MATH: fractions (order of operations),
radicals (simplifying, rationalising), polynomials (values, roots, remainders), systems of
linear equations, probabilities (dice, coins, bags) and modular arithmetic. Every answer is
computed with sympy and written as LaTeX (``sympy.latex``) in ``answer`` and in the
solution's final ``\\boxed{}``; ``Problem.check`` keeps the parameters so tests can verify the
answer a second way. The same seed gives the same problems. Rows are MATH-500 JSONL:
``problem``, ``solution``, ``answer``, ``level`` (1-5), ``subject``, ``unique_id``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

from mergekit_math.errors import UserError

LEVELS = (1, 2, 3, 4, 5)
SQUARE_FREE = (2, 3, 5, 6, 7, 10, 11, 13, 14, 15)
# Tries before integer_answers gives up (each family has integer answers at some level).
MAX_TRIES_PER_PROBLEM = 200


@dataclass
class Problem:
    problem: str
    solution: str
    answer: str
    level: int
    subject: str
    family: str
    unique_id: str = ""
    check: dict[str, Any] = field(default_factory=dict)
    value: Any = None  # the sympy answer

    def row(self) -> dict[str, Any]:
        """The MATH-500 JSONL row."""
        return {
            "problem": self.problem,
            "solution": self.solution,
            "answer": self.answer,
            "level": self.level,
            "subject": self.subject,
            "unique_id": self.unique_id,
        }


@dataclass
class _Draft:
    """What a family function returns; ``generate`` adds the answer line and the level."""

    problem: str
    steps: str
    value: Any
    check: dict[str, Any]


def _latex(value: Any) -> str:
    import sympy

    return sympy.latex(value).replace("- ", "-")


def _frac(p: int, q: int) -> str:
    return f"\\frac{{{p}}}{{{q}}}" if p >= 0 else f"-\\frac{{{-p}}}{{{q}}}"


# ----------------------------------------------------------------------------- fractions

_FRACTION_OPS = {1: "+", 2: "+-", 3: "+-*", 4: "+-*/", 5: "+-*/"}
_OP_TEX = {"+": "+", "-": "-", "*": "\\times", "/": "\\div"}


def _fractions(rng: random.Random, level: int) -> _Draft:
    import sympy

    terms = min(level + 1, 4) if level < 5 else 5
    top = 6 + 2 * level
    parts: list[tuple[int, int]] = []
    for _ in range(terms):
        q = rng.randint(2, top)
        p = rng.randint(1, q - 1) if level < 5 else rng.choice([-1, 1]) * rng.randint(1, 2 * q)
        parts.append((p, q))
    ops = [rng.choice(_FRACTION_OPS[level]) for _ in range(terms - 1)]
    expr = f"Fraction({parts[0][0]}, {parts[0][1]})"
    tex = _frac(*parts[0])
    for op, (p, q) in zip(ops, parts[1:]):
        expr += f" {op} Fraction({p}, {q})"
        shown = _frac(p, q) if p > 0 else f"\\left({_frac(p, q)}\\right)"
        tex += f" {_OP_TEX[op]} {shown}"
    value = sympy.sympify(expr.replace("Fraction", "Rational"))
    problem = f"Compute ${tex}$. Express your answer as a common fraction in lowest terms."
    if value.is_integer:
        problem = f"Compute ${tex}$."
    steps = (
        "Multiplications and divisions come first, then additions and subtractions from left to "
        f"right, over a common denominator: ${tex} = {_latex(value)}$."
    )
    return _Draft(problem, steps, value, {"expr": expr})


# ----------------------------------------------------------------------------- radicals


def _radicals(rng: random.Random, level: int) -> _Draft:
    import sympy

    m = rng.choice(SQUARE_FREE)
    k = rng.randint(2, 3 + 2 * level)
    if level == 1:
        tex, expr = f"\\sqrt{{{k * k * m}}}", f"sqrt({k * k * m})"
        problem = f"Simplify ${tex}$."
    elif level == 2:
        a, b, k2 = rng.randint(1, 5), rng.randint(1, 5), rng.randint(2, 6)
        coef = {1: ""}
        tex = f"{coef.get(a, a)}\\sqrt{{{k * k * m}}} + {coef.get(b, b)}\\sqrt{{{k2 * k2 * m}}}"
        expr = f"{a}*sqrt({k * k * m}) + {b}*sqrt({k2 * k2 * m})"
        problem = f"Simplify ${tex}$."
    elif level == 3:
        x = m * rng.randint(2, 6)
        y = m * rng.choice([1, 4, 9]) * rng.choice([1, 2, 3])
        tex, expr = f"\\sqrt{{{x}}} \\cdot \\sqrt{{{y}}}", f"sqrt({x})*sqrt({y})"
        problem = f"Simplify ${tex}$."
    elif level == 4:
        a = rng.randint(1, 12)
        tex, expr = f"\\frac{{{a}}}{{\\sqrt{{{m}}}}}", f"{a}/sqrt({m})"
        problem = f"Rationalize the denominator: ${tex}$. Simplify your answer."
    else:
        a, b = rng.randint(1, 9), rng.randint(1, 5)
        while b * b == m:
            b += 1
        tex, expr = f"\\frac{{{a}}}{{{b} + \\sqrt{{{m}}}}}", f"{a}/({b} + sqrt({m}))"
        problem = f"Rationalize the denominator: ${tex}$. Simplify your answer."
    value = sympy.radsimp(sympy.sympify(expr))
    value = sympy.nsimplify(sympy.expand(value)) if level == 5 else sympy.simplify(value)
    steps = (
        "Take the square factors out of each radical (and multiply by the conjugate to clear a "
        f"radical from a denominator): ${tex} = {_latex(value)}$."
    )
    return _Draft(problem, steps, value, {"expr": expr})


# ----------------------------------------------------------------------------- polynomials


def _poly_tex(coeffs: Sequence[int]) -> str:
    import sympy

    x = sympy.Symbol("x")
    return sympy.latex(sum(c * x**i for i, c in enumerate(reversed(coeffs))))


def _polynomials(rng: random.Random, level: int) -> _Draft:
    import sympy

    x = sympy.Symbol("x")

    def roots(k: int) -> list[int]:
        return [rng.choice([-1, 1]) * rng.randint(1, 3 + level) for _ in range(k)]

    if level == 1:
        coeffs = [rng.randint(1, 5), rng.randint(-9, 9), rng.randint(-9, 9)]
        t = rng.randint(-4, 4)
        poly = sympy.Poly(coeffs, x)
        problem = f"If $f(x) = {_poly_tex(coeffs)}$, what is the value of $f({t})$?"
        value, check = poly.eval(t), {"kind": "value_at", "coeffs": coeffs, "x": t}
        steps = f"Substitute $x = {t}$: $f({t}) = {_latex(value)}$."
    elif level == 2:
        a, b = roots(2)
        poly = sympy.Poly(sympy.expand((x + a) * (x + b)), x)
        problem = (
            f"When $(x {a:+d})(x {b:+d})$ is expanded to the form $x^2 + px + q$, what is $p + q$?"
        )
        value = poly.all_coeffs()[1] + poly.all_coeffs()[2]
        check = {"kind": "coef_sum", "factors": [a, b]}
        steps = f"Expanding gives ${sympy.latex(poly.as_expr())}$, so $p + q = {value}$."
    elif level in (3, 4):
        r1, r2 = roots(2)
        lead = 1 if level == 3 else rng.randint(2, 4)
        poly = sympy.Poly(sympy.expand((x - r1) * (lead * x - r2)), x)
        coeffs = [int(c) for c in poly.all_coeffs()]
        if level == 3:
            problem = f"What is the larger solution of ${_poly_tex(coeffs)} = 0$?"
            value = max(sympy.Integer(r1), sympy.Integer(r2))
            check = {"kind": "max_root", "coeffs": coeffs}
        else:
            problem = f"What is the sum of the solutions of ${_poly_tex(coeffs)} = 0$?"
            value = sympy.Rational(-coeffs[1], coeffs[0])
            check = {"kind": "root_sum", "coeffs": coeffs}
        steps = (
            f"Factor: ${_poly_tex(coeffs)} = {sympy.latex(sympy.factor(poly.as_expr()))}$; "
            f"the answer is ${_latex(value)}$."
        )
    else:
        coeffs = [rng.randint(1, 4)] + [rng.randint(-9, 9) for _ in range(3)]
        t = rng.choice([-1, 1]) * rng.randint(1, 4)
        poly = sympy.Poly(coeffs, x)
        divisor = sympy.latex(x - t)
        problem = f"What is the remainder when ${_poly_tex(coeffs)}$ is divided by ${divisor}$?"
        value = sympy.rem(poly, sympy.Poly(x - t, x)).as_expr()
        check = {"kind": "remainder", "coeffs": coeffs, "x": t}
        steps = f"By the remainder theorem the remainder is $p({t}) = {_latex(value)}$."
    return _Draft(problem, steps, sympy.sympify(value), check)


# ----------------------------------------------------------------------------- systems

_VARS = ("x", "y", "z")


def _equation_tex(row: Sequence[int], rhs: int) -> str:
    import sympy

    lhs = sum(c * sympy.Symbol(v) for c, v in zip(row, _VARS))
    return f"{sympy.latex(lhs)} = {rhs}"


def _systems(rng: random.Random, level: int) -> _Draft:
    import sympy

    size = 2 if level <= 3 else 3
    span = 2 + level
    while True:
        matrix = sympy.Matrix(size, size, lambda i, j: rng.randint(-span, span))
        if matrix.det() != 0:
            break
    if level < 5:
        solution = sympy.Matrix([rng.randint(-9, 9) for _ in range(size)])
        rhs = matrix * solution
    else:
        rhs = sympy.Matrix([rng.randint(-20, 20) for _ in range(size)])
        solution = matrix.LUsolve(rhs)
    weights = {1: [1, 0], 2: [1, 1], 3: [2, -3], 4: [1, 1, 1], 5: [1, 0, 0]}[level]
    names = _VARS[:size]
    (sol,) = sympy.linsolve((matrix, rhs), *sympy.symbols(names))
    value = sympy.nsimplify(sum(w * s for w, s in zip(weights, sol)))
    target = sympy.latex(sum(w * sympy.Symbol(v) for w, v in zip(weights, names)))
    rows = [[int(c) for c in matrix.row(i)] for i in range(size)]
    system = ",\\quad ".join(_equation_tex(r, int(b)) for r, b in zip(rows, rhs))
    problem = f"If ${system}$, what is the value of ${target}$?"
    if not value.is_integer:
        problem += " Express your answer as a common fraction."
    shown = ", ".join(f"{v} = {_latex(s)}" for v, s in zip(names, sol))
    steps = f"Eliminating one variable at a time gives ${shown}$, so ${target} = {_latex(value)}$."
    return _Draft(
        problem, steps, value, {"matrix": rows, "rhs": [int(b) for b in rhs], "weights": weights}
    )


# ----------------------------------------------------------------------------- probability


def _probability(rng: random.Random, level: int) -> _Draft:
    import sympy

    if level in (1, 3):
        red, blue = rng.randint(2, 8), rng.randint(2, 8)
        bag = f"A bag holds {red} red marbles and {blue} blue marbles."
        if level == 1:
            problem = f"{bag} One marble is drawn at random. What is the probability it is red?"
            value = sympy.Rational(red, red + blue)
        else:
            problem = (
                f"{bag} Two marbles are drawn at random without replacement. What is the "
                "probability that both are red?"
            )
            value = sympy.Rational(red * (red - 1), (red + blue) * (red + blue - 1))
        check = {"kind": "bag", "red": red, "blue": blue, "draws": 1 if level == 1 else 2}
    elif level in (2, 5):
        dice = 2 if level == 2 else 3
        total = rng.randint(dice + 1, 6 * dice - 1)
        word = "two" if dice == 2 else "three"
        problem = (
            f"{word.capitalize()} fair six-sided dice are rolled. What is the probability that "
            f"the numbers shown add up to {total}?"
        )
        ways = sum(1 for roll in product(range(1, 7), repeat=dice) if sum(roll) == total)
        value = sympy.Rational(ways, 6**dice)
        check = {"kind": "dice", "dice": dice, "total": total}
    else:
        flips = rng.randint(4, 8)
        heads = rng.randint(1, flips - 1)
        problem = (
            f"A fair coin is flipped {flips} times. What is the probability of getting exactly "
            f"{heads} heads?"
        )
        value = sympy.Rational(sympy.binomial(flips, heads), 2**flips)
        check = {"kind": "coins", "flips": flips, "heads": heads}
    problem += " Express your answer as a common fraction."
    steps = f"Count the favourable equally likely outcomes over all outcomes: ${_latex(value)}$."
    return _Draft(problem, steps, value, check)


# ----------------------------------------------------------------------------- modular


def _modular(rng: random.Random, level: int) -> _Draft:
    import sympy
    from sympy.ntheory.modular import crt

    m = rng.randint(3, 6 + 3 * level)
    if level == 1:
        a = rng.randint(50, 999)
        problem = f"What is the remainder when ${a}$ is divided by ${m}$?"
        value, check = sympy.Mod(a, m), {"kind": "mod", "a": a, "m": m}
    elif level == 2:
        a, b, c = rng.randint(20, 300), rng.randint(20, 300), rng.randint(1, 99)
        problem = f"What is the remainder when ${a} \\cdot {b} + {c}$ is divided by ${m}$?"
        value, check = sympy.Mod(a * b + c, m), {"kind": "affine", "a": a, "b": b, "c": c, "m": m}
    elif level == 3:
        a, k = rng.randint(2, 30), rng.randint(20, 500)
        problem = f"What is the remainder when ${a}^{{{k}}}$ is divided by ${m}$?"
        value = sympy.Mod(sympy.Integer(a) ** k, m)
        check = {"kind": "power", "a": a, "k": k, "m": m}
    elif level == 4:
        m = sympy.prevprime(rng.randint(12, 60))
        a = rng.randint(2, int(m) - 1)
        problem = (
            f"Find the inverse of ${a}$ modulo ${m}$, that is, the integer $n$ with "
            f"$0 \\le n < {m}$ and ${a} n \\equiv 1 \\pmod{{{m}}}$."
        )
        value, check = (
            sympy.Integer(sympy.mod_inverse(a, m)),
            {"kind": "inverse", "a": a, "m": int(m)},
        )
    else:
        while True:
            m1, m2 = rng.randint(3, 25), rng.randint(3, 25)
            if sympy.gcd(m1, m2) == 1 and m1 * m2 <= 999:
                break
        r1, r2 = rng.randint(1, m1 - 1), rng.randint(1, m2 - 1)
        problem = (
            f"What is the smallest positive integer $n$ such that $n \\equiv {r1} \\pmod{{{m1}}}$ "
            f"and $n \\equiv {r2} \\pmod{{{m2}}}$?"
        )
        value = sympy.Integer(crt([m1, m2], [r1, r2])[0])
        check = {"kind": "crt", "moduli": [m1, m2], "residues": [r1, r2]}
    steps = f"Working modulo the given modulus step by step gives ${_latex(value)}$."
    return _Draft(problem, steps, sympy.Integer(value), check)


FAMILIES: dict[str, tuple[str, Callable[[random.Random, int], _Draft]]] = {
    "fractions": ("Prealgebra", _fractions),
    "radicals": ("Algebra", _radicals),
    "polynomials": ("Intermediate Algebra", _polynomials),
    "systems": ("Algebra", _systems),
    "probability": ("Counting & Probability", _probability),
    "modular": ("Number Theory", _modular),
}


def parse_levels(text: str) -> tuple[int, ...]:
    """``"3"``, ``"1-5"`` or ``"1,3,5"`` as sorted levels within 1-5."""
    levels: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            levels.update(range(first, last + 1))
    except ValueError:
        raise UserError(
            f"--level: expected N, LOW-HIGH or N,M,... within 1-5, got {text!r}"
        ) from None
    if not levels or not levels <= set(LEVELS):
        raise UserError(f"--level: levels are 1 to 5, got {text!r}")
    return tuple(sorted(levels))


def _is_aime(value: Any) -> bool:
    return bool(getattr(value, "is_integer", False)) and 0 <= int(value) <= 999


def generate(
    n: int,
    seed: int = 0,
    levels: Sequence[int] = LEVELS,
    families: Sequence[str] | None = None,
    integer_answers: bool = False,
) -> list[Problem]:
    """``n`` problems, families in turn, each at a level drawn from ``levels``; with
    ``integer_answers`` only problems whose answer is an integer 0-999 (AIME style)."""
    if n < 0:
        raise UserError(f"-n: expected a count of problems, got {n}")
    names = list(families or FAMILIES)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise UserError(f"--family: unknown {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    rng = random.Random(seed)
    problems: list[Problem] = []
    for i in range(n * MAX_TRIES_PER_PROBLEM):
        if len(problems) == n:
            break
        family = names[i % len(names)]
        subject, make = FAMILIES[family]
        level = rng.choice(list(levels))
        draft = make(rng, level)
        if integer_answers and not _is_aime(draft.value):
            continue
        answer = _latex(draft.value)
        solution = f"{draft.steps} The answer is $\\boxed{{{answer}}}$."
        uid = f"math-symbolic/{family}/seed{seed}-{len(problems)}"
        problems.append(
            Problem(
                draft.problem,
                solution,
                answer,
                level,
                subject,
                family,
                uid,
                draft.check,
                draft.value,
            )
        )
    if len(problems) < n:
        raise UserError(f"could not generate {n} problems with integer answers at these levels")
    return problems


def write_jsonl(problems: Iterable[Problem], path: str | os.PathLike[str]) -> None:
    """Write MATH-500 rows, one per line, atomically (a temporary sibling renamed)."""
    from pathlib import Path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with tmp.open("w") as f:
        for p in problems:
            f.write(json.dumps(p.row(), ensure_ascii=False) + "\n")
    os.replace(tmp, target)
