"""The agent registry: agents are installed code registered by name; a task names one.

    from services.rollout.registry import agent

    @agent("my-agent", description="what it does")
    async def my_agent(ctx: AgentContext) -> float:
        reply = await ctx.chat([{"role": "user", "content": ctx.input["question"]}])
        return 1.0 if reply.text.strip() == ctx.input["answer"] else 0.0
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

if TYPE_CHECKING:
    from services.rollout.context import AgentContext

AgentFn = Callable[["AgentContext"], Awaitable[float]]


@dataclass(frozen=True)
class RegisteredAgent:
    name: str
    fn: AgentFn
    description: str


_REGISTRY: dict[str, RegisteredAgent] = {}


def agent(name: str, description: str = "") -> Callable[[AgentFn], AgentFn]:
    def register(fn: AgentFn) -> AgentFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"agent {name!r} is already registered by {_REGISTRY[name].fn.__module__}")
        _REGISTRY[name] = RegisteredAgent(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return register


def get(name: str) -> RegisteredAgent | None:
    return _REGISTRY.get(name)


def all_agents() -> dict[str, RegisteredAgent]:
    return dict(_REGISTRY)


def load_builtin_and(modules: str = "") -> dict[str, RegisteredAgent]:
    """Import the built-in agents plus any user modules that register more."""
    importlib.import_module("services.rollout.agents")
    for mod in (m.strip() for m in modules.split(",")):
        if mod:
            importlib.import_module(mod)
    return all_agents()
