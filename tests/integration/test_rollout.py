"""The rollout worker in-process against a real nats-server: failures become data, never crashes."""

import asyncio
import math
import threading
import time
from importlib.metadata import EntryPoint
from typing import AsyncIterator

import httpx
import pytest

from shared import subjects
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.messages import AgentInfo, RolloutRequest, Trajectory
from services.rollout import registry
from services.rollout.agents.copy_task import copy_reward
from services.rollout.context import AgentContext
from services.rollout.settings import RolloutSettings
from services.rollout.worker import Worker
from tests.support.streams import reader
from tests.support.waiting import wait_until


@registry.agent("test-raises")
async def raises(ctx: AgentContext) -> float:
    raise RuntimeError("tool exploded")


@registry.agent("test-hangs")
async def hangs(ctx: AgentContext) -> float:
    await asyncio.sleep(60)
    return 1.0


@registry.agent("test-nan")
async def nan(ctx: AgentContext) -> float:
    return math.nan


@registry.agent("test-string")
async def string(ctx: AgentContext) -> float:
    return "very good"  # type: ignore[return-value]


@registry.agent("test-rewards")
async def rewards(ctx: AgentContext) -> float:
    ctx.reward(0.3, source="tool")
    ctx.event("tool_success", tool="calculator", result=4)
    return 0.75


@registry.agent("test-sync")
def sync_agent(ctx: AgentContext) -> float:
    """A plain function: the worker runs it in its thread pool, off the event loop."""
    ctx.event("ran_in", thread=threading.current_thread().name)
    ctx.reward(-0.5, source="penalty", step=0)
    return 0.25


@registry.agent("test-sync-hangs")
def sync_hangs(ctx: AgentContext) -> float:
    time.sleep(1.5)
    return 1.0


class CallableAgent:
    """An agent object whose __call__ is async: awaited on the loop, not sent to the thread pool."""

    async def __call__(self, ctx: AgentContext) -> float:
        await asyncio.sleep(0)
        return 0.75


registry.register("test-callable", CallableAgent())


@registry.agent("test-bad-event")
async def bad_event(ctx: AgentContext) -> float:
    ctx.event("tool_success", result=object())
    return 1.0


@pytest.fixture
async def worker(settings: ServiceSettings) -> AsyncIterator[Worker]:
    registry.load_builtin_and()
    ws = RolloutSettings(nats_url=settings.nats_url, worker_id="w-test", inference_urls="", failure_reward=-1.0)
    bus = await Bus.connect(ws, "rollout")
    await bus.ensure_topology()
    async with httpx.AsyncClient() as http:
        w = Worker(bus, ws, http)
        stop = asyncio.Event()
        task = asyncio.create_task(w.run(stop))
        yield w
        stop.set()
        await task
    await bus.close()


async def run_one(bus: Bus, agent: str, timeout_s: float = 5.0, rollout_id: str = "t.0") -> Trajectory:
    req = RolloutRequest(rollout_id=rollout_id, run_id="r", task_id="t", group_id="t", sample_index=0, group_size=1,
                         agent=agent, input={}, timeout_s=timeout_s)
    await bus.publish(subjects.tasks("r"), req, req.rollout_id)
    return await run_one_existing(bus, rollout_id)


@pytest.mark.parametrize(
    "agent, status, reason",
    [
        ("test-raises", "error", "RuntimeError: tool exploded"),
        ("test-nan", "error", "non-finite or non-numeric"),
        ("test-string", "error", "non-finite or non-numeric"),
        ("test-hangs", "timeout", "timeout of 0.5s"),
        ("test-sync-hangs", "timeout", "timeout of 0.5s"),
        ("test-bad-event", "error", "not JSON-serializable"),
    ],
)
async def test_agent_failures_become_failed_trajectories(worker: Worker, bus: Bus, agent, status, reason):
    t = await run_one(bus, agent, timeout_s=0.5)
    assert t.status == status and reason in t.error
    assert t.reward == -1.0  # the configured failure reward
    assert t.worker_id == "w-test" and t.attempt == 1
    # The worker keeps serving after a failure.
    ok = await run_one(bus, "null", rollout_id="t.1")
    assert ok.status == "ok"


