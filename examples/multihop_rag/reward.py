"""The reward: 0.1 x format + 0.9 x word-level F1 of the predicted answer against the gold one.

- format: 1 when the whole reply is one line `Answer: <text>` (prefix in any case, text not
  empty), else 0.
- F1: SQuAD's answer F1. Both sides are normalised (lowercase, punctuation removed, the
  articles a/an/the removed, whitespace collapsed), split into words, and
  F1 = 2PR / (P + R) with P and R the shared word count over the predicted and gold lengths.
  The predicted answer is the text after the first `Answer:` on its line, or the whole reply
  when there is none: a right answer in the wrong shape still earns most of the reward, and
  the format term is what teaches the shape.

Partial credit matters here: a person's name is two words, so a reply with the right family
name but the wrong first name scores F1 0.5 instead of nothing.
"""

from __future__ import annotations

import re
import string
from collections import Counter

FORMAT_WEIGHT = 0.1
F1_WEIGHT = 0.9
ANSWER_PREFIX = "Answer:"

_ONE_LINE_ANSWER = re.compile(r"answer\s*:[ \t]*\S[^\n]*", re.IGNORECASE)
_ANSWER_AFTER = re.compile(r"answer\s*:[ \t]*([^\n]*)", re.IGNORECASE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def format_ok(reply: str) -> bool:
    """The reply is exactly one line `Answer: <non-empty text>` (surrounding whitespace ignored)."""
    return _ONE_LINE_ANSWER.fullmatch(reply.strip()) is not None


def extract_answer(reply: str) -> str:
    """The text after the first `Answer:` (to the end of its line), else the whole reply."""
    match = _ANSWER_AFTER.search(reply)
    return (match.group(1) if match else reply).strip()


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_reward(reply: str, gold: str) -> float:
    """0.1 x format_ok(reply) + 0.9 x F1(extract_answer(reply), gold); in [0, 1]."""
    return FORMAT_WEIGHT * float(format_ok(reply)) + F1_WEIGHT * f1_score(extract_answer(reply), gold)
