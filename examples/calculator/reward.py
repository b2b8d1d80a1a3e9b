"""Reading a number out of the model's final answer, and the exact-match reward.

The agent's final message is free text. `extract_answer` takes, in this order of trust:
the last `\\boxed{...}`, else the text after the last "answer:" / "answer is", else the
whole text, and returns the last number in it. Numbers may carry a sign, thousands commas
(`1,234.50`), a `$` in front or a `%` behind, or be a plain fraction (`3/4`).

`answer_reward` is 1.0 when that number is within `TOLERANCE` (absolute) of the gold answer,
else 0.0 (no number at all is 0.0). Gold answers are whole numbers or whole cents, so 0.01
accepts a correctly rounded money answer and nothing else.
"""

from __future__ import annotations

import math
import re

TOLERANCE = 0.01

_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_ANSWER = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)
# A fraction first (so "3/4" is not read as 3 then 4), then a number with thousands commas,
# then a plain one. The lookbehind keeps "v2" or "x3" from counting as numbers.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-+−]?)\s?\$?\s?"
    r"(?:(?P<num>\d+)/(?P<den>\d+)|(?P<value>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+))"
)


def _numbers(text: str) -> list[float]:
    out = []
    for m in _NUMBER.finditer(text):
        if m.group("den") is not None:
            den = int(m.group("den"))
            if den == 0:
                continue
            value = int(m.group("num")) / den
        else:
            value = float(m.group("value").replace(",", ""))
        out.append(-value if m.group("sign") in ("-", "−") else value)
    return [v for v in out if math.isfinite(v)]


def extract_answer(text: str) -> float | None:
    """The number `text` gives as its answer (see the module docstring), or None."""
    boxed = _BOXED.findall(text)
    if boxed:
        found = _numbers(boxed[-1])
        if found:
            return found[-1]
    marks = list(_ANSWER.finditer(text))
    if marks:
        found = _numbers(text[marks[-1].end() :])
        if found:
            return found[0]  # "Answer: 42 (after 3 steps)" means 42
    found = _numbers(text)
    return found[-1] if found else None


def answer_reward(text: str, gold: float) -> float:
    """1.0 when the answer in `text` is within TOLERANCE of `gold`, else 0.0."""
    value = extract_answer(text)
    if value is None:
        return 0.0
    return 1.0 if abs(value - float(gold)) <= TOLERANCE + 1e-9 else 0.0
