"""An agent written only against the OpenAI SDK: the capture proxy records its calls exactly.

Two turns, so multi-turn capture is exercised: it asks to repeat `text`, then sends its first
answer back and asks for it again. Nothing relayrl-specific is used beyond where the client
points (`ctx.openai()`, i.e. `AsyncOpenAI(base_url=ctx.base_url, api_key=...)`); any framework
built on the OpenAI SDK works the same way.

Input: `text` (default "hello"), `max_tokens` (default 8). Reward: per-character match of the
second answer against `text` (the copy task's reward).
"""

from __future__ import annotations

from services.rollout.agents.copy_task import copy_reward
from services.rollout.context import AgentContext
from services.rollout.registry import agent

NAME = "openai-echo"


def first_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Repeat: {text}"}]


def second_messages(text: str, first_answer: str) -> list[dict[str, str]]:
    return [
        *first_messages(text),
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "Again, exactly."},
    ]


@agent(NAME, description="two-turn echo written only against the OpenAI SDK (capture-proxy example)")
async def openai_echo_agent(ctx: AgentContext) -> float:
    text = str(ctx.input.get("text", "hello"))
    max_tokens = int(ctx.input.get("max_tokens", 8))
    client = ctx.openai()
    first = await client.chat.completions.create(model=ctx.model, messages=first_messages(text), max_tokens=max_tokens)
    answer = first.choices[0].message.content or ""
    second = await client.chat.completions.create(
        model=ctx.model, messages=second_messages(text, answer), max_tokens=max_tokens
    )
    return copy_reward(text, second.choices[0].message.content or "")