async def test_intermediate_rewards_are_recorded(worker: Worker, bus: Bus):
    t = await run_one(bus, "test-rewards")
    assert t.status == "ok" and t.reward == 0.75
    assert [(r.value, r.source, r.transition) for r in t.rewards] == [(0.3, "tool", None)]
    assert [(e.name, e.data, e.transition) for e in t.events] == [("tool_success", {"tool": "calculator", "result": 4}, None)]


async def test_an_agent_object_with_an_async_call_is_awaited(worker: Worker, bus: Bus):
    t = await run_one(bus, "test-callable")
    assert t.status == "ok" and t.reward == 0.75, t.error


async def test_sync_agents_run_in_the_thread_pool(worker: Worker, bus: Bus):
    t = await run_one(bus, "test-sync")
    assert t.status == "ok", t.error
    assert t.reward == 0.25
    (event,) = t.events
    assert event.name == "ran_in" and event.data["thread"].startswith("agent")
    assert [(r.value, r.source, r.transition) for r in t.rewards] == [(-0.5, "penalty", 0)]


def test_agents_register_from_entry_points(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """A function entry point registers under its name; a module entry point by importing it."""
    (tmp_path / "ep_agents_pkg.py").write_text(
        "from services.rollout.registry import agent\n"
        "@agent('ep-decorated')\n"
        "async def decorated(ctx):\n    return 1.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [
        EntryPoint("ep-copy", "services.rollout.agents.copy_task:copy_agent", registry.ENTRY_POINT_GROUP),
        EntryPoint("mine", "ep_agents_pkg", registry.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: [p for p in points if p.group == group])
    monkeypatch.setattr(registry, "_REGISTRY", {})
    added = registry.load_entry_points()
    assert added == ["ep-copy", "ep-decorated"]
    assert registry.get("ep-copy").fn.__name__ == "copy_agent"
    assert registry.load_entry_points() == []  # loading twice is harmless


async def test_worker_advertises_its_agents(worker: Worker, bus: Bus):
    kv = await bus.kv(subjects.KV_AGENTS)

    async def registered() -> bool:
        try:
            return AgentInfo.decode((await kv.get("null")).value).worker_id == "w-test"
        except Exception:
            return False

    await wait_until(registered)


def test_copy_reward():
    assert copy_reward("abc", "abc") == 1.0
    assert copy_reward("abc", " abc \n") == 1.0
    assert copy_reward("abc", "abx") == pytest.approx(2 / 3)
    assert copy_reward("abc", "abcdef") == pytest.approx(0.5)  # trailing text costs
    assert copy_reward("abc", "") == 0.0


async def test_task_past_max_attempts_is_recorded_failed_so_its_group_completes(settings: ServiceSettings, bus: Bus):
    registry.load_builtin_and()
    ws = RolloutSettings(nats_url=settings.nats_url, worker_id="w2", inference_urls="", max_attempts=1, ack_wait_s=1.0)
    async with httpx.AsyncClient() as http:
        w = Worker(bus, ws, http)
        await w.consumer().create()
        req = RolloutRequest(rollout_id="d.0", run_id="r", task_id="d", group_id="d", sample_index=0, group_size=1,
                             agent="null", input={})
        await bus.publish(subjects.tasks("r"), req, req.rollout_id)
        # A worker that takes the task and dies: it never acks, never sends in_progress().
        dead = await bus.js.pull_subscribe_bind(durable=subjects.CONSUMER_ROLLOUT, stream=subjects.STREAM_TASKS)
        assert len(await dead.fetch(1, timeout=5)) == 1
        await dead.unsubscribe()
        stop = asyncio.Event()
        task = asyncio.create_task(w.run(stop))
        try:
            t = await run_one_existing(bus, "d.0")
        finally:
            stop.set()
            await task
    assert t.status == "error" and "gave up after 1 deliveries" in t.error and t.attempt == 2


async def run_one_existing(bus: Bus, rollout_id: str) -> Trajectory:
    """The trajectory of `rollout_id` (earlier tests' trajectories are in the stream too)."""
    async with reader(bus, subjects.STREAM_TRAJECTORIES, subjects.trajectories("r")) as sub:
        while True:
            for msg in await sub.fetch(1, timeout=15):
                t = Trajectory.decode(msg.data)
                if t.rollout_id == rollout_id:
                    return t
