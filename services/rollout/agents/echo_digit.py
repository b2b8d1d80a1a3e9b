"""The demo's toy task: the user says one digit, the assistant must answer with that digit.

Single turn: prompt -> completion -> reward in [0, 1]. Chosen because a model trained from
random init learns it with GRPO in a few dozen optimizer steps on CPU, and it still depends
on the input (a policy that always answers the same digit scores at most 0.28):

- exact answer (the digit; surrounding whitespace ignored): 1.0
- otherwise partial credit, normalised by the longer of target and answer:
  0.8 x (characters in the right place) + 0.2 x (characters that are digits).
  The digit credit is what gives a random-init model (reward ~0.01-0.05) groups with reward
  variance from the first step; the positional credit is what makes the answer depend on
  the input.

`make_dataset(n, seed)` is balanced: every consecutive block of 10 rows holds each digit
once, so a training batch of 10 groups sees every input once. Unbalanced batches let the
policy collapse onto a few digits before it learns to read the input.

The agent asks for a single token (`MAX_TOKENS`): measured, a random-init model given two
tokens learns "answer with digits" but not to emit the stop token within 70 steps, and
plateaus at 0.24.
"""

from __future__ import annotations

import random
import string

from services.rollout.context import AgentContext
from services.rollout.registry import agent

NAME = "echo-digit"
MAX_TOKENS = 1  # one token: the answer. With 2, a from-scratch policy never learns to stop in time
DIGIT_CREDIT = 0.2


def digit_reward(target: str, completion: str) -> float:
    """1.0 for exactly `target`; else 0.8 x positional match + 0.2 x digit characters, both
    over max(len(target), len(answer)); surrounding whitespace is ignored."""
    text = completion.strip()
    if text == target:
        return 1.0
    if not text:
        return 0.0
    denom = max(len(target), len(text))
    in_place = sum(1 for a, b in zip(target, text) if a == b) / denom
    digits = sum(1 for c in text if c in string.digits) / denom
    return (1.0 - DIGIT_CREDIT) * in_place + DIGIT_CREDIT * digits


def make_dataset(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` rows `{"digit": "0".."9"}`, deterministic for `seed`; each block of 10 is a shuffled 0-9."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        block = list(string.digits)
        rng.shuffle(block)
        rows.extend({"digit": d} for d in block)
    return rows[:n]


def prompt_messages(digit: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": digit}]


@agent(NAME, description="toy task: answer with the digit the user sent; reward 1.0 exact, partial credit otherwise")
async def echo_digit_agent(ctx: AgentContext) -> float:
    target = str(ctx.input["digit"])
    reply = await ctx.chat(prompt_messages(target), max_tokens=MAX_TOKENS)
    return digit_reward(target, reply.text)
