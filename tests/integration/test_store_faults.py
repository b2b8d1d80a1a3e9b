"""The store's data path under bad data and big groups, against a real nats-server and real
SQL: nothing lost (refused rows are dead-lettered alone, dead-lettered members still complete
their group, groups too big for one message reach the trainer by reference, complete groups
never published are swept up), nothing double-counted."""

import asyncio
from pathlib import Path

import msgpack
import numpy as np
import pytest
from sqlalchemy import select, text

from shared import subjects
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.faults import StoreUnavailable
from shared.messages import (
    DecodeError,
    Group,
    GroupRef,
    RolloutRequest,
    Trajectory,
    Transition,
    decode_group,
    pack_f32,
    pack_i32,
)
from services.cli.nats_server import NatsServer
from services.rollout.context import AgentContext
from services.store.records import DEAD_LETTER_WORKER
from services.store.repository import Repository
from services.store.settings import StoreSettings
from services.store.tables import DeadLetterRow, RolloutRow
from services.trainer.groups_in import resolve_group
from tests.support.factories import trajectory
from tests.support.store import RunningStore
from tests.support.streams import read_stream, reader
from tests.support.waiting import wait_until

# A bound for "within seconds" that a loaded 2-core machine still meets; no timing asserts beyond it.
BOUND_S = 60.0


async def groups_on_stream(bus: Bus) -> list[Group | GroupRef]:
    """Every message on GROUPS, decoded as a whole group or a reference."""
    msgs = await read_stream(bus, subjects.STREAM_GROUPS, subjects.STREAM_SUBJECTS[subjects.STREAM_GROUPS])
    return [decode_group(m.data) for m in msgs]


async def rollouts(st: RunningStore) -> list[RolloutRow]:
    async with st.store.repo.sessions() as s:
        return list((await s.execute(select(RolloutRow))).scalars().all())


async def letters(st: RunningStore) -> list[DeadLetterRow]:
    async with st.store.repo.sessions() as s:
        return list((await s.execute(select(DeadLetterRow))).scalars().all())


def raw(t: Trajectory, **changes: object) -> bytes:
    """`t` packed with `changes` applied after validation: what a buggy or foreign sender could publish."""
    return msgpack.packb({**t.model_dump(), **changes}, use_bin_type=True)


async def test_nan_reward_among_300_is_dead_lettered_alone(store: RunningStore, bus: Bus):
    await store.put_run("r")
    good = [trajectory(f"ok{i}", 0, 1) for i in range(300)]
    bad = trajectory("nan", 0, 1)
    await bus.publish_many((subjects.trajectories("r"), t, t.msg_id()) for t in good[:150])
    await bus.js.publish(subjects.trajectories("r"), raw(bad, reward=float("nan")))  # bypasses validation
    await bus.publish_many((subjects.trajectories("r"), t, t.msg_id()) for t in good[150:])

    async def settled() -> bool:
        rows = await rollouts(store)
        return sum(r.status == "ok" for r in rows) == 300 and len(await letters(store)) == 1

    await wait_until(settled, timeout_s=BOUND_S)
    (letter,) = await letters(store)
    assert letter.stream == subjects.STREAM_TRAJECTORIES and "reward" in letter.reason
    # Its group of one still completes, with the member recorded as failed (never silently dropped).
    rows = {r.rollout_id: r for r in await wait_until(lambda: _rows_if(store, 301), timeout_s=BOUND_S)}
    failed = rows["nan.0"]
    assert failed.status == "error" and failed.reward == 0.0 and failed.worker_id == DEAD_LETTER_WORKER
    assert "dead-lettered from TRAJECTORIES" in failed.error and "reward" in failed.error
    groups = await wait_until(lambda: _groups_if(bus, 301), timeout_s=BOUND_S)
    assert sorted(g.group_id for g in groups) == sorted([f"ok{i}" for i in range(300)] + ["nan"])


async def _rows_if(st: RunningStore, n: int) -> list[RolloutRow] | None:
    rows = await rollouts(st)
    return rows if len(rows) == n else None


async def _groups_if(bus: Bus, n: int) -> list[Group | GroupRef] | None:
    groups = await groups_on_stream(bus)
    return groups if len(groups) >= n else None


