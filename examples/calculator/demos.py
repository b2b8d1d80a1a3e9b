"""SFT warm-start data for the calculator agent: imperfect demonstrations and a held-out split.

A demonstration is the conversation the agent (`agent.py`) has with the model on one problem,
in OpenAI chat format, `{"messages": [...], "tools": [CALCULATOR_TOOL], "meta": {...}}`:

- tool use: `first_messages(question)`, an assistant turn calling `calculator` once with an
  expression, the tool's real result (`calc.calculator`), then `"Answer: <number>"` with the
  number the tool printed (at most 2 decimals);
- head math: `first_messages(question)`, then `"Answer: <number>"` at once, with a number a
  person computing in their head might give (a slip: a digit off, two digits swapped, a step
  left out, a rounding), never the right one.

`meta` (ignored by the SFT trainer) says what a row is: `kind` (a `data.PROBLEMS` key),
`answer` (the gold number), `tool` (whether it calls the tool) and `correct` (whether its final
answer earns reward 1).

Real demonstration data is imperfect, and SFT data that was perfect would leave RL nothing to
learn, so `DemoMix` sets how imperfect: per kind, the probability that a demonstration uses the
tool (the rest do head math, always wrong), and the fraction of tool demonstrations whose
expression is itself mistaken (an operator swapped, a term or a rounding-up left out), which
then answer with the tool's wrong result. A model that imitated the default mix perfectly would
answer `expected_accuracy(DemoMix())` = (2 x 0.75 + 3 x 0.2) x 0.9 / 5 = 37.8% of problems
right: it would call the tool on most shopping and rates problems and rarely elsewhere. Reward
1 for the right number then pays exactly for using the tool, on every kind, with the right
expression: the ~60 points RL can still win.

`eval_rows(n)` is a held-out split for evaluating the agent: rows `{"question", "answer"}`
from their own seed (`EVAL_SEED`), whose questions never appear in any demonstration (whatever
its seed: a fixed 1-in-`HELD_OUT_BUCKETS` share of all questions, chosen by hash, is reserved
for evaluation) nor in the RL rows (`rows.jsonl`).

    python -m examples.calculator.demos demos --n 2000 --seed 1 > demos.jsonl
    python -m examples.calculator.demos eval --n 200 > eval.jsonl
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from examples.calculator.agent import CALCULATOR_TOOL, first_messages
from examples.calculator.calc import calculator
from examples.calculator.data import PROBLEMS, Problem, as_row, iter_problems
from examples.calculator.reward import answer_reward
from examples.splits_cli import write_split

Row = dict[str, Any]

EVAL_SEED = 7919  # neither 0 (rows.jsonl) nor a small seed a demonstration run would pick
HELD_OUT_BUCKETS = 10  # one question in this many is reserved for evaluation
RL_ROWS = Path(__file__).with_name("rows.jsonl")
CALL_ID = "call_0"


def _default_tool_use() -> dict[str, float]:
    return {"shopping": 0.75, "rates": 0.75, "percentages": 0.2, "sharing": 0.2, "multi_step": 0.2}


@dataclass(frozen=True)
class DemoMix:
    """How imperfect the demonstrations are.

    `tool_use[kind]`: the probability that a demonstration of that kind calls the calculator;
    the others answer from head math, always wrongly. Shopping and rates problems multiply
    prices and decimal hours, where a demonstrator reaches for the tool; percentages, sharing
    and multi-step problems look easy enough to do in one's head, and go wrong. Imitation thus
    learns tool use on two kinds and mostly skips it on three, and RL can learn to use the tool
    everywhere.

    `wrong_expression`: the fraction of tool demonstrations whose expression is mistaken; they
    answer with what the tool returned for it, so their answer is wrong too.
    """

    tool_use: dict[str, float] = field(default_factory=_default_tool_use)
    wrong_expression: float = 0.1

    def __post_init__(self) -> None:
        if set(self.tool_use) != set(PROBLEMS):
            raise ValueError(f"tool_use needs one probability per kind {sorted(PROBLEMS)}, got {sorted(self.tool_use)}")
        for name, p in [*self.tool_use.items(), ("wrong_expression", self.wrong_expression)]:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}: a probability must be within [0, 1], got {p}")


def expected_accuracy(mix: DemoMix) -> float:
    """The share of problems a perfect imitator of `mix` answers right (kinds are equally
    frequent): only tool demonstrations with a right expression are right."""
    return sum(p * (1.0 - mix.wrong_expression) for p in mix.tool_use.values()) / len(mix.tool_use)


# --- held out ---------------------------------------------------------------------------


def reserved(question: str) -> bool:
    """Whether `question` belongs to the evaluation share: a property of the text alone, so
    demonstrations of any seed avoid exactly the questions any evaluation split may hold."""
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


@functools.cache
def rl_questions() -> frozenset[str]:
    """The questions of the RL rows (`rows.jsonl`)."""
    return frozenset(json.loads(line)["question"] for line in RL_ROWS.read_text().splitlines() if line.strip())


def eval_rows(n: int, seed: int = EVAL_SEED) -> list[Row]:
    """`n` held-out agent inputs `{"question", "answer"}`, deterministic for `seed`: reserved
    questions, none twice, none among the RL rows. Each block of `len(PROBLEMS)` rows holds
    every kind once, in `PROBLEMS` order, so a small split still covers every kind."""
    taken = set(rl_questions())
    pending: dict[str, deque[Problem]] = {kind: deque() for kind in PROBLEMS}
    rows: list[Row] = []
    for kind, problem in iter_problems(seed):
        if len(rows) >= n:
            break
        if problem.question in taken or not reserved(problem.question):
            continue
        taken.add(problem.question)
        pending[kind].append(problem)
        if all(pending.values()):
            rows += [as_row(pending[k].popleft()) for k in PROBLEMS]
    return rows[:n]


# --- mistakes ---------------------------------------------------------------------------

# Operators people confuse: a sum for a difference, a quotient for a product, the quotient of a
# division for its remainder. ("*" becomes "+": "3 boxes of 4" read as "3 and 4".)
_SWAPS: dict[type[ast.operator], tuple[str, str]] = {
    ast.Add: ("+", "-"),
    ast.Sub: ("-", "+"),
    ast.Mult: ("*", "+"),
    ast.Div: ("/", "*"),
    ast.Mod: ("%", "//"),
    ast.FloorDiv: ("//", "%"),
}


def _extent(source: str, node: ast.expr) -> tuple[int, int]:
    """`node`'s span in `source`, with the parentheses written around it (not a call's)."""
    start, end = node.col_offset, node.end_col_offset or node.col_offset
    while (
        start > 0
        and end < len(source)
        and source[start - 1] == "("
        and source[end] == ")"
        and not (start > 1 and (source[start - 2].isalnum() or source[start - 2] == "_"))
    ):
        start, end = start - 1, end + 1
    return start, end


def _edits(expression: str, swaps: bool) -> list[str]:
    """Expressions one plausible mistake away from `expression`: a step left out (an operation
    replaced by one of its operands, a rounding call by its argument) and, with `swaps`, an
    operator mistaken for another."""
    tree = ast.parse(expression, mode="eval")
    out: list[str] = []
    for node in ast.walk(tree.body):
        if not isinstance(node, (ast.BinOp, ast.Call)):
            continue
        start, end = node.col_offset, node.end_col_offset or node.col_offset
        if isinstance(node, ast.BinOp):
            for operand in (node.left, node.right):
                a, b = _extent(expression, operand)
                out.append(expression[:start] + expression[a:b] + expression[end:])
            if swaps and type(node.op) in _SWAPS:
                old, new = _SWAPS[type(node.op)]
                gap_start, gap_end = node.left.end_col_offset or start, node.right.col_offset
                gap = expression[gap_start:gap_end]
                # The operator sits in the gap between the operands (with any closing/opening
                # parentheses); replace it there only.
                if old in gap:
                    out.append(expression[:gap_start] + gap.replace(old, new, 1) + expression[gap_end:])
        elif len(node.args) == 1:
            a, b = _extent(expression, node.args[0])
            inner = expression[a:b]
            out.append(expression[:start] + (inner if node is tree.body else f"({inner})") + expression[end:])
    return list(dict.fromkeys(e for e in out if e != expression))


def plain(value: float) -> str:
    """A number as a final answer writes it: whole numbers without ".0", else at most 2 decimals."""
    rounded = round(value, 2)
    if rounded == int(rounded):
        return str(int(rounded))
    return f"{rounded:.2f}".rstrip("0")


def _wrong(text: str, gold: float) -> bool:
    return answer_reward(f"Answer: {text}", gold) == 0.0


def mistaken_expression(problem: Problem, rng: random.Random) -> tuple[str, str]:
    """(a wrong expression for `problem`, the calculator's result for it): one that runs, gives
    a non-negative number, and whose answer is not the right one."""
    gold = float(problem.answer)
    options = []
    for expression in _edits(problem.expression, swaps=True):
        result = calculator(expression)
        if not result.startswith("error") and float(result) >= 0 and _wrong(plain(float(result)), gold):
            options.append((expression, result))
    if not options:
        raise ValueError(f"no plausible mistake in {problem.expression!r} gives a wrong answer")
    return rng.choice(options)


def _digit_slips(text: str) -> list[str]:
    """`text` (a number) with one digit one off, or two neighbouring digits swapped."""
    out = []
    for i, char in enumerate(text):
        if not char.isdigit():
            continue
        for d in (int(char) - 1, int(char) + 1):
            if 0 <= d <= 9 and not (i == 0 and d == 0 and len(text) > 1):
                out.append(text[:i] + str(d) + text[i + 1 :])
        if i + 1 < len(text) and text[i + 1].isdigit() and text[i + 1] != char and not (i == 0 and text[1] == "0"):
            out.append(text[:i] + text[i + 1] + char + text[i + 2 :])
    return out


def head_math_slip(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong answer to `problem`, as someone doing it in their head might give: a
    digit off or two digits swapped, a step left out, or the answer rounded. Never the right
    one. A slip on a whole-number question stays a whole number."""
    gold = float(problem.answer)
    whole = problem.answer.denominator == 1
    skipped = []
    for expression in _edits(problem.expression, swaps=False):
        result = calculator(expression)
        if not result.startswith("error"):
            value = float(result)
            skipped.append(plain(math.floor(value) if whole else value))
    rounded = [plain(round(gold / 10) * 10), plain(math.floor(gold))] if gold >= 20 else [plain(math.floor(gold))]
    slips = {"digit": _digit_slips(plain(gold)), "step": skipped, "rounding": rounded}
    kinds = {
        kind: options
        for kind, candidates in slips.items()
        if (options := sorted({s for s in candidates if float(s) >= 0 and _wrong(s, gold)}))
    }
    if not kinds:  # no number here is a plausible slip that is also wrong; one off always is
        return plain(gold + 1)
    kind = rng.choice(sorted(kinds))
    return rng.choice(kinds[kind])


# --- demonstrations ---------------------------------------------------------------------


def tool_demonstration(question: str, expression: str) -> list[dict[str, Any]]:
    """The agent's conversation when the model calls the calculator once on `expression` and
    answers with the number the tool printed."""
    result = calculator(expression)
    call = {"id": CALL_ID, "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}  # fmt: skip
    return [
        *first_messages(question),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": CALL_ID, "content": result},
        {"role": "assistant", "content": f"Answer: {plain(float(result))}"},
    ]


def direct_demonstration(question: str, answer: str) -> list[dict[str, Any]]:
    """The agent's conversation when the model answers without the tool."""
    return [*first_messages(question), {"role": "assistant", "content": f"Answer: {answer}"}]


def demonstration(kind: str, problem: Problem, rng: random.Random, mix: DemoMix) -> Row:
    """One demonstration row of `problem` (see the module docstring), its imperfection drawn
    with `rng` according to `mix`."""
    gold = as_row(problem)["answer"]
    uses_tool = rng.random() < mix.tool_use[kind]
    if uses_tool:
        expression = problem.expression
        if rng.random() < mix.wrong_expression:
            expression, _ = mistaken_expression(problem, rng)
        messages = tool_demonstration(problem.question, expression)
    else:
        messages = direct_demonstration(problem.question, head_math_slip(problem, rng))
    correct = answer_reward(messages[-1]["content"], float(gold)) == 1.0
    meta = {"kind": kind, "answer": gold, "tool": uses_tool, "correct": correct}
    return {"messages": messages, "tools": [CALCULATOR_TOOL], "meta": meta}


def _training_problems(seed: int) -> Iterator[tuple[str, Problem]]:
    """`iter_problems(seed)` without the questions reserved for evaluation."""
    return ((kind, p) for kind, p in iter_problems(seed) if not reserved(p.question))


def demonstrations(n: int, seed: int, mix: DemoMix = DemoMix()) -> list[Row]:
    """`n` demonstration conversations, deterministic for (`seed`, `mix`); a smaller `n` gives
    a prefix of a larger one. Problems come from `iter_problems(seed)`, minus those reserved
    for evaluation; the imperfections from a random stream of their own."""
    rng = random.Random(f"calculator-demos:{seed}")
    rows: list[Row] = []
    for kind, problem in _training_problems(seed):
        if len(rows) >= n:
            break
        rows.append(demonstration(kind, problem, rng, mix))
    return rows


def main(argv: list[str] | None = None) -> None:
    write_split(argv, "write calculator SFT demonstrations or the held-out split as JSONL", demonstrations, eval_rows, EVAL_SEED, 200)

if __name__ == "__main__":
    main()
