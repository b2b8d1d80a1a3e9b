"""The `customer-service` agent: a tool-using support agent talking to a scripted customer.

One conversation per task (a row of `data.make_dataset`): the system prompt states the shop's
policy, the customer opens, and the trained policy (role `agent`, through `ctx.openai`, with
the three OpenAI function tools) answers. Each agent message goes through `step`, a pure
function of the message and the conversation state (no model, no I/O beyond read-only
SQLite), so the control flow is unit-tested with hand-written messages:

- tool calls: each is executed (`ShopTools.call`); its text (result or error, e.g. "error:
  unknown order A1", "not eligible: ...") goes back as a `role: "tool"` message; the outcome is
  recorded as a `tool_success` / `tool_failure` event. No customer turn: the agent continues.
- text: a reply to the customer. If the task is resolved (now or by an earlier tool result)
  the conversation ends; otherwise the customer simulator answers: rule-based, deterministic,
  it gives the order id when asked ("order" + "number"/"id" in the agent's text) and otherwise
  repeats what it wants (a `customer_reply` event records what it said).
- it also ends after `max_turns` agent calls (default 4), or earlier when the next prompt might
  not fit the serving model's context (`context_full` event; see `next_prompt_bound`).

Prompt style: "full" (policy in the system prompt, described tools) for real models;
"compact" (one-line system prompt, tools without descriptions) when the served context is
shorter than COMPACT_BELOW tokens, e.g. the tiny test model. `prompt_style` in the input overrides.

The final reward is `reward.score` (completion 0.5, quality 0.3, efficiency 0.2). The customer's
and the tools' text is prompt for the next call, so it gets loss mask 0 when the trainer merges
the calls into one sample.

Task input: a dataset row (`customer_id`, `opening`, `intent`, `order_id`, `expected`,
`shop_seed`), plus optional `max_turns`, `max_tokens` (per call; default: the run's sampling) and
`prompt_style` ("full" | "compact")."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any

from examples.customer_service.reward import RewardParts, Task, reply_resolves, score, tool_resolves
from examples.customer_service.shop import (
    REFUND_FULL_DAYS,
    REFUND_HALF_DAYS,
    RETURN_DAYS,
    TODAY,
    ShopTools,
    ToolOutcome,
)
from services.rollout.context import AgentContext
from services.rollout.registry import agent

NAME = "customer-service"
ROLE = "agent"
DEFAULT_MAX_TURNS = 4

# Short on purpose: every token here is in every prompt, and the tiny test model has 1024 positions.
SYSTEM_PROMPT = (
    f"You are a support agent of the Acme store. Today is {TODAY.isoformat()}. Use the tools; ask for the "
    f"order id if you do not have it. Refunds: delivered orders only, 100% within {REFUND_FULL_DAYS} days of "
    f"delivery, 50% within {REFUND_HALF_DAYS}, none after; shipping is not refunded. Return labels: delivered "
    f"orders within {RETURN_DAYS} days, returnable items only. Be polite and name the order id."
)


def _tool(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": ["order_id"]},
        },
    }


ORDER_ID = {"type": "string", "description": "e.g. A10482"}
TOOLS: list[dict[str, Any]] = [
    _tool("lookup_order", "Status, dates and items of an order", {"order_id": ORDER_ID}),
    _tool("calculate_refund", "Refund due for an order (or some of its items) under the policy",
          {"order_id": ORDER_ID, "items": {"type": "array", "items": {"type": "string"},
                                           "description": "product ids; default all"}}),  # fmt: skip
    _tool("create_return_label", "Issue a return label for a delivered, returnable order", {"order_id": ORDER_ID}),
]

# Compact prompts for small-context models (the tiny test model: 1024 positions, and its
# tokenizer spends about a token per character, so the full tool schemas alone take ~940 tokens):
# the tools without descriptions (and calculate_refund without its optional `items`) and a
# one-line system prompt. The policy still holds: the tools enforce it and say why in their errors.
COMPACT_BELOW = 2048  # a served context shorter than this gets the compact prompts
COMPACT_SYSTEM_PROMPT = f"Acme store support. Today is {TODAY.isoformat()}."
COMPACT_TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": t["function"]["name"], "parameters": {
        "type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}
    for t in TOOLS
]  # fmt: skip
# Upper bounds of the chat-template bytes around a message's text: role tags (special tokens,
# counted as bytes here), and for a tool result the <tool_response> frame. A tool call's frame is
# covered by counting its JSON. With a byte-level tokenizer (<= 1 token per byte) this makes
# `next_prompt_bound` a true upper bound of the next prompt's length.
MESSAGE_OVERHEAD = {"tool": 64, "other": 32}
MIN_REPLY_TOKENS = 8  # fewer tokens of room than this and the conversation stops

# What the customer repeats when the agent neither resolves nor asks for the order id.
GOALS = {
    "order_status": "I just want to know where my order is.",
    "refund": "How much will I get back?",
    "return_label": "I need a return label.",
}
_ASKS_ORDER = re.compile(r"\border", re.IGNORECASE)
_ASKS_ID = re.compile(r"\b(number|id)\b|#", re.IGNORECASE)


@dataclass
class Conversation:
    """What the step logic knows about one conversation so far."""

    task: Task
    max_turns: int = DEFAULT_MAX_TURNS
    id_given: bool = False  # the customer has told the order id (in the opening or when asked)
    calls: int = 0  # agent calls so far
    outcomes: list[ToolOutcome] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)  # the agent's text replies to the customer
    resolved_at: int | None = None  # agent calls made when the task was first resolved
    done: bool = False

    @classmethod
    def start(cls, row: dict[str, Any]) -> Conversation:
        task = Task.from_row(row)
        max_turns = int(row.get("max_turns") or DEFAULT_MAX_TURNS)
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        return cls(task, max_turns, id_given=task.order_id.lower() in str(row["opening"]).lower())

    @property
    def final_reply(self) -> str | None:
        return self.replies[-1] if self.replies else None

    def reward(self) -> RewardParts:
        return score(self.resolved_at, self.final_reply, self.task.order_id, self.max_turns)


@dataclass
class StepResult:
    """What one agent message led to: messages to append, events to record, whether it ended."""

    tool_messages: list[dict[str, Any]]
    events: list[tuple[str, dict[str, Any]]]  # (name, data) for ctx.event
    customer_reply: str | None
    done: bool


def content_text(content: Any) -> str:
    """OpenAI message content (a string, None, or a list of text parts) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def asks_for_order_id(text: str) -> bool:
    return _ASKS_ORDER.search(text) is not None and _ASKS_ID.search(text) is not None