async def refuse_worker(st: RunningStore, worker: str) -> None:
    """Make the database itself refuse rows from `worker` (a real constraint, no mock)."""
    async with st.engine.begin() as conn:
        if st.engine.dialect.name == "postgresql":
            await conn.execute(text(f"ALTER TABLE rollouts ADD CONSTRAINT refuse_worker CHECK (worker_id <> '{worker}')"))
        else:
            await conn.execute(text(
                f"CREATE TRIGGER refuse_worker BEFORE INSERT ON rollouts WHEN NEW.worker_id = '{worker}' "
                "BEGIN SELECT RAISE(ABORT, 'rows from this worker are refused'); END"
            ))  # fmt: skip


async def test_row_the_database_refuses_is_isolated_and_completes_its_group(store: RunningStore, bus: Bus):
    """Valid on the wire, refused by SQL: the batch is bisected, the rest stored, the row
    dead-lettered with the database's reason, and its group published with it as failed."""
    await refuse_worker(store, "evil")
    await store.put_run("r")
    members = [trajectory("g", i, 3) for i in range(3)]
    members[1] = members[1].model_copy(update={"worker_id": "evil"})
    others = [trajectory(f"o{i}", 0, 1) for i in range(100)]
    batch = [*others[:50], *members, *others[50:]]
    await bus.publish_many((subjects.trajectories("r"), t, t.msg_id()) for t in batch)
    groups = await wait_until(lambda: _groups_if(bus, 101), timeout_s=BOUND_S)
    (letter,) = await letters(store)
    assert letter.stream == subjects.STREAM_TRAJECTORIES and "database refused the row" in letter.reason
    assert Trajectory.decode(letter.data).rollout_id == "g.1"
    (g,) = [x for x in groups if x.group_id == "g"]
    assert isinstance(g, Group) and [t.sample_index for t in g.trajectories] == [0, 1, 2]
    assert [t.status for t in g.trajectories] == ["ok", "error", "ok"]
    assert "database refused the row" in g.trajectories[1].error and g.trajectories[1].reward == 0.0
    assert len(await rollouts(store)) == 103
    await asyncio.sleep(1.0)
    assert len(await groups_on_stream(bus)) == 101  # each group once


async def test_int_event_keys_normalised_at_the_call_and_dead_lettered_on_the_wire(store: RunningStore, bus: Bus):
    await store.put_run("r")
    # At the call: ctx.event keeps the data as it will read back (text keys).
    req = RolloutRequest(
        rollout_id="k.0", run_id="r", task_id="k", group_id="k", sample_index=0, group_size=2, agent="a", input={}
    )
    ctx = AgentContext(request=req, client=None)
    ctx.event("x", scores={1: 0.5})
    assert ctx.events[0].data == {"scores": {"1": 0.5}}
    ok = trajectory("k", 0, 2).model_copy(update={"events": ctx.events})
    assert Trajectory.decode(ok.encode()) == ok
    # On the wire, from a sender without that fix: the store's strict decode dead-letters it,
    # and the dead letter still completes the group.
    bad = trajectory("k", 1, 2).model_dump()
    bad["events"] = [{"name": "x", "transition": None, "data": {"scores": {1: 0.5}}, "at": 1.0}]
    with pytest.raises(DecodeError):
        Trajectory.decode(msgpack.packb(bad, use_bin_type=True))
    await bus.publish(subjects.trajectories("r"), ok, ok.msg_id())
    await bus.js.publish(subjects.trajectories("r"), msgpack.packb(bad, use_bin_type=True))
    (g,) = await wait_until(lambda: _groups_if(bus, 1), timeout_s=BOUND_S)
    assert [t.status for t in g.trajectories] == ["ok", "error"]
    assert "strict_map_key" in g.trajectories[1].error or "not MessagePack" in g.trajectories[1].error


async def test_reconciler_publishes_complete_groups_never_published(settings: ServiceSettings, bus: Bus, sqlite_url: str):
    """A crash between storing a group's last member and publishing it: the next start sweeps it up."""
    st = RunningStore(StoreSettings(nats_url=settings.nats_url, database_url=sqlite_url, reconcile_every_s=0.5))
    from services.store.db import create_schema

    await create_schema(st.engine)
    await st.put_run("r")
    repo = Repository(st.engine)
    await repo.put_trajectories([trajectory("crashed", i, 2) for i in range(2)])  # stored, never published
    await repo.put_trajectories([trajectory("partial", 0, 2)])  # not complete: must stay unpublished
    await st.start()
    try:
        groups = await wait_until(lambda: groups_on_stream(bus), timeout_s=BOUND_S)
        assert [g.group_id for g in groups] == ["crashed"]
        # Later ones too, without a new trajectory for them (the periodic sweep).
        await repo.put_trajectories([trajectory("later", 0, 1)])
        await wait_until(lambda: _groups_if(bus, 2), timeout_s=BOUND_S)
        await asyncio.sleep(1.2)  # two more sweeps: nothing published twice
        assert sorted(g.group_id for g in await groups_on_stream(bus)) == ["crashed", "later"]
    finally:
        await st.stop()
        await st.engine.dispose()


