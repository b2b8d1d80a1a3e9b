"""The store against a real nats-server and real SQL (SQLite; PostgreSQL where reachable)."""

import asyncio

import msgpack
import pytest
from sqlalchemy import select

from shared import subjects
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.faults import NotFound
from shared.messages import Failure, GetById, TaskSpec
from shared.store_api import Pong, StoreClient
from services.store.settings import StoreSettings
from services.store.tables import DeadLetterRow, TransitionRow
from tests.support.factories import trajectory
from tests.support.store import RunningStore
from tests.support.streams import published_groups
from tests.support.waiting import wait_until


async def test_duplicates_are_stored_once_and_group_published_once(store: RunningStore, bus: Bus):
    await store.put_run("r")
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
    first = RunningStore(st_settings)
    await first.put_run("r")
    await first.start()
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
