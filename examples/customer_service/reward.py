"""The composite reward: completion 0.5 + quality 0.3 + efficiency 0.2, each in [0, 1].

Pure functions of the task and what happened (the agent's text replies, the tool outcomes,
the call at which the task was resolved), so they are unit-tested with hand-computed values.

Completion (1 or 0): the task's resolution was reached during the conversation, judged at
the moment it happens (`reply_resolves` for a text reply, `tool_resolves` for a tool result):

- order_status: a reply names the expected status word ("shipped"); when it names other status
  words too ("processing", "shipped", "delivered", "cancelled"/"canceled"), it must also give the
  status date (`expected.status_date`, ISO, e.g. "shipped on 2024-05-28, delivered soon"). So
  "shipped or delivered" earns nothing without having looked the order up;
- refund (eligible): `calculate_refund` on the task's order returned exactly the expected
  amount, or a reply states it: it has at least one `$` amount and every `$` amount in it
  equals the expected one (to the cent);
- return_label (eligible): `create_return_label` succeeded for the task's order;
- refusal (the policy says no): a reply refuses (`REFUSAL` phrases: "not eligible", "unable",
  "cannot", "can't", "unfortunately", ...) after the agent checked the order with a tool (a
  successful lookup of the task's order, or a tool answering "not eligible" for it). An
  unchecked refusal earns nothing, so "always refuse" is not a policy that pays.

Quality (0, 1/3, 2/3 or 1), on the agent's final text reply (its last message without tool
calls; none: 0): 0 when it holds no letter or digit; otherwise 1/3 for not being empty, +1/3
when it names the task's order id (case-insensitive), +1/3 when it is polite: it contains one
of `POLITE_WORDS` as a whole word (case-insensitive).

Efficiency: 0 when unresolved; 1.0 when resolved within `FAST_CALLS` (2) agent calls, then
linearly down to 0 at `max_turns` calls: (max_turns - calls) / (max_turns - FAST_CALLS).
With max_turns <= FAST_CALLS every resolved conversation scores 1.0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from examples.customer_service.shop import ToolOutcome

W_COMPLETION, W_QUALITY, W_EFFICIENCY = 0.5, 0.3, 0.2
FAST_CALLS = 2
STATUS_WORDS = {"processing": "processing", "shipped": "shipped", "delivered": "delivered",
                "cancelled": "cancelled", "canceled": "cancelled"}  # fmt: skip
POLITE_WORDS = ("hello", "hi", "thanks", "thank", "please", "sorry", "welcome", "glad", "happy", "apologize",
                "apologise", "apologies")  # fmt: skip
REFUSAL = re.compile(
    r"\b(not eligible|ineligible|unable|cannot|can[’']?t|can not|unfortunately|not possible|won[’']?t be able"
    r"|not able|no refund|not refundable|non-returnable|not returnable)\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"[a-z']+")
_DOLLARS = re.compile(r"\$\s*(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d{1,2}))?(?!\d)")


@dataclass(frozen=True)
class Task:
    """The parts of a dataset row the reward needs."""

    intent: str
    order_id: str
    expected: dict[str, Any]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Task:
        return cls(str(row["intent"]), str(row["order_id"]).upper(), dict(row["expected"]))

    @property
    def refusal(self) -> bool:
        return bool(self.expected.get("refusal"))


def status_words(text: str) -> set[str]:
    """The order statuses `text` names (normalised: "canceled" -> "cancelled")."""
    return {STATUS_WORDS[w] for w in _WORD.findall(text.lower()) if w in STATUS_WORDS}


def dollar_amounts(text: str) -> list[int]:
    """Every `$` amount in `text`, in cents: "$1,234.5" -> 123450, "$12" -> 1200."""
    out = []
    for whole, frac in _DOLLARS.findall(text):
        cents = int(whole.replace(",", "")) * 100
        if frac:
            cents += int(frac.ljust(2, "0"))
        out.append(cents)
    return out


def is_refusal(text: str) -> bool:
    return REFUSAL.search(text) is not None


def checked_order(task: Task, outcomes: Sequence[ToolOutcome]) -> bool:
    """The agent looked at the task's order: a successful tool call on it, or a "not eligible" answer."""
    return any(o.order_id == task.order_id and (o.ok or o.kind == "not_eligible") for o in outcomes)


def reply_resolves(task: Task, reply: str, outcomes_before: Sequence[ToolOutcome]) -> bool:
    """Does this text reply (with the tool outcomes seen before it) resolve the task?"""
    if task.refusal:
        return is_refusal(reply) and checked_order(task, outcomes_before)
    if task.intent == "order_status":
        named = status_words(reply)
        if task.expected["status"] not in named:
            return False
        date = task.expected.get("status_date")
        return len(named) == 1 or (date is not None and str(date) in reply)
    if task.intent == "refund":
        amounts = dollar_amounts(reply)
        return bool(amounts) and all(a == int(task.expected["refund_cents"]) for a in amounts)
    return False  # a label is issued by the tool, never by words


def tool_resolves(task: Task, outcome: ToolOutcome) -> bool:
    """Does this tool result resolve the task (a refund computed / a label created for its order)?"""
    if task.refusal or not outcome.ok or outcome.order_id != task.order_id:
        return False
    if task.intent == "refund":
        return outcome.tool == "calculate_refund" and outcome.refund_cents == int(task.expected["refund_cents"])
    if task.intent == "return_label":
        return outcome.tool == "create_return_label" and outcome.label_id == task.expected["label_id"]
    return False


def completion_score(resolved_at: int | None) -> float:
    return 0.0 if resolved_at is None else 1.0


def quality_score(final_reply: str | None, order_id: str) -> float:
    if final_reply is None or not any(c.isalnum() for c in final_reply):
        return 0.0
    words = set(_WORD.findall(final_reply.lower()))
    mentions_order = order_id.lower() in final_reply.lower()
    polite = any(w in words for w in POLITE_WORDS)
    return (1 + int(mentions_order) + int(polite)) / 3


def efficiency_score(resolved_at: int | None, max_turns: int) -> float:
    """`resolved_at`: how many agent calls had been made when the task was resolved."""
    if resolved_at is None:
        return 0.0
    if resolved_at <= FAST_CALLS:
        return 1.0
    if max_turns <= FAST_CALLS:
        return 1.0 if resolved_at <= max_turns else 0.0
    return min(1.0, max(0.0, (max_turns - resolved_at) / (max_turns - FAST_CALLS)))


@dataclass(frozen=True)
class RewardParts:
    completion: float
    quality: float
    efficiency: float

    @property
    def total(self) -> float:
        return W_COMPLETION * self.completion + W_QUALITY * self.quality + W_EFFICIENCY * self.efficiency


def score(resolved_at: int | None, final_reply: str | None, order_id: str, max_turns: int) -> RewardParts:
    return RewardParts(
        completion_score(resolved_at), quality_score(final_reply, order_id), efficiency_score(resolved_at, max_turns)
    )