def big_trajectory(task: str, index: int, size: int, turns: int, context: int, response: int = 512) -> Trajectory:
    rng = np.random.default_rng(index)
    transitions = [
        Transition(
            prompt_ids=pack_i32(rng.integers(0, 150000, context)),
            response_ids=pack_i32(rng.integers(0, 150000, response)),
            response_logprobs=pack_f32(-rng.random(response)),
            response_versions=pack_i32(np.zeros(response)),
        )
        for _ in range(turns)
    ]
    return trajectory(task, index, size).model_copy(update={"transitions": transitions})


def test_measured_group_limit():
    """The numbers in Store.group_message's docstring: a 20-call, 8k-context trajectory and
    how many fit the default 8 MB max_payload."""
    one = len(big_trajectory("m", 0, 16, turns=20, context=8192).encode())
    assert 0.6e6 < one < 0.9e6
    fit = (8 * 2**20 - 16 * 1024) // one
    assert 9 <= fit < 16  # a group of 16 such rollouts does not fit one message


@pytest.fixture
async def small_payload_bus(tmp_path: Path):
    """A nats-server with a 1 MB max_payload, so big groups are cheap to make in a test."""
    server = NatsServer(store_dir=tmp_path / "nats1mb", max_payload_mb=1).start(log_file=tmp_path / "nats1mb.log")
    settings = ServiceSettings(nats_url=server.url, log_format="console", request_timeout_s=10.0)
    b = await Bus.connect(settings, "test")
    await b.ensure_topology()
    yield b, settings
    await b.close()
    server.stop()


async def test_group_too_big_for_one_message_reaches_the_trainer_by_reference(small_payload_bus, sqlite_url: str):
    bus, settings = small_payload_bus
    assert bus.nc.max_payload == 2**20
    st = RunningStore(StoreSettings(nats_url=settings.nats_url, database_url=sqlite_url, batch_size=4))
    await st.put_run("r")
    await st.start()
    try:
        # 6 members of ~0.35 MB each: 2.1 MB of group, each member alone under 1 MB.
        members = [big_trajectory("big", i, 6, turns=10, context=8192) for i in range(6)]
        assert all(len(m.encode()) < 2**20 for m in members)
        small = [trajectory("small", i, 2) for i in range(2)]
        for t in [*members, *small]:
            await bus.publish(subjects.trajectories("r"), t, t.msg_id())
        msgs = []
        async with reader(bus, subjects.STREAM_GROUPS, subjects.groups("r")) as sub:
            while len(msgs) < 2:
                try:
                    msgs.extend(await sub.fetch(2 - len(msgs), timeout=BOUND_S))
                except asyncio.TimeoutError:
                    break
        kinds = {decode_group(m.data).group_id: type(decode_group(m.data)) for m in msgs}
        assert kinds == {"big": GroupRef, "small": Group}
        for m in msgs:
            assert len(m.data) < 2**20
            group = await resolve_group(bus, m.data)
            expected = members if group.group_id == "big" else small
            assert [t.rollout_id for t in group.trajectories] == [t.rollout_id for t in expected]
            assert group.trajectories == [await st.store.repo.get_trajectory(t.rollout_id) for t in expected]
        assert (await resolve_group(bus, msgs[0].data)).run_id == "r"
    finally:
        await st.stop()
        await st.engine.dispose()


async def test_resolving_a_reference_without_a_store_is_transient(bus: Bus):
    ref = GroupRef(run_id="r", group_id="g", task_id="g", size=2)
    with pytest.raises(StoreUnavailable):
        await resolve_group(bus, ref.encode(), timeout_s=0.5)
    with pytest.raises(DecodeError):
        await resolve_group(bus, b"\xc1")


