"""GSM8K-format word problems generated from symbolic templates ("GSM-Symbolic" style).

Each template samples names, objects and numbers from a ``random.Random`` it is handed and
writes the question together with a worked solution. Every calculation in the solution is
written as a GSM8K calculator annotation, ``3 * 4 = <<3*4=12>>12``, and evaluated here, so no
answer is typed in by hand; numbers are sampled so that every intermediate result is a
non-negative integer. The solution ends with ``#### N``, the line lm-eval's gsm8k
``strict-match`` filter reads.

Only the standard library is used, so the ``mmath data gsm-symbolic`` command stays light::

    problems = generate(200, seed=0)
    write_jsonl(problems, "gsm_symbolic.jsonl")
"""

from __future__ import annotations

import ast
import json
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from mergekit_math.errors import UserError

MIN_STEPS = 2
MAX_STEPS = 5
# Draws of one template in a row that may all repeat earlier questions before the template is
# taken out of the rotation as exhausted.
TRIES_PER_TEMPLATE = 200

NAMES = (
    "Aisha", "Ben", "Carlos", "Mei", "Dmitri", "Fatima", "Hiro", "Ines", "Jamal", "Kofi",
    "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma",
    "Vera", "Wei", "Ximena", "Yusuf", "Zara", "Amara", "Bruno", "Chloe", "Diego", "Elif",
    "Farah", "Gabriel", "Hana", "Ivan", "Julia", "Kenji", "Leila", "Marco", "Noor", "Olga",
    "Pablo", "Ravi", "Sofia", "Tomas", "Yara", "Emma", "Liam", "Ngozi", "Sanjay", "Ingrid",
)  # fmt: skip


class GenerationError(UserError, ValueError):
    """A request the generator cannot meet (bad ``n``, unknown template, too few problems)."""


@dataclass(frozen=True)
class Problem:
    """One generated word problem.

    ``answer`` is the GSM8K-style worked solution ending in ``#### {final}``; ``steps`` is the
    number of calculator annotations in it.
    """

    question: str
    answer: str
    final: int
    template: str
    steps: int

    def to_json(self) -> dict[str, str]:
        """The JSONL record: lm-eval reads ``question`` and ``answer`` and ignores the rest."""
        return {"question": self.question, "answer": self.answer, "template": self.template}


# --- worked solutions ----------------------------------------------------------------------

_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _evaluate(node: ast.AST) -> Fraction:
    """Exact value of an expression of integers, ``+ - * /`` and parentheses."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        return left / right
    raise ValueError(f"unsupported element in calculator expression: {ast.dump(node)}")


class _Work:
    """The lines of a worked solution and the values its calculator steps produced."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.values: list[int] = []

    def calc(self, expr: str) -> tuple[str, int]:
        """Evaluate ``expr`` (written with spaces, ``"3 * 4"``) and return its annotated text.

        The text is ``"3 * 4 = <<3*4=12>>12"``; the value must be a non-negative integer, so a
        sampling mistake in a template fails loudly instead of writing a wrong answer.
        """
        compact = expr.replace(" ", "")
        value = _evaluate(ast.parse(compact, mode="eval"))
        if value.denominator != 1 or value < 0:
            raise ValueError(f"{expr} = {value} is not a non-negative integer")
        self.values.append(int(value))
        return f"{expr} = <<{compact}={value}>>{value}", int(value)

    def say(self, line: str) -> None:
        """Append one line of the solution."""
        self.lines.append(line)


@dataclass(frozen=True)
class Template:
    """A named problem family: ``build`` writes a question and its worked solution."""

    name: str
    description: str
    build: Callable[[random.Random], tuple[str, _Work]]


def _pick_names(rng: random.Random, k: int) -> list[str]:
    return rng.sample(NAMES, k)


# --- templates -----------------------------------------------------------------------------