def customer_reply(conv: Conversation, agent_text: str) -> str:
    """The scripted customer's answer to an agent reply that did not resolve the request."""
    if asks_for_order_id(agent_text):
        conv.id_given = True
        return f"Sure, it's order {conv.task.order_id}."
    goal = GOALS.get(conv.task.intent, "Can you help me?")
    if conv.id_given:
        return f"Could you please check order {conv.task.order_id}? {goal}"
    return f"Can you please help? {goal}"


def tool_event(outcome: ToolOutcome) -> tuple[str, dict[str, Any]]:
    if outcome.ok:
        return "tool_success", {"tool": outcome.tool, "args": outcome.args, "result": outcome.text}
    return "tool_failure", {"tool": outcome.tool, "args": outcome.args, "error": outcome.text, "kind": outcome.kind}


def step(message: dict[str, Any], conv: Conversation, tools: ShopTools) -> StepResult:
    """Apply one assistant message (OpenAI shape: `content`, optional `tool_calls`) to `conv`.

    An assistant message with tool calls is a tool turn (any content beside them is the
    model thinking aloud, not a reply to the customer); one without is a reply.
    """
    if conv.done:
        raise RuntimeError("the conversation is over")
    conv.calls += 1
    events: list[tuple[str, dict[str, Any]]] = []
    tool_messages: list[dict[str, Any]] = []
    customer: str | None = None
    calls = message.get("tool_calls") or []
    if calls:
        for i, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            fn = fn if isinstance(fn, dict) else {}
            outcome = tools.call(str(fn.get("name") or ""), fn.get("arguments"))
            conv.outcomes.append(outcome)
            events.append(tool_event(outcome))
            tool_messages.append({"role": "tool", "tool_call_id": str(call.get("id") or f"call_{i}"),
                                  "content": outcome.text})  # fmt: skip
            if conv.resolved_at is None and tool_resolves(conv.task, outcome):
                conv.resolved_at = conv.calls
                events.append(("resolved", {"by": outcome.tool, "calls": conv.calls}))
        conv.done = conv.calls >= conv.max_turns
    else:
        text = content_text(message.get("content"))
        conv.replies.append(text)
        if conv.resolved_at is None and reply_resolves(conv.task, text, conv.outcomes):
            conv.resolved_at = conv.calls
            events.append(("resolved", {"by": "reply", "calls": conv.calls}))
        conv.done = conv.resolved_at is not None or conv.calls >= conv.max_turns
        if not conv.done:
            customer = customer_reply(conv, text)
            events.append(("customer_reply", {"text": customer}))
    return StepResult(tool_messages, events, customer, conv.done)