async def _terminate_connections(database_url: str) -> int:
    """What a PostgreSQL restart does to a client: every connection of the store's database is
    closed by the server (pg_terminate_backend), mid-pool. Returns how many were closed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    from tests.support.databases import POSTGRES_URL

    name = make_url(database_url).database
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            result = await conn.execute(
                text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"),
                {"d": name},
            )
            return int(result.scalar_one())
    finally:
        await admin.dispose()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_postgres_dropping_every_connection_under_the_store_loses_nothing(
    store: RunningStore, bus: Bus, database_url: str
):
    """The server closes the store's pooled connections mid-stream (as a restart does): the
    writes in flight are retried as transient, nothing is dead-lettered, every group completes."""
    await store.put_run("r")
    first = [trajectory(f"pg{g}", i, 4) for g in range(5) for i in range(4)]
    await bus.publish_many((subjects.trajectories("r"), t, t.msg_id()) for t in first)
    await wait_until(lambda: _rows_if(store, 20), timeout_s=BOUND_S)
    assert await _terminate_connections(database_url) >= 1
    second = [trajectory(f"pg{g}", i, 4) for g in range(5, 10) for i in range(4)]
    await bus.publish_many((subjects.trajectories("r"), t, t.msg_id()) for t in second)
    await wait_until(lambda: _rows_if(store, 40), timeout_s=BOUND_S)
    groups = await wait_until(lambda: _groups_if(bus, 10), timeout_s=BOUND_S)
    assert sorted(g.group_id for g in groups) == sorted(f"pg{g}" for g in range(10))
    assert await letters(store) == []


def _pg_ctl(action: str) -> None:
    import subprocess

    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action], check=True, timeout=60)


def _can_restart_postgres() -> bool:
    import os
    import shutil

    return shutil.which("pg_ctlcluster") is not None and Path("/etc/postgresql").is_dir() and os.geteuid() == 0


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_postgres_restarted_under_the_store_loses_nothing(store: RunningStore, bus: Bus, database_url: str):
    """The real server stops for a few seconds while trajectories keep arriving, then starts
    again: the store waits (transient), stores every trajectory once and publishes every group."""
    await store.put_run("r")
    if not _can_restart_postgres():
        pytest.skip("needs root and pg_ctlcluster to restart the local PostgreSQL server")
    first = [trajectory(f"rs{g}", i, 4) for g in range(5) for i in range(4)]
    await bus.publish_many((subjects.trajectories("r"), t, t.msg_id()) for t in first)
    await wait_until(lambda: _rows_if(store, 20), timeout_s=BOUND_S)
    await asyncio.to_thread(_pg_ctl, "stop")
    try:
        second = [trajectory(f"rs{g}", i, 4) for g in range(5, 10) for i in range(4)]
        await bus.publish_many((subjects.trajectories("r"), t, t.msg_id()) for t in second)
        await asyncio.sleep(3.0)  # the store's writes fail meanwhile
    finally:
        await asyncio.to_thread(_pg_ctl, "start")
    await wait_until(lambda: _rows_if(store, 40), timeout_s=BOUND_S)
    groups = await wait_until(lambda: _groups_if(bus, 10), timeout_s=BOUND_S)
    assert sorted(g.group_id for g in groups) == sorted(f"rs{g}" for g in range(10))
    assert await letters(store) == []


async def test_a_20_turn_8k_context_group_of_16_goes_through_at_full_size(store: RunningStore, bus: Bus):
    """The issue's case at its real size on the default 8 MB server: 16 rollouts of 20 calls
    with 8k-token prompts (~12 MB of group) are stored and published by reference, and
    resolve to all 16 members unchanged."""
    assert bus.nc.max_payload == 8 * 2**20
    await store.put_run("r")
    members = [big_trajectory("full", i, 16, turns=20, context=8192) for i in range(16)]
    for t in members:
        await bus.publish(subjects.trajectories("r"), t, t.msg_id())
    (msg,) = await wait_until(lambda: _groups_if(bus, 1), timeout_s=BOUND_S * 2)
    assert isinstance(msg, GroupRef) and msg.size == 16
    group = await resolve_group(bus, msg.encode(), timeout_s=30)
    assert [t.rollout_id for t in group.trajectories] == [t.rollout_id for t in members]
    assert all(len(t.transitions) == 20 for t in group.trajectories)
    assert group.trajectories[5].transitions[19].prompt_ids == members[5].transitions[19].prompt_ids
