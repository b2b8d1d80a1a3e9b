"""Customer-service tasks generated from the shop of a seed.

A row is one conversation to resolve:

    {"customer_id": "C0042", "opening": "Hi, this is Ana Park. Where is my order A10482?",
     "intent": "order_status" | "refund" | "return_label", "order_id": "A10482",
     "expected": {...}, "shop_seed": 0}

`expected` is what resolves it, computed with the same policy functions the tools use:

- order_status: `{"status": "shipped", "status_date": "2024-05-28",
  "status_text": "order A10482 shipped on 2024-05-28"}` (`status_date` is null for a cancelled order)
- refund: `{"refund": "12.34", "refund_cents": 1234, "percent": 100 | 50}` for an eligible order;
- return_label: `{"label_id": "RL-1A2B3C4D"}` for a returnable order;
- a request the policy refuses: `{"refusal": true, "reason": "..."}` (not delivered yet, outside
  the window, nothing returnable).

`make_dataset(n, seed)` is deterministic and balanced: each block of 3 rows holds one task of
every intent, and within an intent the cases (full / half / refused refund; eligible / refused
label; each status) are drawn with fixed weights, so refusals are common enough to be learned
and never so common that "always refuse" pays. About half of the openings leave the order id
out: the agent has to ask for it (the customer simulator answers).

    python -m examples.customer_service.data 300 0 > examples/customer_service/rows.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any, Callable

from examples.customer_service.shop import (
    PolicyRefusal,
    REFUND_FULL_DAYS,
    REFUND_HALF_DAYS,
    RETURN_DAYS,
    Order,
    Shop,
    build_shop,
    days_since_delivery,
    money,
    refund_quote,
    return_label,
)

INTENTS = ("order_status", "refund", "return_label")

OPENINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # intent -> (phrasings naming the order, phrasings that leave it out)
    "order_status": (
        ("Hi, this is {name}. Where is my order {oid}?", "Hello, can you tell me the status of order {oid}?",
         "Hi there, what is happening with my order {oid}?"),
        ("Hi, this is {name}. Where is my order?", "Hello, can you tell me the status of my recent order?"),
    ),
    "refund": (
        ("Hi, this is {name}. I want a refund for order {oid}.", "Hello, how much would I get back for order {oid}?",
         "I'd like my money back for order {oid}, please."),
        ("Hi, this is {name}. I want a refund for my order.", "Hello, I'd like my money back for something I bought."),
    ),
    "return_label": (
        ("Hi, this is {name}. I need a return label for order {oid}.", "Hello, can I send back order {oid}?",
         "Please send me a return label for order {oid}."),
        ("Hi, this is {name}. I need a return label.", "Hello, I'd like to send back my order. Can I get a label?"),
    ),
}  # fmt: skip

# intent -> [(case, weight)]; a case is a predicate on orders (`_CASES`) and picks the pool.
CASE_WEIGHTS: dict[str, list[tuple[str, float]]] = {
    "order_status": [("processing", 0.2), ("shipped", 0.3), ("delivered", 0.3), ("cancelled", 0.2)],
    "refund": [("refund_full", 0.3), ("refund_half", 0.3), ("refund_too_late", 0.2), ("not_delivered", 0.2)],
    "return_label": [("label_ok", 0.55), ("label_too_late", 0.15), ("label_nothing_returnable", 0.15),
                     ("not_delivered", 0.15)],
}  # fmt: skip


def _age(o: Order) -> int:
    d = days_since_delivery(o)
    return -1 if d is None else d


_CASES: dict[str, Callable[[Order], bool]] = {
    "processing": lambda o: o.status == "processing",
    "shipped": lambda o: o.status == "shipped",
    "delivered": lambda o: o.status == "delivered",
    "cancelled": lambda o: o.status == "cancelled",
    "not_delivered": lambda o: o.status != "delivered",
    "refund_full": lambda o: o.status == "delivered" and _age(o) <= REFUND_FULL_DAYS,
    "refund_half": lambda o: o.status == "delivered" and REFUND_FULL_DAYS < _age(o) <= REFUND_HALF_DAYS,
    "refund_too_late": lambda o: o.status == "delivered" and _age(o) > REFUND_HALF_DAYS,
    "label_ok": lambda o: o.status == "delivered" and _age(o) <= RETURN_DAYS and any(i.returnable for i in o.items),
    "label_too_late": lambda o: o.status == "delivered" and _age(o) > RETURN_DAYS,
    "label_nothing_returnable": lambda o: o.status == "delivered" and _age(o) <= RETURN_DAYS
    and not any(i.returnable for i in o.items),
}


def status_date(order: Order) -> str | None:
    """The date that goes with the status: delivered / shipped on, ordered on (processing); none when cancelled."""
    day = {"delivered": order.delivery_date, "shipped": order.ship_date, "processing": order.order_date}.get(order.status)
    return None if day is None else day.isoformat()


def status_text(order: Order) -> str:
    if order.status == "delivered" and order.delivery_date is not None:
        return f"order {order.order_id} delivered on {order.delivery_date.isoformat()}"
    if order.status == "shipped" and order.ship_date is not None:
        return f"order {order.order_id} shipped on {order.ship_date.isoformat()}"
    if order.status == "processing":
        return f"order {order.order_id} placed on {order.order_date.isoformat()} is still processing"
    return f"order {order.order_id} was cancelled"


def expected_for(intent: str, order: Order, shop_seed: int) -> dict[str, Any]:
    """What resolves `intent` for `order`: the same policy functions the tools call."""
    if intent == "order_status":
        return {"status": order.status, "status_date": status_date(order), "status_text": status_text(order)}
    try:
        if intent == "refund":
            quote = refund_quote(order)
            return {"refund": money(quote.refund_cents), "refund_cents": quote.refund_cents, "percent": quote.percent}
        if intent == "return_label":
            label, _ = return_label(order, shop_seed)
            return {"label_id": label}
    except PolicyRefusal as exc:
        return {"refusal": True, "reason": str(exc)}
    raise ValueError(f"unknown intent {intent!r}")


def _pick_case(rng: random.Random, intent: str, pools: dict[str, list[Order]]) -> str:
    cases = [(c, w) for c, w in CASE_WEIGHTS[intent] if pools[c]]  # a case with no order is skipped
    return rng.choices([c for c, _ in cases], weights=[w for _, w in cases])[0]


def make_task(rng: random.Random, shop: Shop, intent: str, pools: dict[str, list[Order]]) -> dict[str, Any]:
    order = rng.choice(pools[_pick_case(rng, intent, pools)])
    customer = shop.customer(order.customer_id)
    with_id, without_id = OPENINGS[intent]
    template = rng.choice(with_id if rng.random() < 0.5 else without_id)
    return {
        "customer_id": customer.customer_id,
        "opening": template.format(name=customer.name, oid=order.order_id),
        "intent": intent,
        "order_id": order.order_id,
        "expected": expected_for(intent, order, shop.seed),
        "shop_seed": shop.seed,
    }


def make_dataset(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` tasks on the shop of `seed`; each block of 3 holds every intent once (shuffled)."""
    shop = build_shop(seed)
    pools = {case: [o for o in shop.orders if pred(o)] for case, pred in _CASES.items()}
    rng = random.Random(f"customer-service-tasks-{seed}")  # not the shop's stream: tasks can change alone
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        block = list(INTENTS)
        rng.shuffle(block)
        rows.extend(make_task(rng, shop, intent, pools) for intent in block)
    return rows[:n]


def main(argv: list[str]) -> None:
    n = int(argv[1]) if len(argv) > 1 else 300
    seed = int(argv[2]) if len(argv) > 2 else 0
    for row in make_dataset(n, seed):
        sys.stdout.write(json.dumps(row, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv)
