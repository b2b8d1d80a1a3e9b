"""The calculator agent: solves a word problem in up to `max_turns` LLM calls, using a
`calculator` function tool over standard OpenAI tool calling.

Loop (every call is role "solver", through `ctx.openai(role="solver")`, so the capture proxy
records it as a transition of that role):

1. Ask the model, offering `CALCULATOR_TOOL`.
2. `step(message)` reads the reply. With `tool_calls`, it runs each call, and returns the
   assistant message (calls included, arguments exactly as the model wrote them) plus one
   `role: "tool"` message per call, and a `tool_success` / `tool_failure` event per call
   (at most `MAX_CALLS_PER_TURN` calls run per reply); the loop appends those messages and
   asks again. Without `tool_calls`, the reply's text is the final answer.
3. The reward is `answer_reward(final answer, gold)`: 1.0 within 0.01 of the gold number,
   else 0.0; 0.0 as well when the turns run out while the model is still calling tools. An
   `answer` event records the number read and whether it was right (no AIR rule names it).

Events are recorded on the call that asked for the tool (`ctx.event`'s default: the latest
call), so with `runtime.air_enabled` and `air_rules` on `tool_success` / `tool_failure`
(see train.yaml) a well-formed calculation earns its call a small reward under `credit:
discounted`, and a malformed one costs it. `step` takes the message only, no context, so it
is unit-tested with hand-written tool calls (the tiny test model never writes a valid one).

Input: `question`, `answer` (a dataset row), optional `max_turns` (default 4) and
`max_tokens` per call (default: the run's sampling `max_tokens`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from examples.calculator.calc import calculator
from examples.calculator.reward import answer_reward, extract_answer
from services.rollout.context import AgentContext
from services.rollout.registry import agent

NAME = "calculator"
ROLE = "solver"
MAX_TURNS = 4
# Calls run per reply; the rest are answered with an error (and a tool_failure event). Without
# a cap a policy could farm AIR's tool_success reward by writing dozens of calls in one reply.
MAX_CALLS_PER_TURN = 3

SYSTEM_PROMPT = (
    "You solve math word problems. Use the calculator tool for every arithmetic step instead of "
    "computing in your head. When you know the result, reply with one line: 'Answer: <number>'."
)

CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": (
            "Evaluate an arithmetic expression and return its value. Supports numbers, + - * / // % **, "
            "parentheses and round, abs, min, max, sqrt, floor, ceil. No variables, units or commas in numbers."
        ),
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. (3 * 4.5 + 2) * 0.8"}},
            "required": ["expression"],
        },
    },
}

# Tool name -> implementation on the `expression` argument; every tool returns text, never raises.
TOOL_FUNCTIONS: dict[str, Callable[[str], str]] = {"calculator": calculator}

Message = dict[str, Any]


@dataclass
class Step:
    """What one assistant reply means for the loop."""

    messages: list[Message]  # append these to the conversation: the reply, then tool results
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (name, data) for ctx.event
    final: str | None = None  # the final answer text; None: tools were called, ask again


def as_dict(message: Any) -> Message:
    """An assistant message as a plain dict, from a dict or an OpenAI SDK object (pydantic)."""
    if isinstance(message, dict):
        return message
    dump = getattr(message, "model_dump", None)
    if dump is None:
        raise TypeError(f"not a chat message: {type(message).__name__}")
    return dump(exclude_none=True)  # type: ignore[no-any-return]


def first_messages(question: str) -> list[Message]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def call_name(call: Message) -> str:
    fn = call.get("function")
    return str(fn.get("name", "")) if isinstance(fn, dict) else ""


def run_tool_call(call: Message) -> tuple[str, tuple[str, dict[str, Any]]]:
    """Run one OpenAI tool call; (the text to send back, the event to record).

    Any fault in the call (unknown tool, arguments that are not a JSON object, no expression)
    is the model's mistake: it becomes an "error: ..." result the model can read and a
    tool_failure event, never an exception that would end the rollout.
    """
    name = call_name(call)
    if name not in TOOL_FUNCTIONS:
        error = f"unknown tool {name!r}; available: {', '.join(TOOL_FUNCTIONS)}"
        return f"error: {error}", ("tool_failure", {"tool": name, "error": error})
    raw = call["function"].get("arguments", "{}")
    try:
        # OpenAI sends a JSON string; some servers send the object itself.
        args = json.loads(raw) if isinstance(raw, str) else raw
    except (ValueError, RecursionError):
        args = None
    if not isinstance(args, dict):
        error = "arguments must be a JSON object like {\"expression\": \"2 + 2\"}"
        return f"error: {error}", ("tool_failure", {"tool": name, "error": error})
    expression = args.get("expression")
    if isinstance(expression, (int, float)) and not isinstance(expression, bool):
        expression = str(expression)  # a bare number is still a (trivial) expression
    if not isinstance(expression, str):
        error = "missing string argument 'expression'"
        return f"error: {error}", ("tool_failure", {"tool": name, "error": error})
    result = TOOL_FUNCTIONS[name](expression)
    if result.startswith("error:"):
        error = result[len("error:") :].strip()
        return result, ("tool_failure", {"tool": name, "expression": expression, "error": error})
    return result, ("tool_success", {"tool": name, "expression": expression, "result": result})


def step(message: Any) -> Step:
    """Interpret one assistant reply (dict or SDK object): run its tool calls, or take its text
    as the final answer."""
    msg = as_dict(message)
    calls = msg.get("tool_calls") or []
    content = msg.get("content")
    if not calls:
        text = content if isinstance(content, str) else ""
        return Step(messages=[{"role": "assistant", "content": text}], final=text)
    # Sent back as generated (content, ids, argument strings untouched): the next prompt then
    # re-renders this turn token for token, so the trainer can merge the calls into one sample.
    assistant: Message = {"role": "assistant", "content": content, "tool_calls": []}
    out = Step(messages=[assistant])
    for i, call in enumerate(calls):
        call = as_dict(call)
        call_id = str(call.get("id") or f"call_{i}")
        function = call.get("function")
        function = dict(function) if isinstance(function, dict) else {}
        assistant["tool_calls"].append({"id": call_id, "type": call.get("type", "function"), "function": function})
        if i < MAX_CALLS_PER_TURN:
            result, event = run_tool_call(call)
        else:
            error = f"at most {MAX_CALLS_PER_TURN} tool calls per reply; this one was not run"
            result, event = f"error: {error}", ("tool_failure", {"tool": call_name(call), "error": error})
        out.messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
        out.events.append(event)
    return out


@agent(NAME, description="GSM8K-style word problems with a safe calculator tool; reward 1 for the right number")
async def calculator_agent(ctx: AgentContext) -> float:
    question, gold = str(ctx.input["question"]), float(ctx.input["answer"])
    max_turns = int(ctx.input.get("max_turns", MAX_TURNS))
    sampling: dict[str, Any] = {}
    if "max_tokens" in ctx.input:  # else the run's sampling max_tokens applies
        sampling["max_tokens"] = int(ctx.input["max_tokens"])
    client = ctx.openai(role=ROLE)
    messages = first_messages(question)
    for _ in range(max_turns):
        reply = await client.chat.completions.create(
            model=ctx.model, messages=messages, tools=[CALCULATOR_TOOL], **sampling  # type: ignore[arg-type]
        )
        result = step(reply.choices[0].message)
        for name, data in result.events:
            ctx.event(name, **data)
        if result.final is not None:
            value = extract_answer(result.final)
            reward = answer_reward(result.final, gold)
            # Not an AIR rule by default: kept so stored rollouts show what was read and judged.
            ctx.event("answer", value=value, correct=reward == 1.0)
            return reward
        messages.extend(result.messages)
    ctx.event("answer", value=None, correct=False)  # turns ran out mid tool use: no answer given
    return 0.0
