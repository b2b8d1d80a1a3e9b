"""Generated GSM8K-style word problems: numbers from a seeded RNG, answers by exact arithmetic.

Five kinds of problem (`TEMPLATES`), each with a few phrasings: shopping totals (and change
from a bill), rates and time, percentages and discounts, sharing and division (shares,
leftovers, boxes needed), and multi-step stories. Every answer is computed with `Fraction`,
never floats, and numbers are drawn so answers come out whole or in whole cents (checked:
`_number` refuses anything else), so a correct model answer can match exactly.

Every problem also carries the arithmetic `expression` that solves it, written the way the
agent's `calculator` tool takes it ("6 * 13 + 4 * 10.25", "ceil(374 / 17)"), so demonstrations
(examples/calculator/demos.py) can show one tool call per problem. `PROBLEMS` maps each kind to
its generator of `Problem`s; `TEMPLATES` keeps the older (question, answer) view of the same
draws.

Rows are `{"question": str, "answer": int | float}`. `make_dataset(n, seed)` is
deterministic and balanced: each consecutive block of `len(TEMPLATES)` rows holds one problem
of every kind, so a training batch sees all of them. `make_problems(n, seed)` is the same
draws with kinds and expressions.

    python -m examples.calculator.data 400 0 > examples/calculator/rows.jsonl
"""

from __future__ import annotations

import json
import math
import random
import sys
from fractions import Fraction
from itertools import islice
from typing import Callable, Iterator, NamedTuple

Row = dict[str, object]

