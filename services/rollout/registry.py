"""The agent registry: agents are installed code registered by name; a task names one.

Register with the decorator (async or plain `def`; sync agents run in a thread pool):

    from services.rollout.registry import agent

    @agent("my-agent", description="what it does")
    async def my_agent(ctx: AgentContext) -> float:
        reply = await ctx.chat([{"role": "user", "content": ctx.input["question"]}])
        return 1.0 if reply.text.strip() == ctx.input["answer"] else 0.0

or from an installed package, with an entry point in the `relayrl.agents` group (every
worker loads them all at start):

    [project.entry-points."relayrl.agents"]
    my-agent = "my_package.agents:my_agent"   # a function: registered under the entry point's name
    more = "my_package.agents"                # a module: importing it runs its @agent decorators
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Union

import structlog

if TYPE_CHECKING:
    from services.rollout.context import AgentContext

log = structlog.get_logger("rollout.registry")

ENTRY_POINT_GROUP = "relayrl.agents"

# An agent returns its final reward: awaited when async, run in a thread when sync.
AgentFn = Callable[["AgentContext"], Union[Awaitable[float], float]]


@dataclass(frozen=True)
class RegisteredAgent:
    name: str
    fn: AgentFn
    description: str

    @property
    def is_async(self) -> bool:
        """Awaited on the worker's loop (else run in its thread pool): an `async def`, or an
        object whose `__call__` is one."""
        return inspect.iscoroutinefunction(self.fn) or inspect.iscoroutinefunction(getattr(self.fn, "__call__", None))


_REGISTRY: dict[str, RegisteredAgent] = {}


def register(name: str, fn: AgentFn, description: str = "") -> None:
    """Register `fn` as agent `name`; registering the same function again is a no-op."""
    if not callable(fn):
        raise TypeError(f"agent {name!r} must be a function of the rollout context, got {type(fn).__name__}")
    if name in _REGISTRY and _REGISTRY[name].fn is not fn:
        raise ValueError(f"agent {name!r} is already registered by {_REGISTRY[name].fn.__module__}")
    _REGISTRY[name] = RegisteredAgent(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0])


def agent(name: str, description: str = "") -> Callable[[AgentFn], AgentFn]:
    def decorate(fn: AgentFn) -> AgentFn:
        register(name, fn, description)
        return fn

    return decorate


def get(name: str) -> RegisteredAgent | None:
    return _REGISTRY.get(name)


def all_agents() -> dict[str, RegisteredAgent]:
    return dict(_REGISTRY)


def load_entry_points() -> list[str]:
    """Load every `relayrl.agents` entry point; the names of the agents they registered.

    A package that fails to import is logged with its error and skipped: the worker still
    serves every other agent, and tasks naming the broken one fail with "unknown agent".
    """
    before = set(_REGISTRY)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            target: Any = ep.load()  # a module: its decorators ran on import
            if not inspect.ismodule(target):
                register(ep.name, target)
        except Exception as exc:  # noqa: BLE001 - one broken package must not take the worker down
            log.error("agent entry point failed to load", entry_point=ep.name, value=ep.value, error=repr(exc))
    return sorted(set(_REGISTRY) - before)


def load_builtin_and(modules: str = "") -> dict[str, RegisteredAgent]:
    """Import the built-in agents, the installed entry points, and any user modules that register more."""
    importlib.import_module("services.rollout.agents")
    load_entry_points()
    for mod in (m.strip() for m in modules.split(",")):
        if mod:
            importlib.import_module(mod)
    return all_agents()