def _shopping_change(rng: random.Random) -> tuple[str, _Work]:
    (name,) = _pick_names(rng, 1)
    items = rng.sample(
        ["notebooks", "pens", "apples", "muffins", "stickers", "candles", "socks", "mugs", "limes"],
        3,
    )
    counts = [rng.randint(2, 9) for _ in items]
    prices = [rng.randint(1, 12) for _ in items]
    total = sum(c * p for c, p in zip(counts, prices))
    bill = rng.choice([b for b in (50, 100, 200, 500) if b >= total])
    first, second, third = (f"{c} {i} at ${p} each" for c, i, p in zip(counts, items, prices))
    question = (
        f"{name} buys {first}, {second}, and {third}. {name} pays with a ${bill} bill. "
        f"How much change, in dollars, does {name} get back?"
    )
    w = _Work()
    costs = []
    for c, item, p in zip(counts, items, prices):
        text, cost = w.calc(f"{c} * {p}")
        w.say(f"The {item} cost {text} dollars.")
        costs.append(cost)
    text, spent = w.calc(" + ".join(map(str, costs)))
    w.say(f"In total {name} spends {text} dollars.")
    text, _ = w.calc(f"{bill} - {spent}")
    w.say(f"{name} gets {text} dollars in change.")
    return question, w


def _age_relation(rng: random.Random) -> tuple[str, _Work]:
    a, b, c = _pick_names(rng, 3)
    age_b, older, times = rng.randint(4, 15), rng.randint(2, 12), rng.randint(2, 4)
    question = (
        f"{a} is {older} years older than {b}. {c} is {times} times as old as {b}. "
        f"If {b} is {age_b} years old, what is the sum of the ages of all three?"
    )
    w = _Work()
    text, age_a = w.calc(f"{age_b} + {older}")
    w.say(f"{a} is {text} years old.")
    text, age_c = w.calc(f"{times} * {age_b}")
    w.say(f"{c} is {text} years old.")
    text, _ = w.calc(f"{age_b} + {age_a} + {age_c}")
    w.say(f"Together they are {text} years old.")
    return question, w


def _percent_discount(rng: random.Random) -> tuple[str, _Work]:
    (name,) = _pick_names(rng, 1)
    item = rng.choice(["jacket", "lamp", "backpack", "board game", "helmet", "kettle", "scarf"])
    price = 20 * rng.randint(1, 15)  # a multiple of 20 makes every listed discount whole
    off = rng.choice([10, 15, 20, 25, 30, 40, 50])
    count = rng.randint(2, 6)
    question = (
        f"A {item} normally costs ${price}. During a sale, every {item} is {off}% off. "
        f"{name} buys {count} of them. How much does {name} pay in dollars?"
    )
    w = _Work()
    text, discount = w.calc(f"{price} * {off} / 100")
    w.say(f"The discount on one {item} is {text} dollars.")
    text, sale = w.calc(f"{price} - {discount}")
    w.say(f"One {item} costs {text} dollars on sale.")
    text, _ = w.calc(f"{count} * {sale}")
    w.say(f"{name} pays {text} dollars.")
    return question, w