NAMES = ["Maya", "Liam", "Ava", "Noah", "Zoe", "Omar", "Priya", "Lucas", "Mei", "Diego", "Sara", "Ken"]
ITEMS = [
    ("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("sandwich", "sandwiches"),
    ("comic book", "comic books"), ("bottle of juice", "bottles of juice"), ("candle", "candles"),
    ("pack of cards", "packs of cards"), ("scarf", "scarves"), ("mug", "mugs"),
]  # fmt: skip
SHARED = [("stickers", "friends"), ("marbles", "children"), ("cookies", "plates"), ("books", "shelves")]
PACKED = [("eggs", "cartons"), ("muffins", "boxes"), ("pencils", "packs"), ("photos", "albums")]


def _number(x: Fraction) -> int | float:
    """An exact answer as JSON will carry it: int when whole, else a float with at most 2 decimals."""
    if x.denominator == 1:
        return int(x)
    if (x * 100).denominator != 1:
        raise ValueError(f"answer {x} is not a whole number of cents")
    return float(x)


def _money(x: Fraction) -> str:
    return f"${_amount(x)}"


def _amount(x: Fraction) -> str:
    """A money amount as the question prints it, without the `$`: what an expression copies."""
    return str(int(x)) if x.denominator == 1 else f"{float(x):.2f}"


class Problem(NamedTuple):
    """One generated problem: its text, the exact answer, and an expression for the calculator
    tool whose value is that answer (up to float rounding)."""

    question: str
    answer: Fraction
    expression: str


def _price(rng: random.Random) -> Fraction:
    """A shelf price: whole dollars, or dollars and a quarter, half or three quarters."""
    return Fraction(rng.randint(1, 15)) + Fraction(rng.choice([0, 0, 25, 50, 75]), 100)


def shopping(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    (a1, a_many), (b1, b_many) = rng.sample(ITEMS, 2)
    qa, qb = rng.randint(2, 9), rng.randint(2, 9)
    pa, pb = _price(rng), _price(rng)
    total = qa * pa + qb * pb
    cost = f"{qa} * {_amount(pa)} + {qb} * {_amount(pb)}"
    buys = f"{name} buys {qa} {a_many} for {_money(pa)} each and {qb} {b_many} for {_money(pb)} each."
    bills = [b for b in (50, 100, 200) if b > total]
    if rng.random() < 0.5 and bills:
        bill = bills[0]
        question = f"{buys} {name} pays with a ${bill} bill. How much change does {name} get, in dollars?"
        return Problem(question, bill - total, f"{bill} - ({cost})")
    return Problem(f"{buys} How much does {name} spend in total, in dollars?", total, cost)


def rates(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    kind = rng.randrange(3)
    if kind == 0:  # distance = speed x time, with half hours
        speed, halves = rng.choice([40, 48, 55, 60, 64, 72, 80, 90]), rng.randint(2, 11)
        hours = Fraction(halves, 2)
        shown = str(int(hours)) if hours.denominator == 1 else f"{float(hours):.1f}"
        return Problem(
            f"A train travels at {speed} km per hour. How many km does it travel in {shown} hours?",
            speed * hours,
            f"{speed} * {shown}",
        )
    if kind == 1:  # time = amount / rate, drawn so it divides
        rate, minutes = rng.randint(6, 25), rng.randint(4, 30)
        pages = rate * minutes
        return Problem(
            f"A printer prints {rate} pages per minute. How many minutes does it take to print {pages} pages?",
            Fraction(minutes),
            f"{pages} / {rate}",
        )
    wage, hours_a_day, days = _price(rng) + 10, rng.randint(3, 8), rng.randint(3, 6)
    return Problem(
        f"{name} earns {_money(wage)} per hour and works {hours_a_day} hours a day for {days} days. "
        f"How much does {name} earn in total, in dollars?",
        wage * hours_a_day * days,
        f"{_amount(wage)} * {hours_a_day} * {days}",
    )


def percentages(rng: random.Random) -> Problem:
    kind = rng.randrange(3)
    if kind == 0:  # a discount; the price is a multiple of 4 so every 5% step is whole cents
        price, off = 4 * rng.randint(5, 50), 5 * rng.randint(1, 14)
        item = rng.choice(ITEMS)[0]
        article = "An" if item[0] in "aeiou" else "A"
        return Problem(
            f"{article} {item} costs ${price}. It is on sale for {off}% off. What is the sale price, in dollars?",
            price * (1 - Fraction(off, 100)),
            f"{price} * (1 - {off} / 100)",
        )
    if kind == 1:  # a share of a group, whole people
        total, pct = 20 * rng.randint(2, 30), 5 * rng.randint(1, 19)
        return Problem(
            f"A school has {total} students and {pct}% of them walk to school. How many students walk to school?",
            total * Fraction(pct, 100),
            f"{total} * {pct} / 100",
        )
    start, pct = 20 * rng.randint(5, 60), 5 * rng.randint(1, 10)
    return Problem(
        f"A town had {start} residents. Its population grew by {pct}% this year. How many residents does it have now?",
        start * (1 + Fraction(pct, 100)),
        f"{start} * (1 + {pct} / 100)",
    )


def sharing(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    kind = rng.randrange(3)
    if kind == 0:  # an equal share
        things, people = rng.choice(SHARED)
        k, each = rng.randint(3, 12), rng.randint(4, 25)
        return Problem(
            f"{name} has {k * each} {things} and shares them equally among {k} {people}. "
            f"How many {things} does each of the {people} get?",
            Fraction(each),
            f"{k * each} / {k}",
        )
    if kind == 1:  # what is left over
        things, people = rng.choice(SHARED)
        k, each = rng.randint(3, 12), rng.randint(4, 25)
        rest = rng.randint(1, k - 1)  # at least one left: "0 left over" is the share question again
        return Problem(
            f"{name} has {k * each + rest} {things} and gives the same number to each of {k} {people}, "
            f"as many as possible. How many {things} are left over?",
            Fraction(rest),
            f"{k * each + rest} % {k}",
        )
    things, boxes = rng.choice(PACKED)  # containers needed: a ceiling, the classic slip
    per, count = rng.choice([6, 8, 10, 12, 24]), rng.randint(20, 300)
    return Problem(
        f"{name} needs to pack {count} {things} into {boxes} that hold {per} each. "
        f"How many {boxes} does {name} need?",
        Fraction(math.ceil(count / per)),
        f"ceil({count} / {per})",
    )


def multi_step(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    kind = rng.randrange(3)
    if kind == 0:  # make, sell, give away a fraction of the rest
        trays, per = rng.randint(3, 12), rng.choice([12, 18, 24, 30])
        made = trays * per
        rest = 3 * rng.randint(1, made // 3 - 1)
        sold = made - rest
        return Problem(
            f"A baker makes {trays} trays of {per} cookies. She sells {sold} cookies and gives away a third of the "
            f"rest. How many cookies does she have left?",
            Fraction(rest) - Fraction(rest, 3),
            f"({trays} * {per} - {sold}) * 2 / 3",
        )
    if kind == 1:  # save, then spend
        start, weekly, weeks = rng.randint(10, 200), rng.randint(5, 40), rng.randint(2, 12)
        spend = rng.randint(1, start + weekly * weeks - 1)
        return Problem(
            f"{name} has ${start} and saves ${weekly} every week for {weeks} weeks, then spends ${spend} on a bike. "
            f"How many dollars does {name} have left?",
            Fraction(start + weekly * weeks - spend),
            f"{start} + {weekly} * {weeks} - {spend}",
        )
    per_day, days = rng.randint(8, 40), rng.randint(3, 14)
    pages = per_day * days + rng.randint(10, 200)
    return Problem(
        f"A book has {pages} pages. {name} reads {per_day} pages a day for {days} days. "
        f"How many pages are left to read?",
        Fraction(pages - per_day * days),
        f"{pages} - {per_day} * {days}",
    )


PROBLEMS: dict[str, Callable[[random.Random], Problem]] = {
    "shopping": shopping,
    "rates": rates,
    "percentages": percentages,
    "sharing": sharing,
    "multi_step": multi_step,
}


def _question_answer(make: Callable[[random.Random], Problem]) -> Callable[[random.Random], tuple[str, Fraction]]:
    def template(rng: random.Random) -> tuple[str, Fraction]:
        problem = make(rng)
        return problem.question, problem.answer

    return template


# The (question, answer) view of `PROBLEMS`, same kinds in the same order and the same draws:
# callers written before expressions existed unpack two values.
TEMPLATES: dict[str, Callable[[random.Random], tuple[str, Fraction]]] = {
    kind: _question_answer(make) for kind, make in PROBLEMS.items()
}


def iter_problems(seed: int = 0) -> Iterator[tuple[str, Problem]]:
    """(kind, problem) pairs without end, drawn as `make_dataset(n, seed)` draws its rows: each
    block of `len(PROBLEMS)` holds every kind once, in a shuffled order."""
    rng = random.Random(seed)
    while True:
        block = list(PROBLEMS.items())
        rng.shuffle(block)
        for kind, make in block:
            yield kind, make(rng)


def make_problems(n: int, seed: int = 0) -> list[tuple[str, Problem]]:
    """The first `n` (kind, problem) pairs of `iter_problems(seed)`: `make_dataset(n, seed)`'s
    rows with their kinds and expressions."""
    return list(islice(iter_problems(seed), n))


def as_row(problem: Problem) -> Row:
    """The dataset row of a problem: `{"question", "answer"}` (the answer as JSON carries it)."""
    return {"question": problem.question, "answer": _number(problem.answer)}


def make_dataset(n: int, seed: int = 0) -> list[Row]:
    """`n` rows `{"question", "answer"}`, the same for the same seed; each block of
    `len(TEMPLATES)` rows holds every kind of problem once, in a shuffled order."""
    return [as_row(problem) for _, problem in make_problems(n, seed)]


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    for row in make_dataset(count, seed):
        print(json.dumps(row))
