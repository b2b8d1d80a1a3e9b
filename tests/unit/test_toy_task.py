"""The demo's toy task (echo-digit): reward function and dataset generator."""

from __future__ import annotations

import random
import string
from collections import Counter

import pytest

from services.rollout import registry
from services.rollout.agents import echo_digit
from services.rollout.agents.echo_digit import digit_reward, make_dataset


def test_exact_answer_scores_one() -> None:
    for d in string.digits:
        assert digit_reward(d, d) == 1.0
        assert digit_reward(d, f" {d}\n") == 1.0  # surrounding whitespace is ignored


@pytest.mark.parametrize(
    ("target", "answer", "expected"),
    [
        ("7", "", 0.0),
        ("7", "   ", 0.0),
        ("7", "x", 0.0),  # wrong, not a digit
        ("7", "3", 0.2),  # a digit, the wrong one
        ("7", "7x", 0.8 * 0.5 + 0.2 * 0.5),  # right digit, then junk
        ("7", "77", 0.8 * 0.5 + 0.2 * 1.0),  # right digit twice
        ("7", "37", 0.2),  # digits, nothing in place
        ("7", "hello", 0.0),
    ],
)
def test_partial_credit(target: str, answer: str, expected: float) -> None:
    assert digit_reward(target, answer) == pytest.approx(expected)


def test_reward_in_unit_interval_and_only_exact_is_one() -> None:
    rng = random.Random(0)
    alphabet = string.digits + string.ascii_letters + " \n.,"
    for _ in range(2000):
        target = rng.choice(string.digits)
        answer = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        r = digit_reward(target, answer)
        assert 0.0 <= r <= 1.0
        assert (r == 1.0) == (answer.strip() == target)


def test_chance_level_is_low() -> None:
    """Random printable text (what an untrained model emits) scores far below 0.15 on average."""
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(32, 127)]
    scores = [
        digit_reward(rng.choice(string.digits), "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))))
        for _ in range(5000)
    ]
    assert sum(scores) / len(scores) < 0.05


def test_constant_answer_cannot_reach_the_demo_bar() -> None:
    """A policy that ignores the input scores at most 0.28 on a balanced dataset."""
    rows = make_dataset(100, seed=0)
    for d in string.digits:
        mean = sum(digit_reward(row["digit"], d) for row in rows) / len(rows)
        assert mean == pytest.approx(0.2 + 0.8 * 0.1)


def test_dataset_is_deterministic_for_a_seed() -> None:
    assert make_dataset(37, seed=5) == make_dataset(37, seed=5)
    assert make_dataset(37, seed=5) != make_dataset(37, seed=6)
    assert make_dataset(10, seed=5) == make_dataset(37, seed=5)[:10]


def test_dataset_rows_and_balance() -> None:
    rows = make_dataset(95, seed=3)
    assert len(rows) == 95
    assert all(set(row) == {"digit"} and row["digit"] in string.digits for row in rows)
    for start in range(0, 90, 10):  # every full block of 10 holds each digit once
        assert Counter(row["digit"] for row in rows[start : start + 10]) == Counter(string.digits)
    assert make_dataset(0, seed=3) == []


def test_agent_is_registered() -> None:
    entry = registry.get(echo_digit.NAME)
    assert entry is not None and entry.fn is echo_digit.echo_digit_agent
