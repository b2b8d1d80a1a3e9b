"""The store against a real nats-server and real SQL (SQLite; PostgreSQL where reachable)."""

import asyncio
from typing import AsyncIterator

import msgpack
import pytest
from sqlalchemy import func, select

from shared import subjects
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.faults import NotFound
from shared.messages import Event, Failure, GetById, Group, Reward, TaskSpec
from shared.store_api import Pong, StoreClient
from services.store.db import create_engine, create_schema
from services.store.service import Store
from services.store.settings import StoreSettings
from services.store.tables import DeadLetterRow, RolloutRow, TransitionRow
from tests.conftest import wait_until
from tests.test_messages import make_trajectory


class RunningStore:
    """A store service running in this event loop, stoppable and restartable like a process."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.engine = create_engine(settings.database_url)

    async def start(self) -> "RunningStore":
        await create_schema(self.engine)
        self.bus = await Bus.connect(self.settings, "store")
        await self.bus.ensure_topology()
        self.store = Store(self.bus, self.engine, self.settings)
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(self.store.run(self.stop_event))
        return self

    async def stop(self) -> None:
        self.stop_event.set()
        await self.task
        await self.bus.close()

    async def count(self, table=RolloutRow) -> int:
        async with self.store.repo.sessions() as s:
            return int((await s.execute(select(func.count()).select_from(table))).scalar_one())


@pytest.fixture
async def store(settings: ServiceSettings, database_url: str) -> AsyncIterator[RunningStore]:
    st = await RunningStore(StoreSettings(nats_url=settings.nats_url, database_url=database_url, batch_size=64)).start()
    yield st
    if not st.task.done():
        await st.stop()
    await st.engine.dispose()


async def published_groups(bus: Bus, subject: str = subjects.STREAM_SUBJECTS[subjects.STREAM_GROUPS]) -> list[Group]:
    """Every group on `subject` (default: all of GROUPS), in stream order."""
    sub = await bus.js.pull_subscribe(subject, stream=subjects.STREAM_GROUPS)
    out: list[Group] = []
    while True:
        try:
            msgs = await sub.fetch(256, timeout=0.5)
        except Exception:
            break
        out.extend(Group.decode(m.data) for m in msgs)
        for m in msgs:
            await m.ack()
    await sub.unsubscribe()
    return out


def trajectory(task: str, index: int, group_size: int, attempt: int = 1, n_tokens: int = 5):
    t = make_trajectory(f"{task}.{index}", attempt=attempt, n_tokens=n_tokens)
    # Rewards and events ride along so the round trip through SQL covers them.
    rewards = [Reward(value=0.1 * index, transition=0, source="tool"), Reward(value=-0.5)]
    events = [Event(name="tool_success", transition=0, data={"tool": "sql", "rows": [1, 2]}, at=12.5)]
    return t.model_copy(update={"group_size": group_size, "rewards": rewards, "events": events})


async def test_duplicates_are_stored_once_and_group_published_once(store: RunningStore, bus: Bus):
    members = [trajectory("g1", i, 3) for i in range(3)]
    for t in members:
        await bus.publish(subjects.trajectories("r"), t, t.msg_id())
    # The same message again (dropped by the stream) and a second attempt (dropped by SQL).
    await bus.publish(subjects.trajectories("r"), members[0], members[0].msg_id())
    late = trajectory("g1", 1, 3, attempt=2, n_tokens=9)
    await bus.publish(subjects.trajectories("r"), late, late.msg_id())
    await wait_until(store.count, expect=3)
    groups = await wait_until(lambda: published_groups(bus))
    await asyncio.sleep(0.5)
    assert len(groups) == 1
    g = groups[0]
    assert g.group_id == "g1" and [t.sample_index for t in g.trajectories] == [0, 1, 2]
    assert all(t.attempt == 1 for t in g.trajectories)
    # Transitions of the losing attempt never mix in: one transition per stored rollout.
    await wait_until(lambda: store.count(TransitionRow), expect=3)
    stored = await store.store.repo.get_trajectory("g1.1")
    assert stored == members[1]


async def test_store_restarted_mid_stream_loses_nothing(settings: ServiceSettings, bus: Bus, database_url: str):
    n_groups, size = 150, 4
    batch = [trajectory(f"task{g}", i, size) for g in range(n_groups) for i in range(size)]
    await bus.publish_many((subjects.trajectories("r"), t, t.msg_id()) for t in batch)
    st_settings = StoreSettings(nats_url=settings.nats_url, database_url=database_url, batch_size=32)
    first = await RunningStore(st_settings).start()
    await wait_until(first.count, timeout_s=30)
    await first.stop()  # SIGTERM-like: drains the batch in hand
    partial = await first.count()
    await first.engine.dispose()
    second = await RunningStore(st_settings).start()
    try:
        await wait_until(second.count, expect=n_groups * size, timeout_s=60)
    finally:
        await second.stop()
        await second.engine.dispose()
    groups = await published_groups(bus)
    assert 0 < partial <= n_groups * size
    assert sorted(g.group_id for g in groups) == sorted(f"task{g}" for g in range(n_groups))
    assert all(len(g.trajectories) == size for g in groups)


async def test_queries_and_task_progress(store: RunningStore, bus: Bus):
    api = StoreClient(bus, timeout_s=5)
    spec = TaskSpec(task_id="q1", run_id="r", agent="copy", input={"text": "x"}, group_size=2)
    assert await api.put_tasks([spec]) == 1
    assert await api.put_tasks([spec]) == 0  # idempotent
    view = await api.get_task("q1")
    assert view.status == "pending" and view.rollouts == []
    t = trajectory("q1", 0, 2)
    await bus.publish(subjects.trajectories("r"), t, t.msg_id())
    await wait_until(store.count, expect=1)
    view = await api.get_task("q1")
    assert view.status == "running" and view.rollouts[0].rollout_id == "q1.0"
    with pytest.raises(NotFound):
        await api.get_rollout("nope")
    wrong_type = await bus.request(subjects.store_rpc("ping"), GetById(id="x"), Pong)
    assert isinstance(wrong_type, Failure) and wrong_type.code == 400


async def test_malformed_trajectory_is_dead_lettered_and_persisted(store: RunningStore, bus: Bus):
    await bus.js.publish(subjects.trajectories("r"), msgpack.packb({"rollout_id": 5}))
    good = trajectory("after", 0, 1)
    await bus.publish(subjects.trajectories("r"), good, good.msg_id())
    await wait_until(store.count, expect=1)  # the consumer kept serving
    await wait_until(lambda: store.count(DeadLetterRow), expect=1)
    async with store.store.repo.sessions() as s:
        row = (await s.execute(select(DeadLetterRow))).scalar_one()
    assert row.stream == "TRAJECTORIES" and "invalid Trajectory" in row.reason


async def test_malformed_dead_letter_is_itself_dead_lettered_once(store: RunningStore, bus: Bus):
    await bus.js.publish(subjects.dlq("TASKS"), b"\x00garbage")
    await wait_until(lambda: store.count(DeadLetterRow), expect=1)
    await asyncio.sleep(0.5)  # no loop: the wrapper is a valid DeadLetter and is stored once
    assert await store.count(DeadLetterRow) == 1
    async with store.store.repo.sessions() as s:
        row = (await s.execute(select(DeadLetterRow))).scalar_one()
    assert row.stream == "DLQ" and row.data == b"\x00garbage" and "not MessagePack" in row.reason
