"""The toy task: copy a short string. Single turn: prompt -> completion -> reward in [0, 1]."""

from __future__ import annotations

from services.rollout.context import AgentContext
from services.rollout.registry import agent


def copy_reward(target: str, completion: str) -> float:
    """Fraction of target characters reproduced in place; extra text after the target costs."""
    text = completion.strip()
    if not target:
        return 1.0 if not text else 0.0
    matched = sum(1 for a, b in zip(target, text) if a == b)
    return matched / max(len(target), len(text))


@agent("copy", description="toy task: repeat the input text exactly; reward = per-character match")
async def copy_agent(ctx: AgentContext) -> float:
    target = str(ctx.input["text"])
    reply = await ctx.chat([{"role": "user", "content": f"Copy: {target}"}])
    return copy_reward(target, reply.text)
