"""The customer-service example: shop database and policy, tools, dataset, reward, the
conversation step logic (no model), the agent loop with a scripted client, and one run end to
end through the real services with the tiny model."""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from examples.customer_service import data
from examples.customer_service.agent import (
    COMPACT_TOOLS,
    NAME,
    ROLE,
    TOOLS,
    Conversation,
    asks_for_order_id,
    assistant_message,
    content_text,
    customer_service_agent,
    first_messages,
    next_prompt_bound,
    reply_budget,
    step,
)
from examples.customer_service.reward import (
    RewardParts,
    Task,
    dollar_amounts,
    efficiency_score,
    is_refusal,
    quality_score,
    reply_resolves,
    score,
    status_words,
    tool_resolves,
)
from examples.customer_service.shop import (
    CACHE_ENV,
    TODAY,
    Item,
    Order,
    PolicyRefusal,
    ShopDB,
    ShopTools,
    ToolOutcome,
    build_shop,
    ensure_db,
    label_id,
    normalise_order_id,
    refund_quote,
    return_label,
)
from services.rollout.context import AgentContext
from services.rollout.registry import get
from shared.messages import RolloutRequest, RunConfig, Trajectory, Transition, pack_f32, pack_i32, unpack_i32
from tests.support.agent_stack import assert_captured, run_tasks, samples_of

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "customer_service"
SEED = 0


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> ShopTools:
    return ShopTools(ShopDB(ensure_db(SEED, tmp_path_factory.mktemp("shop"))), SEED)


@pytest.fixture(scope="module")
def shop() -> Any:
    return build_shop(SEED)


def days_ago(n: int) -> dt.date:
    return TODAY - dt.timedelta(days=n)


def delivered(days: int, *items: Item, oid: str = "A1", shipping: int = 499) -> Order:
    return Order(oid, "C1", "delivered", days_ago(days + 3), days_ago(days + 2), days_ago(days), shipping, items)


MUG = Item("P06", "Ceramic Mug", 2, 1000, True)  # 2 x $10.00
SOCKS = Item("P20", "Wool Socks", 1, 599, False)  # $5.99, final sale


def first_order(shop: Any, pred: Any) -> Order:
    return next(o for o in shop.orders if pred(o))


# ---------------------------------------------------------------- policy (hand-computed)


def test_refund_windows_and_shipping() -> None:
    # items $20.00 + $5.99 = $25.99; shipping $4.99 is never refunded
    assert refund_quote(delivered(10, MUG, SOCKS)).refund_cents == 2599
    assert refund_quote(delivered(30, MUG, SOCKS)).percent == 100  # day 30 is still full
    q = refund_quote(delivered(31, MUG, SOCKS))
    assert (q.percent, q.refund_cents, q.days_since_delivery) == (50, 1299, 31)  # 1299.5 rounds down
    assert refund_quote(delivered(60, MUG, SOCKS)).refund_cents == 1299
    with pytest.raises(PolicyRefusal, match="61 days ago"):
        refund_quote(delivered(61, MUG, SOCKS))
    # only some items
    assert refund_quote(delivered(10, MUG, SOCKS), ["p20"]).refund_cents == 599
    with pytest.raises(ValueError, match="P99"):
        refund_quote(delivered(10, MUG), ["P99"])
    shipped = Order("A2", "C1", "shipped", days_ago(3), days_ago(2), None, 499, (MUG,))
    with pytest.raises(PolicyRefusal, match="shipped, not delivered"):
        refund_quote(shipped)


def test_return_label_rules() -> None:
    label, items = return_label(delivered(30, MUG, SOCKS), seed=7)
    assert items == ["P06"] and label == label_id(7, "A1") and re.fullmatch(r"RL-[0-9A-F]{8}", label)
    assert label_id(7, "A1") == label_id(7, "A1") != label_id(8, "A1") != label_id(7, "A2")
    with pytest.raises(PolicyRefusal, match="31 days ago"):
        return_label(delivered(31, MUG), seed=7)
    with pytest.raises(PolicyRefusal, match="no returnable items"):
        return_label(delivered(5, SOCKS), seed=7)
    with pytest.raises(PolicyRefusal, match="cancelled"):
        return_label(Order("A3", "C1", "cancelled", days_ago(9), None, None, 0, (MUG,)), seed=7)


def test_normalise_order_id() -> None:
    assert normalise_order_id(" #a10482 ") == "A10482"
    assert normalise_order_id(10482) == normalise_order_id("10482") == "A10482"
    for bad in (None, True, "", "A", "B123", "A12x", 1.5, ["A1"]):
        assert normalise_order_id(bad) is None


# ---------------------------------------------------------------- database