def _factory_rate(rng: random.Random) -> tuple[str, _Work]:
    product = rng.choice(["bottles", "toys", "bolts", "cups", "bricks", "buttons", "boxes"])
    rate, hours, days = rng.randint(5, 60), rng.randint(2, 12), rng.randint(2, 7)
    made = rate * hours * days
    faulty = rng.randint(1, max(1, made // 5))
    question = (
        f"A machine makes {rate} {product} per hour. It runs {hours} hours a day for {days} "
        f"days. Inspectors reject {faulty} of the {product} as faulty. "
        f"How many good {product} are left?"
    )
    w = _Work()
    text, per_day = w.calc(f"{rate} * {hours}")
    w.say(f"The machine makes {text} {product} a day.")
    text, total = w.calc(f"{per_day} * {days}")
    w.say(f"In {days} days it makes {text} {product}.")
    text, _ = w.calc(f"{total} - {faulty}")
    w.say(f"{text} {product} are good.")
    return question, w


def _equal_sharing(rng: random.Random) -> tuple[str, _Work]:
    a, b = _pick_names(rng, 2)
    things = rng.choice(["marbles", "stickers", "cookies", "trading cards", "grapes", "coins"])
    friends, share, given = rng.randint(2, 6), rng.randint(3, 20), rng.randint(1, 15)
    total = share * (friends + 1) + given
    question = (
        f"{a} has {total} {things}. {a} gives {given} of them to {b} and then splits the rest "
        f"equally among {a} and {friends} friends. How many {things} does each person get?"
    )
    w = _Work()
    text, rest = w.calc(f"{total} - {given}")
    w.say(f"After giving some to {b}, {a} has {text} {things}.")
    text, people = w.calc(f"{friends} + 1")
    w.say(f"The {things} are shared among {text} people.")
    text, _ = w.calc(f"{rest} / {people}")
    w.say(f"Each person gets {text} {things}.")
    return question, w


def _activity_comparison(rng: random.Random) -> tuple[str, _Work]:
    a, b = _pick_names(rng, 2)
    does, do, unit = rng.choice(
        [
            ("reads", "read", "pages"),
            ("swims", "swim", "laps"),
            ("runs", "run", "kilometers"),
            ("bikes", "bike", "miles"),
            ("folds", "fold", "paper cranes"),
        ]
    )
    while True:
        pa, da = rng.randint(3, 40), rng.randint(3, 14)
        pb, db = rng.randint(3, 40), rng.randint(3, 14)
        if pa * da > pb * db:
            break
    question = (
        f"{a} {does} {pa} {unit} a day for {da} days. {b} {does} {pb} {unit} a day for {db} "
        f"days. How many more {unit} did {a} {do} than {b}?"
    )
    w = _Work()
    text, total_a = w.calc(f"{pa} * {da}")
    w.say(f"{a} {does} {text} {unit}.")
    text, total_b = w.calc(f"{pb} * {db}")
    w.say(f"{b} {does} {text} {unit}.")
    text, _ = w.calc(f"{total_a} - {total_b}")
    w.say(f"{a} {does} {text} more {unit} than {b}.")
    return question, w


def _savings_goal(rng: random.Random) -> tuple[str, _Work]:
    a, b = _pick_names(rng, 2)
    item = rng.choice(["bicycle", "telescope", "guitar", "tablet", "skateboard", "camera"])
    weeks, weekly = rng.randint(2, 12), rng.randint(5, 25)
    saved, gift = rng.randint(10, 80), rng.randint(5, 50)
    cost = saved + gift + weeks * weekly
    question = (
        f"{a} wants to buy a {item} that costs ${cost}. {a} has already saved ${saved}, and "
        f"{b} gives {a} ${gift} as a gift. If {a} saves ${weekly} every week, how many weeks "
        f"will it take {a} to have enough money?"
    )
    w = _Work()
    text, have = w.calc(f"{saved} + {gift}")
    w.say(f"{a} already has {text} dollars.")
    text, need = w.calc(f"{cost} - {have}")
    w.say(f"{a} still needs {text} dollars.")
    text, _ = w.calc(f"{need} / {weekly}")
    w.say(f"It takes {text} weeks.")
    return question, w


def _group_fractions(rng: random.Random) -> tuple[str, _Work]:
    group, first, second, one_does, many_do = rng.choice(
        [
            ("students in a class", "boys", "girls", "walks to school", "walk to school"),
            ("members in a club", "adults", "children", "plays chess", "play chess"),
            ("animals at a shelter", "cats", "dogs", "gets adopted", "get adopted"),
            ("players at a camp", "forwards", "defenders", "wears glasses", "wear glasses"),
        ]
    )
    while True:
        percent, every = rng.choice([20, 25, 40, 50, 60, 75]), rng.randint(2, 5)
        sizes = [
            n
            for n in range(12, 121)
            if n * percent % 100 == 0 and n * (100 - percent) // 100 % every == 0
        ]
        if sizes:
            break
    size = rng.choice(sizes)
    question = (
        f"There are {size} {group}. {percent}% of them are {first} and the rest are {second}. "
        f"One out of every {every} {second} {one_does}. How many {second} {many_do}?"
    )
    w = _Work()
    text, n_first = w.calc(f"{size} * {percent} / 100")
    w.say(f"There are {text} {first}.")
    text, n_second = w.calc(f"{size} - {n_first}")
    w.say(f"There are {text} {second}.")
    text, _ = w.calc(f"{n_second} / {every}")
    w.say(f"{text} {second} {many_do}.")
    return question, w


def _trip_distance(rng: random.Random) -> tuple[str, _Work]:
    (name,) = _pick_names(rng, 1)
    unit = rng.choice(["kilometers", "miles"])
    v1, t1, v2, t2 = rng.randint(30, 90), rng.randint(2, 5), rng.randint(30, 90), rng.randint(2, 5)
    driven = v1 * t1 + v2 * t2
    away = driven + rng.randint(10, 200)
    question = (
        f"{name} drives to a city that is {away} {unit} away. {name} drives at {v1} {unit} per "
        f"hour for {t1} hours, then at {v2} {unit} per hour for {t2} hours. "
        f"How many {unit} are left to drive?"
    )
    w = _Work()
    text, first = w.calc(f"{v1} * {t1}")
    w.say(f"First {name} drives {text} {unit}.")
    text, second = w.calc(f"{v2} * {t2}")
    w.say(f"Then {name} drives {text} {unit}.")
    text, total = w.calc(f"{first} + {second}")
    w.say(f"{name} has driven {text} {unit}.")
    text, _ = w.calc(f"{away} - {total}")
    w.say(f"{text} {unit} are left.")
    return question, w


def _recipe_scaling(rng: random.Random) -> tuple[str, _Work]:
    (name,) = _pick_names(rng, 1)
    food = rng.choice(["cookies", "muffins", "pancakes", "brownies", "cupcakes", "scones"])
    per_batch, batches = rng.choice([6, 8, 10, 12, 16, 18, 24]), rng.randint(2, 8)
    flour, sugar = rng.randint(2, 5), rng.randint(2, 4)
    wanted = per_batch * batches
    question = (
        f"A recipe for {per_batch} {food} uses {flour} cups of flour and {sugar} cups of sugar. "
        f"{name} wants to bake {wanted} {food}. "
        f"How many cups of flour and sugar does {name} need altogether?"
    )
    w = _Work()
    text, n = w.calc(f"{wanted} / {per_batch}")
    w.say(f"{name} needs to make {text} batches.")
    text, cups_flour = w.calc(f"{n} * {flour}")
    w.say(f"That takes {text} cups of flour.")
    text, cups_sugar = w.calc(f"{n} * {sugar}")
    w.say(f"It also takes {text} cups of sugar.")
    text, _ = w.calc(f"{cups_flour} + {cups_sugar}")
    w.say(f"Altogether {name} needs {text} cups.")
    return question, w


def _inventory_sales(rng: random.Random) -> tuple[str, _Work]:
    fruit = rng.choice(["apples", "oranges", "pears", "mangoes", "peaches", "lemons"])
    crates, per_crate, times = rng.randint(3, 12), rng.randint(6, 24), rng.randint(2, 3)
    stock = crates * per_crate
    monday = rng.randint(1, stock // (times + 1))
    question = (
        f"A shop has {crates} crates with {per_crate} {fruit} in each crate. On Monday it sells "
        f"{monday} {fruit}, and on Tuesday it sells {times} times as many as on Monday. "
        f"How many {fruit} are left?"
    )
    w = _Work()
    text, total = w.calc(f"{crates} * {per_crate}")
    w.say(f"The shop starts with {text} {fruit}.")
    text, tuesday = w.calc(f"{times} * {monday}")
    w.say(f"On Tuesday it sells {text} {fruit}.")
    text, sold = w.calc(f"{monday} + {tuesday}")
    w.say(f"It sells {text} {fruit} in the two days.")
    text, _ = w.calc(f"{total} - {sold}")
    w.say(f"{text} {fruit} are left.")
    return question, w


def _hourly_earnings(rng: random.Random) -> tuple[str, _Work]:
    (name,) = _pick_names(rng, 1)
    job = rng.choice(["at a cafe", "as a tutor", "at a bookstore", "at a garden center"])
    wage, hours, days, tips = (
        rng.randint(8, 30),
        rng.randint(2, 8),
        rng.randint(2, 6),
        rng.randint(3, 40),
    )
    question = (
        f"{name} works {job}, earning ${wage} per hour. {name} works {hours} hours a day for "
        f"{days} days and also gets ${tips} in tips each day. "
        f"How many dollars does {name} earn in total?"
    )
    w = _Work()
    text, pay = w.calc(f"{wage} * {hours}")
    w.say(f"{name} earns {text} dollars in wages each day.")
    text, daily = w.calc(f"{pay} + {tips}")
    w.say(f"With tips, {name} earns {text} dollars a day.")
    text, _ = w.calc(f"{daily} * {days}")
    w.say(f"In {days} days {name} earns {text} dollars.")
    return question, w


def _garden_harvest(rng: random.Random) -> tuple[str, _Work]:
    (name,) = _pick_names(rng, 1)
    one, many = rng.choice(
        [
            ("tomato", "tomatoes"),
            ("pepper", "peppers"),
            ("cucumber", "cucumbers"),
            ("strawberry", "strawberries"),
            ("zucchini", "zucchinis"),
        ]
    )
    rows, per_row, each, bag = (
        rng.randint(2, 8),
        rng.randint(3, 12),
        rng.randint(2, 9),
        rng.randint(3, 10),
    )
    harvest = rows * per_row * each
    bags = rng.randint(1, (harvest - 1) // bag)
    given = harvest - bags * bag
    question = (
        f"{name} plants {rows} rows of {one} plants with {per_row} plants in each row. Each "
        f"plant produces {each} {many}. {name} gives {given} {many} to the neighbors and packs "
        f"the rest into bags of {bag}. How many bags does {name} fill?"
    )
    w = _Work()
    text, plants = w.calc(f"{rows} * {per_row}")
    w.say(f"{name} has {text} plants.")
    text, picked = w.calc(f"{plants} * {each}")
    w.say(f"They produce {text} {many}.")
    text, kept = w.calc(f"{picked} - {given}")
    w.say(f"{name} keeps {text} {many}.")
    text, _ = w.calc(f"{kept} / {bag}")
    w.say(f"{name} fills {text} bags.")
    return question, w


def _unit_price_comparison(rng: random.Random) -> tuple[str, _Work]:
    one, many = rng.choice(
        [
            ("pencil", "pencils"),
            ("battery", "batteries"),
            ("light bulb", "light bulbs"),
            ("tennis ball", "tennis balls"),
            ("candle", "candles"),
            ("notebook", "notebooks"),
        ]
    )
    shop_a, shop_b = rng.sample(
        ["Fresh Mart", "Corner Shop", "Big Value", "Main Street Market", "City Grocer"], 2
    )
    cheap = rng.randint(1, 8)
    dear = cheap + rng.randint(1, 5)
    n_a, n_b = rng.randint(2, 12), rng.randint(2, 12)
    question = (
        f"At {shop_a}, a box of {n_a} {many} costs ${n_a * dear}. At {shop_b}, a box of {n_b} "
        f"{many} costs ${n_b * cheap}. How many dollars more does one {one} cost at {shop_a} "
        f"than at {shop_b}?"
    )
    w = _Work()
    text, unit_a = w.calc(f"{n_a * dear} / {n_a}")
    w.say(f"At {shop_a} one {one} costs {text} dollars.")
    text, unit_b = w.calc(f"{n_b * cheap} / {n_b}")
    w.say(f"At {shop_b} one {one} costs {text} dollars.")
    text, _ = w.calc(f"{unit_a} - {unit_b}")
    w.say(f"One {one} costs {text} dollars more at {shop_a}.")
    return question, w


def _spending_left(rng: random.Random) -> tuple[str, _Work]:
    (name,) = _pick_names(rng, 1)
    first, second = rng.sample(["books", "a concert ticket", "groceries", "a gift", "paint"], 2)
    money = 40 * rng.randint(1, 12)  # half of it is a multiple of 20
    percent = rng.choice([10, 20, 25, 40, 50, 75])
    question = (
        f"{name} has ${money}. {name} spends half of it on {first} and then spends {percent}% "
        f"of what is left on {second}. How many dollars does {name} have left?"
    )
    w = _Work()
    text, half = w.calc(f"{money} / 2")
    w.say(f"{name} spends {text} dollars on {first}.")
    text, rest = w.calc(f"{money} - {half}")
    w.say(f"{name} has {text} dollars left.")
    text, spent = w.calc(f"{rest} * {percent} / 100")
    w.say(f"{name} spends {text} dollars on {second}.")
    text, _ = w.calc(f"{rest} - {spent}")
    w.say(f"{name} has {text} dollars left.")
    return question, w


def _practice_hours(rng: random.Random) -> tuple[str, _Work]:
    (name,) = _pick_names(rng, 1)
    activity = rng.choice(["the piano", "the guitar", "the violin", "chess", "basketball"])
    while True:
        minutes, days = rng.choice([15, 20, 25, 30, 40, 45, 50, 90]), rng.randint(3, 7)
        weeks = [n for n in range(2, 13) if minutes * days * n % 60 == 0]
        if weeks:
            break
    n_weeks = rng.choice(weeks)
    question = (
        f"{name} practices {activity} for {minutes} minutes a day, {days} days a week. "
        f"How many hours does {name} practice in {n_weeks} weeks?"
    )
    w = _Work()
    text, per_week = w.calc(f"{minutes} * {days}")
    w.say(f"{name} practices {text} minutes a week.")
    text, total = w.calc(f"{per_week} * {n_weeks}")
    w.say(f"In {n_weeks} weeks that is {text} minutes.")
    text, _ = w.calc(f"{total} / 60")
    w.say(f"That is {text} hours.")
    return question, w


def _vehicles_needed(rng: random.Random) -> tuple[str, _Work]:
    trip = rng.choice(["school trip", "museum visit", "field day", "science fair"])
    vehicle = rng.choice(["buses", "vans", "boats", "minibuses"])
    capacity, count, adults = rng.randint(8, 45), rng.randint(2, 9), rng.randint(2, 7)
    children = capacity * count - adults
    question = (
        f"{children} students and {adults} teachers are going on a {trip}. Each of the "
        f"{vehicle} holds {capacity} people, and every seat is filled. "
        f"How many {vehicle} are needed?"
    )
    w = _Work()
    text, people = w.calc(f"{children} + {adults}")
    w.say(f"There are {text} people going.")
    text, _ = w.calc(f"{people} / {capacity}")
    w.say(f"They need {text} {vehicle}.")
    return question, w


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "shopping_change", "three purchases, a total and change from a bill", _shopping_change
        ),
        Template(
            "age_relation",
            "ages of three people from 'older than' and 'times as old'",
            _age_relation,
        ),
        Template(
            "percent_discount", "a percentage discount applied to several items", _percent_discount
        ),
        Template(
            "factory_rate", "a production rate over hours and days, minus rejects", _factory_rate
        ),
        Template("equal_sharing", "give some away, share the rest equally", _equal_sharing),
        Template(
            "activity_comparison", "how many more one person did than another", _activity_comparison
        ),
        Template("savings_goal", "weeks of saving needed to reach a price", _savings_goal),
        Template(
            "group_fractions",
            "a percentage of a group, then one in every k of the rest",
            _group_fractions,
        ),
        Template(
            "trip_distance", "distance from two speeds and times, distance left", _trip_distance
        ),
        Template(
            "recipe_scaling", "scale a recipe by batches and add two ingredients", _recipe_scaling
        ),
        Template("inventory_sales", "stock in crates minus two days of sales", _inventory_sales),
        Template(
            "hourly_earnings", "hourly wage plus daily tips over several days", _hourly_earnings
        ),
        Template(
            "garden_harvest", "rows of plants, harvest, give away, pack into bags", _garden_harvest
        ),
        Template(
            "unit_price_comparison",
            "price per item in two shops and the difference",
            _unit_price_comparison,
        ),
        Template("spending_left", "spend half, then a percentage of the rest", _spending_left),
        Template("practice_hours", "minutes a day over weeks, converted to hours", _practice_hours),
        Template(
            "vehicles_needed", "people divided into vehicles of equal capacity", _vehicles_needed
        ),
    )
}


# --- generation ----------------------------------------------------------------------------


def _render(template: Template, rng: random.Random) -> Problem:
    """Draw one problem from ``template`` and assemble its GSM8K answer."""
    question, work = template.build(rng)
    steps = len(work.values)
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise ValueError(f"template {template.name!r} wrote {steps} steps, not 2 to 5")
    final = work.values[-1]
    answer = "\n".join([*work.lines, f"#### {final}"])
    return Problem(question, answer, final, template.name, steps)


def generate(n: int, seed: int = 0, templates: Sequence[str] | None = None) -> list[Problem]:
    """``n`` distinct problems, deterministic in ``seed``.

    Templates (all of :data:`TEMPLATES`, or the names in ``templates``) take turns in a fixed
    round-robin, so each appears once ``n`` reaches their number. A draw whose question was
    already generated is retried; a template that repeats itself :data:`TRIES_PER_TEMPLATE`
    times in a row leaves the rotation, and :class:`GenerationError` (a ``ValueError``) is raised
    when no template is left before ``n`` problems are found.
    """
    if n < 0:
        raise GenerationError(f"n must be non-negative, got {n}")
    names = list(TEMPLATES) if templates is None else list(templates)
    unknown = [name for name in names if name not in TEMPLATES]
    if unknown or not names:
        raise GenerationError(
            f"unknown template(s) {unknown or names}; choose from {', '.join(TEMPLATES)}"
        )
    rng = random.Random(seed)
    rotation = [TEMPLATES[name] for name in dict.fromkeys(names)]
    problems: list[Problem] = []
    seen: set[str] = set()
    turn = 0
    while len(problems) < n:
        if not rotation:
            raise GenerationError(
                f"only {len(problems)} distinct problems could be generated from templates "
                f"{', '.join(dict.fromkeys(names))}; asked for n={n}"
            )
        template = rotation[turn % len(rotation)]
        for _ in range(TRIES_PER_TEMPLATE):
            problem = _render(template, rng)
            if problem.question not in seen:
                seen.add(problem.question)
                problems.append(problem)
                turn += 1
                break
        else:
            rotation.remove(template)
    return problems


def write_jsonl(problems: Iterable[Problem], path: str | os.PathLike[str]) -> None:
    """Write one JSON record per line, ``{"question", "answer", "template", "id"}``.

    The file is written next to ``path`` under a temporary name and renamed into place, so a
    failure never leaves a partial file that looks finished.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for i, problem in enumerate(problems):
                record = {**problem.to_json(), "id": f"gsm-symbolic-{i:05d}"}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # a write error (disk full) names no file: name it
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