def first_messages(row: dict[str, Any], compact: bool = False) -> list[dict[str, Any]]:
    system = COMPACT_SYSTEM_PROMPT if compact else SYSTEM_PROMPT
    return [{"role": "system", "content": system}, {"role": "user", "content": str(row["opening"])}]


def next_prompt_bound(prompt_tokens: int, added: list[dict[str, Any]]) -> int:
    """Upper bound of the next prompt's tokens: this call's prompt plus, per message added since
    (the reply itself, tool results, the customer's answer), its UTF-8 bytes plus its template overhead."""
    total = prompt_tokens + MESSAGE_OVERHEAD["other"]  # + the next generation prompt
    for m in added:
        text = content_text(m.get("content")) + (json.dumps(m["tool_calls"]) if m.get("tool_calls") else "")
        total += len(text.encode()) + MESSAGE_OVERHEAD["tool" if m.get("role") == "tool" else "other"]
    return total


def reply_budget(context_len: int | None, bound: int, wanted: int) -> int | None:
    """max_tokens for the next call: `wanted`, cut to the room left; None when too little is left."""
    if context_len is None:
        return wanted
    room = context_len - bound
    return min(wanted, room) if room >= MIN_REPLY_TOKENS else None


async def served_context_len(client: Any) -> int | None:
    """The serving model's context length (relayrl inference lists `max_model_len` in GET /models);
    None when the server does not say."""
    try:
        page = await client.models.list()
    except Exception:  # noqa: BLE001 - any OpenAI-compatible server: not knowing just disables the budget
        return None
    for model in page.data:
        value = getattr(model, "max_model_len", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def assistant_message(message: Any) -> dict[str, Any]:
    """The SDK's reply message as the dict sent back next turn: exactly what the model said, so the
    next prompt re-renders this turn as generated and the trainer can merge the calls."""
    out: dict[str, Any] = {"role": "assistant", "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in message.tool_calls
        ]
    return out


@agent(NAME, description="customer service with tools (orders db, refunds, return labels) vs a scripted customer")
async def customer_service_agent(ctx: AgentContext) -> float:
    conv = Conversation.start(ctx.input)
    # The first rollout on a worker builds the shop file (tens of ms); off the event loop.
    tools = await asyncio.to_thread(ShopTools.for_seed, int(ctx.input.get("shop_seed", 0)))
    client = ctx.openai(role=ROLE)
    context_len = await served_context_len(client)
    style = ctx.input.get("prompt_style") or ("compact" if context_len and context_len < COMPACT_BELOW else "full")
    compact = style == "compact"
    offered = COMPACT_TOOLS if compact else TOOLS
    messages = first_messages(ctx.input, compact)
    wanted = int(ctx.input.get("max_tokens") or ctx.request.sampling.max_tokens)
    max_tokens: int | None = wanted
    while max_tokens is not None:
        response = await client.chat.completions.create(
            model=ctx.model, messages=messages, tools=offered, max_tokens=max_tokens  # type: ignore[arg-type]
        )
        message = assistant_message(response.choices[0].message)
        result = step(message, conv, tools)
        for name, data in result.events:
            ctx.event(name, **data)  # tied to this call: the one that made the tool call / reply
        added = [message, *result.tool_messages]
        if result.customer_reply is not None:
            added.append({"role": "user", "content": result.customer_reply})
        messages.extend(added)
        if result.done:
            break
        prompt_tokens = response.usage.prompt_tokens if response.usage else 0
        max_tokens = reply_budget(context_len, next_prompt_bound(prompt_tokens, added), wanted)
        if max_tokens is None:
            # Out of context before max_turns: end here and score what was reached (never an
            # inference error that would fail the whole rollout).
            ctx.event("context_full", calls=conv.calls, context_len=context_len)
    return conv.reward().total