def test_shop_is_deterministic(shop: Any) -> None:
    assert build_shop(SEED) == shop and build_shop(SEED + 1) != shop
    assert len({o.order_id for o in shop.orders}) == len(shop.orders)
    assert {o.status for o in shop.orders} == {"processing", "shipped", "delivered", "cancelled"}
    for o in shop.orders:
        assert o.items and o.order_date < TODAY
        assert (o.delivery_date is not None) == (o.status == "delivered")
        if o.delivery_date is not None:
            assert o.order_date < o.delivery_date < TODAY


def test_db_round_trip_read_only_and_cached(tmp_path: Path, shop: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = ensure_db(SEED)
    assert path.parent == tmp_path / "customer_service" and path.name.startswith(f"shop-{SEED}-")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    mtime = path.stat().st_mtime_ns
    assert ensure_db(SEED) == path and path.stat().st_mtime_ns == mtime  # built once
    db = ShopDB(path)
    for o in shop.orders:
        assert db.order(o.order_id) == o
    assert db.order("A1") is None
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn = db._connect()
        try:
            conn.execute("DELETE FROM orders")
        finally:
            conn.close()
    # another seed, another file
    assert ensure_db(SEED + 1) != path


# ---------------------------------------------------------------- tools


def test_tools_results_and_errors(tools: ShopTools, shop: Any) -> None:
    order = first_order(shop, lambda o: o.status == "delivered" and (TODAY - o.delivery_date).days <= 30)
    oid = order.order_id
    out = tools.call("lookup_order", json.dumps({"order_id": oid.lower()}))
    assert out.ok and out.order_id == oid and out.kind is None
    assert out.text.startswith(f"order {oid} of {order.customer_id}: delivered on {order.delivery_date}")
    assert all(i.product_id in out.text for i in order.items)

    out = tools.call("calculate_refund", {"order_id": oid})
    assert out.ok and out.refund_cents == order.subtotal_cents
    assert f"refund ${out.refund_cents // 100}.{out.refund_cents % 100:02d} (100% of the items" in out.text

    returnable = [i.product_id for i in order.items if i.returnable]
    out = tools.call("create_return_label", f'{{"order_id": "{oid}"}}')
    if returnable:
        assert out.ok and out.label_id == label_id(SEED, oid) and out.label_id in out.text
        assert tools.call("create_return_label", {"order_id": oid}).label_id == out.label_id  # deterministic
    else:
        assert out.kind == "not_eligible"

    failures = [
        ("lookup_order", '{"order_id": "A1"}', "unknown_order", "error: unknown order A1"),
        ("lookup_order", '{"order_id": ', "malformed_arguments", "error: malformed arguments (not JSON"),
        ("lookup_order", "[1]", "malformed_arguments", "error: malformed arguments (expected a JSON object)"),
        ("lookup_order", "{}", "malformed_arguments", 'error: malformed arguments (need "order_id"'),
        ("calculate_refund", {"order_id": oid, "items": "P01"}, "malformed_arguments", "error: malformed"),
        ("calculate_refund", {"order_id": oid, "items": ["P99"]}, "bad_items", "error: items ['P99']"),
        ("send_money", {"order_id": oid}, "unknown_tool", "error: unknown tool 'send_money'"),
    ]
    for name, args, kind, prefix in failures:
        out = tools.call(name, args)
        assert not out.ok and out.kind == kind and out.text.startswith(prefix), (name, args, out)

    old = first_order(shop, lambda o: o.status == "delivered" and (TODAY - o.delivery_date).days > 60)
    out = tools.call("calculate_refund", {"order_id": old.order_id})
    assert out.kind == "not_eligible" and out.text.startswith("not eligible: ") and "60-day" in out.text
    assert out.order_id == old.order_id and out.refund_cents is None


# ---------------------------------------------------------------- dataset


def test_dataset_is_deterministic_and_balanced() -> None:
    rows = data.make_dataset(60, seed=3)
    assert rows == data.make_dataset(60, seed=3) and rows != data.make_dataset(60, seed=4)
    assert data.make_dataset(7, seed=3) == rows[:7]
    for i in range(0, 60, 3):
        assert sorted(r["intent"] for r in rows[i : i + 3]) == sorted(data.INTENTS)
    for r in rows:
        assert set(r) == {"customer_id", "opening", "intent", "order_id", "expected", "shop_seed"}
        assert r["shop_seed"] == 3
    with_id = sum(r["order_id"] in r["opening"] for r in rows)
    assert 15 <= with_id <= 45  # about half the customers name the order up front


def test_expected_answers_match_the_tools(tmp_path: Path) -> None:
    rows = data.make_dataset(150, seed=SEED)
    tools = ShopTools(ShopDB(ensure_db(SEED, tmp_path)), SEED)
    shop = build_shop(SEED)
    kinds: set[str] = set()
    for r in rows:
        exp, oid = r["expected"], r["order_id"]
        assert shop.order(oid).customer_id == r["customer_id"]  # type: ignore[union-attr]
        if r["intent"] == "order_status":
            looked = tools.call("lookup_order", {"order_id": oid})
            assert exp["status"] in looked.text and exp["status_text"].startswith(f"order {oid}")
            assert exp["status_date"] is None or exp["status_date"] in looked.text
            kinds.add(exp["status"])
        elif r["intent"] == "refund":
            out = tools.call("calculate_refund", {"order_id": oid})
            if exp.get("refusal"):
                assert out.kind == "not_eligible" and exp["reason"] in out.text
                kinds.add("refund_refused")
            else:
                assert out.ok and out.refund_cents == exp["refund_cents"] and f"${exp['refund']}" in out.text
                kinds.add(f"refund_{exp['percent']}")
        else:
            out = tools.call("create_return_label", {"order_id": oid})
            if exp.get("refusal"):
                assert out.kind == "not_eligible" and exp["reason"] in out.text
                kinds.add("label_refused")
            else:
                assert out.ok and out.label_id == exp["label_id"]
                kinds.add("label_ok")
    assert kinds == {"processing", "shipped", "delivered", "cancelled", "refund_refused", "refund_100",
                     "refund_50", "label_refused", "label_ok"}  # fmt: skip


def test_committed_rows_are_the_generator_output() -> None:
    path = EXAMPLE / "rows.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows == data.make_dataset(len(rows), seed=0)
    assert len(rows) >= 200 and path.stat().st_size < 300_000


def test_train_yaml_is_a_valid_run() -> None:
    from services.cli.app import load_run_config

    config = RunConfig.model_validate(load_run_config(EXAMPLE / "train.yaml"))
    assert config.agent == NAME and config.model == "tiny" and config.trained_roles == ROLE
    assert config.training.credit == "discounted" and 0 < config.training.discount <= 1
    assert {r.on: r.reward for r in config.runtime.air_values()} == {"tool_success": 0.1, "tool_failure": -0.1}
    assert len(config.dataset) == 300


# ---------------------------------------------------------------- reward (hand-computed)

STATUS = Task("order_status", "A100", {"status": "shipped", "status_date": "2024-05-28"})
CANCELLED = Task("order_status", "A100", {"status": "cancelled", "status_date": None})
REFUND = Task("refund", "A100", {"refund": "12.34", "refund_cents": 1234, "percent": 50})
LABEL = Task("return_label", "A100", {"label_id": "RL-00000000"})
REFUSE = Task("refund", "A100", {"refusal": True, "reason": "too late"})


def outcome(tool: str, ok: bool = True, oid: str = "A100", **kw: Any) -> ToolOutcome:
    return ToolOutcome(tool, {"order_id": oid}, ok, "text", kw.pop("kind", None if ok else "not_eligible"), oid, **kw)


def test_text_parsers() -> None:
    assert status_words("It SHIPPED, will be delivered; not canceled.") == {"shipped", "delivered", "cancelled"}
    assert dollar_amounts("$12.34, $ 5, $1,234.5 and 7.00") == [1234, 500, 123450]
    assert dollar_amounts("no money here, 12.34") == []
    assert is_refusal("Unfortunately it is past the window") and is_refusal("I can't do that")
    assert is_refusal("this order is NOT ELIGIBLE") and not is_refusal("Sure, here is your refund")


def test_reply_resolution() -> None:
    assert reply_resolves(STATUS, "Your order has shipped!", [])
    assert not reply_resolves(STATUS, "It is shipped or delivered", [])  # guessing
    assert reply_resolves(STATUS, "Shipped on 2024-05-28, delivered in a few days", [])  # with the date
    assert not reply_resolves(STATUS, "It was delivered", [])
    assert reply_resolves(CANCELLED, "Order A100 was canceled.", [])
    assert not reply_resolves(CANCELLED, "cancelled or shipped", [])  # no date to give: one status only

    assert reply_resolves(REFUND, "You get $12.34 back.", [])
    assert not reply_resolves(REFUND, "You paid $24.68, you get $12.34 back.", [])  # every $ amount must match
    assert not reply_resolves(REFUND, "You get 12.34 back.", []) and not reply_resolves(REFUND, "$12.35", [])
    assert not reply_resolves(LABEL, "Here is your label RL-00000000", [])  # only the tool issues labels

    refusal = "Unfortunately this order is not eligible."
    assert not reply_resolves(REFUSE, refusal, [])  # unchecked
    assert not reply_resolves(REFUSE, refusal, [outcome("lookup_order", oid="A999")])  # another order
    assert not reply_resolves(REFUSE, refusal, [outcome("lookup_order", False, kind="unknown_order")])
    assert reply_resolves(REFUSE, refusal, [outcome("lookup_order")])
    assert reply_resolves(REFUSE, refusal, [outcome("calculate_refund", False)])  # "not eligible" answer
    assert not reply_resolves(REFUSE, "Your refund is $3.00", [outcome("lookup_order")])
    assert not reply_resolves(REFUND, refusal, [outcome("lookup_order")])  # refusing an eligible refund


def test_tool_resolution() -> None:
    assert tool_resolves(REFUND, outcome("calculate_refund", refund_cents=1234))
    assert not tool_resolves(REFUND, outcome("calculate_refund", refund_cents=617))  # some items only
    assert not tool_resolves(REFUND, outcome("calculate_refund", oid="A9", refund_cents=1234))
    assert tool_resolves(LABEL, outcome("create_return_label", label_id="RL-00000000"))
    assert not tool_resolves(LABEL, outcome("create_return_label", False))
    assert not tool_resolves(LABEL, outcome("lookup_order"))
    assert not tool_resolves(STATUS, outcome("lookup_order"))  # the customer has to be told
    assert not tool_resolves(REFUSE, outcome("calculate_refund", False))  # ... and so does a refusal


def test_quality() -> None:
    assert quality_score(None, "A100") == 0.0
    assert quality_score("  ... ", "A100") == 0.0
    assert quality_score("ok", "A100") == pytest.approx(1 / 3)
    assert quality_score("Order a100 is on its way", "A100") == pytest.approx(2 / 3)
    assert quality_score("Thanks for waiting", "A100") == pytest.approx(2 / 3)
    assert quality_score("Hi! Order A100 shipped.", "A100") == 1.0
    assert quality_score("This ship is big", "A100") == pytest.approx(1 / 3)  # "hi" inside "this/ship": no


def test_efficiency() -> None:
    assert [efficiency_score(n, 4) for n in (1, 2, 3, 4)] == [1.0, 1.0, 0.5, 0.0]
    assert efficiency_score(None, 4) == 0.0
    assert efficiency_score(4, 6) == 0.5 and efficiency_score(5, 6) == 0.25
    assert efficiency_score(2, 2) == 1.0 and efficiency_score(1, 1) == 1.0


def test_composite() -> None:
    assert RewardParts(1.0, 1.0, 1.0).total == pytest.approx(1.0)
    assert RewardParts(0.0, 0.0, 0.0).total == 0.0
    # resolved at call 3 of 4, final reply names the order but is not polite: 0.5 + 0.3*2/3 + 0.2*0.5
    parts = score(3, "Order A100 shipped.", "A100", 4)
    assert (parts.completion, parts.efficiency) == (1.0, 0.5) and parts.total == pytest.approx(0.8)
    # unresolved, a non-empty impolite reply: 0.3 * 1/3
    assert score(None, "hmm", "A100", 4).total == pytest.approx(0.1)


# ---------------------------------------------------------------- one step of the conversation


def tool_call(name: str, arguments: Any, call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def calls(*tool_calls: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": list(tool_calls)}


def text(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def row_for(shop: Any, intent: str, pred: Any, opening: str | None = None, **extra: Any) -> dict[str, Any]:
    order = first_order(shop, pred)
    return {"customer_id": order.customer_id, "intent": intent, "order_id": order.order_id,
            "opening": opening or f"Hi, about order {order.order_id}.",
            "expected": data.expected_for(intent, order, SEED), "shop_seed": SEED, **extra}  # fmt: skip


def is_full_refund(o: Order) -> bool:
    return o.status == "delivered" and (TODAY - o.delivery_date).days <= 30  # type: ignore[operator]


def test_step_valid_tool_call_then_resolving_reply(shop: Any, tools: ShopTools) -> None:
    row = row_for(shop, "refund", is_full_refund)
    oid, cents = row["order_id"], row["expected"]["refund_cents"]
    conv = Conversation.start(row)
    assert conv.id_given and conv.max_turns == 4
    out = step(calls(tool_call("lookup_order", f'{{"order_id": "{oid}"}}', "c1"),
                     tool_call("calculate_refund", {"order_id": oid}, "c2")), conv, tools)  # fmt: skip
    assert [m["tool_call_id"] for m in out.tool_messages] == ["c1", "c2"]
    assert all(m["role"] == "tool" for m in out.tool_messages)
    assert out.tool_messages[0]["content"].startswith(f"order {oid} of ")
    assert [n for n, _ in out.events] == ["tool_success", "tool_success", "resolved"]
    assert out.events[1][1]["tool"] == "calculate_refund" and out.events[1][1]["args"] == {"order_id": oid}
    assert out.events[1][1]["result"] == out.tool_messages[1]["content"]
    assert out.customer_reply is None and not out.done and conv.resolved_at == 1  # the customer is not told yet
    amount = f"${cents // 100}.{cents % 100:02d}"
    out = step(text(f"Thanks for waiting! Order {oid}: you get {amount} back."), conv, tools)
    assert out.done and out.customer_reply is None and out.tool_messages == [] and out.events == []
    assert conv.reward() == RewardParts(1.0, 1.0, 1.0)
    with pytest.raises(RuntimeError):
        step(text("more"), conv, tools)


def test_step_tool_failures(shop: Any, tools: ShopTools) -> None:
    row = row_for(shop, "return_label", lambda o: o.status == "shipped")
    conv = Conversation.start(row)
    bad = [
        (tool_call("lookup_order", '{"order_id": "A1"}'), "unknown_order"),
        (tool_call("create_return_label", {"order_id": row["order_id"]}), "not_eligible"),
        (tool_call("lookup_order", "{order: A1"), "malformed_arguments"),
        (tool_call("lookup_order", {"id": row["order_id"]}), "malformed_arguments"),
        ({"id": "x", "type": "function"}, "unknown_tool"),
    ]
    out = step(calls(*(c for c, _ in bad)), conv, tools)
    assert [n for n, _ in out.events] == ["tool_failure"] * len(bad)
    assert [d["kind"] for _, d in out.events] == [k for _, k in bad]
    assert [d["error"] for _, d in out.events] == [m["content"] for m in out.tool_messages]
    assert out.events[2][1]["args"] == "{order: A1"  # the raw text, as the model sent it
    json.dumps([d for _, d in out.events])  # event data must be JSON
    assert not out.done and out.customer_reply is None and conv.resolved_at is None
    # the "not eligible" answer grounds a refusal
    out = step(text("Sorry, order " + row["order_id"] + " cannot be returned before it arrives."), conv, tools)
    assert out.done and conv.resolved_at == 2
    assert conv.reward().total == pytest.approx(0.5 + 0.3 + 0.2)


def test_step_customer_gives_the_order_id_when_asked(shop: Any, tools: ShopTools) -> None:
    row = row_for(shop, "order_status", lambda o: o.status == "cancelled", opening="Where is my order?")
    oid = row["order_id"]
    conv = Conversation.start(row)
    assert not conv.id_given
    out = step(text("Hello! How can I help?"), conv, tools)
    assert out.customer_reply == "Can you please help? I just want to know where my order is."
    assert out.events == [("customer_reply", {"text": out.customer_reply})] and not out.done
    out = step(text("Could you give me your order number?"), conv, tools)
    assert out.customer_reply == f"Sure, it's order {oid}." and conv.id_given
    out = step(text([{"type": "text", "text": "Checking"}, {"type": "image_url"}]), conv, tools)  # list content
    assert out.customer_reply == f"Could you please check order {oid}? I just want to know where my order is."
    assert conv.replies[-1] == "Checking"
    out = step(text(f"Order {oid} was cancelled, sorry."), conv, tools)  # call 4 of 4
    assert out.done and out.customer_reply is None and conv.resolved_at == 4
    assert conv.reward() == RewardParts(1.0, 1.0, 0.0)


def test_step_ends_at_max_turns(shop: Any, tools: ShopTools) -> None:
    row = row_for(shop, "refund", is_full_refund, max_turns=2)
    conv = Conversation.start(row)
    assert not step(calls(tool_call("lookup_order", {"order_id": row["order_id"]})), conv, tools).done
    out = step(calls(tool_call("lookup_order", {"order_id": row["order_id"]})), conv, tools)  # a tool turn can end it
    assert out.done and out.customer_reply is None and conv.final_reply is None
    assert conv.reward().total == 0.0
    conv = Conversation.start({**row, "max_turns": 1})
    out = step(text(""), conv, tools)
    assert out.done and out.customer_reply is None and conv.reward().total == 0.0
    with pytest.raises(ValueError):
        Conversation.start({**row, "max_turns": -1})


def test_asks_for_order_id_and_content_text() -> None:
    assert asks_for_order_id("What is your ORDER ID?") and asks_for_order_id("your order number please")
    assert asks_for_order_id("Which order #?")
    assert not asks_for_order_id("What did you order?") and not asks_for_order_id("What is your number?")
    assert content_text(None) == "" and content_text("x") == "x"


def test_assistant_message_keeps_what_the_model_said() -> None:
    from openai.types.chat import ChatCompletionMessage

    msg = ChatCompletionMessage.model_validate(
        {"role": "assistant", "content": None, "tool_calls": [tool_call("lookup_order", '{"order_id": "A1"}')]}
    )
    assert assistant_message(msg) == calls(tool_call("lookup_order", '{"order_id": "A1"}'))
    plain = ChatCompletionMessage.model_validate({"role": "assistant", "content": "hi"})
    assert assistant_message(plain) == text("hi")


# ---------------------------------------------------------------- prompts and context budget


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from shared.models import build_tokenizer

    return build_tokenizer(seed=0)  # the tiny model's own tokenizer and chat template


def n_tokens(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
    rendered = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_compact_prompts_fit_the_tiny_model_and_the_bound_holds(tokenizer: Any, tools: ShopTools) -> None:
    rows = data.make_dataset(30, seed=SEED)
    first = [n_tokens(tokenizer, first_messages(r, compact=True), COMPACT_TOOLS) for r in rows]
    assert max(first) + 64 <= 1024  # the first call always fits, with train.yaml's max_tokens
    assert n_tokens(tokenizer, first_messages(rows[0]), TOOLS) > 1024  # why compact exists
    for r in rows[:6]:
        msgs = first_messages(r, compact=True)
        prompt = n_tokens(tokenizer, msgs, COMPACT_TOOLS)
        oid = r["order_id"]
        added = [calls(tool_call("lookup_order", json.dumps({"order_id": oid}))),
                 {"role": "tool", "tool_call_id": "call_1", "content": tools.call("lookup_order", {"order_id": oid}).text},
                 text("Ünïcödé ✓ replies\ncount bytes <|im_end|>"), {"role": "user", "content": f"It's {oid}."}]  # fmt: skip
        actual = n_tokens(tokenizer, msgs + added, COMPACT_TOOLS)
        assert prompt < actual <= next_prompt_bound(prompt, added)
    assert reply_budget(None, 5000, 64) == 64
    assert reply_budget(1024, 900, 64) == 64 and reply_budget(1024, 1000, 64) == 24
    assert reply_budget(1024, 1017, 64) is None


def test_turns_merge_into_one_sample_with_customer_and_tool_text_masked(tokenizer: Any, tools: ShopTools) -> None:
    """What a model whose text round-trips (any real one) gives the trainer: the agent's
    messages (a tool call, then a reply, via `step`) re-render as generated, so each prompt
    extends the last prompt + response and the three calls merge into one sample in which only
    the sampled tokens carry loss. (The random tiny model writes invalid UTF-8 that does not
    round-trip, so in the end-to-end run its turns mostly stay separate samples.)"""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    row = data.make_dataset(3, seed=SEED)[0]
    oid = row["order_id"]
    conv = Conversation.start({**row, "opening": "Where is my order?"})
    messages = first_messages(row, compact=True)
    messages[1]["content"] = "Where is my order?"
    generated = [
        "Hello! What is your order number?",
        '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "' + oid + '"}}\n</tool_call>',
        f"Thanks! Order {oid} is {row['expected']['status']}.",
    ]
    sent = [text(generated[0]), calls(tool_call("lookup_order", json.dumps({"order_id": oid}))), text(generated[2])]
    transitions, responses = [], []
    for gen, message in zip(generated, sent):
        rendered = tokenizer.apply_chat_template(messages, tools=COMPACT_TOOLS, add_generation_prompt=True,
                                                 tokenize=False)  # fmt: skip
        prompt = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        response = tokenizer(gen, add_special_tokens=False)["input_ids"] + [im_end]  # stopped at <|im_end|>
        responses.append(len(response))
        transitions.append(Transition(role=ROLE, prompt_ids=pack_i32(prompt), response_ids=pack_i32(response),
                                      response_logprobs=pack_f32([-1.0] * len(response)),
                                      response_versions=pack_i32([0] * len(response))))  # fmt: skip
        result = step(message, conv, tools)
        messages += [message, *result.tool_messages]
        if result.customer_reply:
            messages.append({"role": "user", "content": result.customer_reply})
    assert result.done and conv.resolved_at == 3
    traj = Trajectory(rollout_id="r.0", run_id="r", task_id="t", group_id="t", sample_index=0, group_size=1,
                      agent=NAME, status="ok", reward=conv.reward().total, transitions=transitions, started_at=0,
                      finished_at=1, worker_id="w")  # fmt: skip
    (sample,) = samples_of(traj, ROLE)
    assert sample.loss_tokens == sum(responses)
    trained = tokenizer.decode(sample.tokens[sample.loss_mask == 1])
    assert "order number" in trained and "lookup_order" in trained and "Thanks!" in trained
    assert "Sure, it's order" not in trained and "<tool_response>" not in trained  # customer, tool: mask 0
    masked = tokenizer.decode(sample.tokens[sample.loss_mask == 0])
    assert f"Sure, it's order {oid}." in masked and f"order {oid} of " in masked


# ---------------------------------------------------------------- the agent loop, scripted


class FakeClient:
    """Stands in for `ctx.openai(role="agent")`: scripted replies, each recorded as a transition
    of the context (as the capture proxy does), a `models.list()` with the served context."""

    def __init__(self, ctx: AgentContext, replies: list[dict[str, Any]], context_len: int | None) -> None:
        self.ctx, self.replies, self.requests = ctx, list(replies), []  # type: ignore[var-annotated]
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))
        self.models = SimpleNamespace(list=self.list_models)
        self.context_len = context_len

    async def list_models(self) -> Any:
        if self.context_len is None:
            raise ConnectionError("no models endpoint")
        from openai.types import Model

        return SimpleNamespace(data=[Model.model_validate({"id": "m", "object": "model", "created": 0,
                                                           "owned_by": "x", "max_model_len": self.context_len})])  # fmt: skip

    async def create(self, **body: Any) -> Any:
        from openai.types.chat import ChatCompletionMessage

        self.requests.append(json.loads(json.dumps(body)))  # a snapshot: the agent keeps appending
        self.ctx.record(Transition(role=ROLE, prompt_ids=pack_i32([1]), response_ids=pack_i32([2]),
                                   response_logprobs=pack_f32([0.0]), response_versions=pack_i32([0])))  # fmt: skip
        message = ChatCompletionMessage.model_validate(self.replies.pop(0))
        usage = SimpleNamespace(prompt_tokens=700, completion_tokens=10)
        return SimpleNamespace(choices=[SimpleNamespace(message=message)], usage=usage)


def scripted(row: dict[str, Any], replies: list[dict[str, Any]], context_len: int | None = 32768,
             max_tokens: int = 32) -> tuple[AgentContext, FakeClient]:  # fmt: skip
    request = RolloutRequest(rollout_id="r.0", run_id="r", task_id="t", group_id="t", sample_index=0,
                             group_size=1, agent=NAME, input=row, sampling={"max_tokens": max_tokens})  # fmt: skip
    ctx = AgentContext(request=request, client=None)
    client = FakeClient(ctx, replies, context_len)

    def openai(role: str = "assistant", **_: Any) -> FakeClient:
        assert role == ROLE
        return client

    ctx.openai = openai  # type: ignore[method-assign]
    return ctx, client


async def test_agent_asks_looks_up_and_answers(shop: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    row = row_for(shop, "order_status", lambda o: o.status == "shipped", opening="Where is my order?")
    oid, status_date = row["order_id"], row["expected"]["status_date"]
    ctx, client = scripted(row, [
        text("Hello! What is your order number?"),
        calls(tool_call("lookup_order", json.dumps({"order_id": oid}))),
        text(f"Thanks! Order {oid} shipped on {status_date}."),
    ])  # fmt: skip
    reward = await customer_service_agent(ctx)
    assert reward == pytest.approx(0.5 + 0.3 + 0.2 * 0.5)  # resolved at call 3 of 4
    assert len(client.requests) == 3 and len(ctx.transitions) == 3
    first, last = client.requests[0], client.requests[-1]
    assert first["tools"] == TOOLS and first["max_tokens"] == 32 and first["messages"][0]["content"].startswith(
        "You are a support agent")  # fmt: skip
    assert [m["role"] for m in last["messages"]] == ["system", "user", "assistant", "user", "assistant", "tool"]
    assert last["messages"][3]["content"] == f"Sure, it's order {oid}."
    assert last["messages"][4]["tool_calls"][0]["function"]["arguments"] == json.dumps({"order_id": oid})
    assert [(e.name, e.transition) for e in ctx.events] == [("customer_reply", 0), ("tool_success", 1),
                                                            ("resolved", 2)]  # fmt: skip
    assert get(NAME) is not None and get(NAME).fn is customer_service_agent  # type: ignore[union-attr]


async def test_agent_compact_prompts_and_context_budget(shop: Any, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    row = row_for(shop, "refund", is_full_refund, opening="I want a refund.", max_tokens=200)
    # 1024 positions: compact prompts, and each later call's max_tokens is cut to the room the
    # bound leaves (the fake reports 700 prompt tokens per call).
    replies = ["Hi", "Hello", "Hey", "Hi there"]  # max_turns 4
    ctx, client = scripted(row, [text(r) for r in replies], context_len=1024)
    reward = await customer_service_agent(ctx)
    assert reward == pytest.approx(0.3 * 2 / 3)  # polite, no order id, unresolved
    assert client.requests[0]["tools"] == COMPACT_TOOLS and client.requests[0]["max_tokens"] == 200
    assert client.requests[0]["messages"][0]["content"].startswith("Acme store support.")
    customer = "Can you please help? How much will I get back?"
    assert [r["messages"][-1]["content"] for r in client.requests[1:]] == [customer] * 3
    # room = 1024 - (700 + 32 [generation prompt] + len(reply) + 32 + len(customer) + 32)
    assert [r["max_tokens"] for r in client.requests] == [200] + [
        1024 - (700 + 32 + len(reply) + 32 + len(customer) + 32) for reply in replies[:3]
    ]
    # no models endpoint: full prompts, no budget
    ctx, client = scripted(row, [text("Hi")] * 4, context_len=None)
    await customer_service_agent(ctx)
    assert len(client.requests) == 4 and all(r["max_tokens"] == 200 for r in client.requests)
    assert client.requests[0]["tools"] == TOOLS
    # too small a context for a second call: the conversation stops early, the rollout still scores
    ctx, client = scripted(row, [text("Hi")] * 4, context_len=760)
    reward = await customer_service_agent(ctx)
    assert len(client.requests) == 1 and [e.name for e in ctx.events][-1] == "context_full"
    assert reward == pytest.approx(0.3 * 2 / 3)


# ---------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_customer_service_end_to_end(agent_stack) -> None:  # type: ignore[no-untyped-def]
    rows = [{**r, "max_turns": 2} for r in data.make_dataset(3, seed=SEED)]
    trajs = run_tasks(agent_stack, NAME, rows, group_size=2, sampling={"max_tokens": 12})
    assert len(trajs) == 6
    merged = 0
    for traj in trajs:
        assert traj.status == "ok", traj.error
        assert traj.agent == NAME and 0.0 <= traj.reward <= 1.0
        assert 1 <= len(traj.transitions) <= 2
        assert {t.role for t in traj.transitions} == {ROLE}
        assert_captured(traj)
        lengths = [len(unpack_i32(t.response_ids)) for t in traj.transitions]
        assert all(0 < n <= 12 for n in lengths)
        names = [e.name for e in traj.events]
        assert set(names) <= {"tool_success", "tool_failure", "customer_reply", "resolved", "context_full"}
        assert all(e.transition is not None and 0 <= e.transition < len(traj.transitions) for e in traj.events)
        if len(traj.transitions) == 2:  # the random model did not resolve it in one reply: the customer answered
            assert names.count("customer_reply") + names.count("tool_success") + names.count("tool_failure") >= 1
        # Only the agent's sampled tokens carry loss: prompts, customer replies and tool results do not.
        samples = samples_of(traj, ROLE)
        assert samples and sum(s.loss_tokens for s in samples) == sum(lengths)
        for s in samples:
            assert np.all(s.versions[s.loss_mask == 1] >= 0) and np.all(s.old_logprobs[s.loss_mask == 1] <= 0)
        # The second call merges into the first call's sample exactly when its prompt extends
        # the first prompt + response; then the customer's tokens between them are mask 0.
        if len(traj.transitions) == 2:
            t0, t1 = traj.transitions
            context = np.concatenate([unpack_i32(t0.prompt_ids), unpack_i32(t0.response_ids)])
            p1 = unpack_i32(t1.prompt_ids)
            extends = len(p1) >= len(context) and np.array_equal(p1[: len(context)], context)
            assert len(samples) == (1 if extends else 2)
            if extends:
                merged += 1
                (s,) = samples
                assert np.array_equal(s.tokens, np.concatenate([p1, unpack_i32(t1.response_ids)]))
                between = s.loss_mask[len(context) : len(p1)]
                assert len(between) > 0 and not between.any()  # the customer's turn
                assert s.loss_mask[len(p1) :].all() and s.loss_mask[len(unpack_i32(t0.prompt_ids)) : len(context)].all()
        assert sum(s.loss_tokens for s in samples_of(traj, "customer")) == 0  # another role trained: nothing
    by_task: dict[str, int] = {}
    for traj in trajs:
        by_task[traj.task_id] = by_task.get(traj.task_id, 0) + 1
    assert sorted(by_task.values()) == [2, 2, 2]
    print(f"customer-service e2e: {merged} of {sum(len(t.transitions) == 2 for t in trajs)} two-call rollouts merged")
