"""The bus holds what is in flight, not the run's history, against a real nats-server.

A trajectory leaves TRAJECTORIES once the store committed it; a group leaves GROUPS once its
trainer acked it (after the checkpoint that covers it); a full stream refuses publishes with
a transient error and its publisher delivers everything once space frees; an ended run's
bus objects are removed, and a restarted store does not bring them back.
"""

from __future__ import annotations

import asyncio

import nats.js.errors
import pytest
import torch
from nats.js import api as js_api
from sqlalchemy import update

from shared import retention, subjects
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.faults import is_transient
from shared.messages import Group, RolloutRequest, TaskSpec, TrainerProgress
from shared.weights import latest_policy, publish_weights
from services.store.settings import StoreSettings
from services.store.tables import GroupRow, RunRow
from services.trainer.feed import GroupFeed
from tests.support.factories import trajectory
from tests.support.store import RunningStore
from tests.support.streams import reader, stream_messages
from tests.support.waiting import wait_until
from tests.support.secrets import WEIGHTS_KEY

BOUND_S = 60.0


async def test_every_stream_is_a_bounded_work_queue_that_refuses_when_full(bus: Bus) -> None:
    for spec in retention.STREAMS:
        config = (await bus.js.stream_info(spec.name)).config
        assert config.retention == js_api.RetentionPolicy.WORK_QUEUE, spec.name
        assert config.discard == js_api.DiscardPolicy.NEW, spec.name
        assert 0 < (config.max_bytes or 0) <= spec.max_bytes, spec.name
        # Derived windows: long enough for the retry paths, far below the old fixed 600 s.
        assert 0 < config.duplicate_window <= 120, (spec.name, config.duplicate_window)


async def test_a_trajectory_leaves_the_bus_once_stored(store: RunningStore, bus: Bus) -> None:
    await store.put_run("r")
    members = [trajectory("kept", i, 2) for i in range(2)]
    for t in members:
        await bus.publish(subjects.trajectories("r"), t, t.msg_id())
    await wait_until(store.count, expect=2, timeout_s=BOUND_S)
    # Acked after the commit: a work queue drops it then.
    assert await wait_until(lambda: stream_messages(bus, subjects.STREAM_TRAJECTORIES), expect=0) == 0
    assert await stream_messages(bus, subjects.STREAM_GROUPS, subjects.groups("r")) == 1


async def test_a_group_leaves_the_bus_only_when_its_trainer_acks_it(bus: Bus) -> None:
    group = Group(run_id="g", group_id="g-1", task_id="g-1", trajectories=[trajectory("g-1", 0, 1)])
    await bus.publish(subjects.groups("g"), group, "group:g-1")
    feed = GroupFeed(bus, "g", ack_wait_s=5.0)
    await feed.start()
    try:
        got = await feed.next(timeout_s=10)
        assert got is not None and got[1] == group
        feed.hold(got[0])  # trained, not yet covered by a checkpoint
        await asyncio.sleep(0.5)
        assert await stream_messages(bus, subjects.STREAM_GROUPS) == 1
        await feed.ack_held()  # the checkpoint is on disk
        assert await wait_until(lambda: stream_messages(bus, subjects.STREAM_GROUPS), expect=0) == 0
    finally:
        await feed.close()


async def test_a_full_stream_refuses_and_the_store_publishes_every_group_once_space_frees(
    store: RunningStore, bus: Bus
) -> None:
    await store.put_run("r")
    n_groups, size = 12, 2
    one = len(Group(run_id="r", group_id="r-0", task_id="r-0", trajectories=[trajectory("r-0", i, size) for i in range(size)]).encode())
    info = await bus.js.stream_info(subjects.STREAM_GROUPS)
    info.config.max_bytes = 4 * (one + 256)  # room for about four groups
    await bus.js.update_stream(info.config)

    batch = [trajectory(f"r-{g}", i, size) for g in range(n_groups) for i in range(size)]
    await bus.publish_many((subjects.trajectories("r"), t, t.msg_id()) for t in batch)
    await wait_until(store.count, expect=n_groups * size, timeout_s=BOUND_S)  # every row stored
    await wait_until(lambda: stream_messages(bus, subjects.STREAM_GROUPS), expect=4, timeout_s=BOUND_S)

    # What a publisher sees at the bound: a 503 that is transient (wait and retry), not a drop.
    extra = Group(run_id="r", group_id="x", task_id="x", trajectories=[trajectory("x", 0, 1)])
    with pytest.raises(nats.js.errors.ServiceUnavailableError) as refused:
        await bus.publish(subjects.groups("r"), extra, "group:x")
    assert is_transient(refused.value) and refused.value.err_code == 10077
    assert "maximum bytes" in (refused.value.description or "")
    assert await store.count(GroupRow) < n_groups  # the rest wait in SQL, unmarked

    # A consumer frees space; the store's retries (redelivered batches, the reconciler) fill it.
    seen: list[str] = []
    async with reader(bus, subjects.STREAM_GROUPS, subjects.groups("r")) as sub:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3 * BOUND_S
        while len(seen) < n_groups and loop.time() < deadline:
            try:
                msgs = await sub.fetch(4, timeout=2)
            except asyncio.TimeoutError:
                continue
            for m in msgs:
                seen.append(Group.decode(m.data).group_id)
                await m.ack_sync()
    assert sorted(seen) == sorted(f"r-{g}" for g in range(n_groups))  # each once, none lost
    # The store marks a group in SQL after its publish is acked, so the last marks may trail
    # the reader by a moment (CI once saw 10 of 12 at this line).
    assert await wait_until(lambda: store.count(GroupRow), expect=n_groups, timeout_s=BOUND_S) == n_groups


async def test_groups_without_a_trainer_stay_in_sql_only(store: RunningStore, bus: Bus) -> None:
    """Ad-hoc tasks (no run) and evaluations have no trainer: a work queue would keep their
    groups forever, so they are complete in SQL and never published."""
    for t in [trajectory("adhoc", i, 2) for i in range(2)]:
        await bus.publish(subjects.trajectories("adhoc-run"), t.model_copy(update={"run_id": "adhoc-run"}), t.msg_id())
    await wait_until(lambda: store.count(GroupRow), expect=1, timeout_s=BOUND_S)
    assert await stream_messages(bus, subjects.STREAM_GROUPS) == 0


async def _leave_run_objects(bus: Bus, run_id: str) -> None:
    """What a run's trainer, pacer and store leave on the bus while it runs."""
    await GroupFeed(bus, run_id, ack_wait_s=5.0).start()  # the trainer's durable (then it died)
    g = Group(run_id=run_id, group_id=f"{run_id}-g", task_id=f"{run_id}-g", trajectories=[trajectory(f"{run_id}-g", 0, 1)])
    await bus.publish(subjects.groups(run_id), g, f"group:{g.group_id}")  # never trained
    spec = TaskSpec(task_id=f"{run_id}-t", run_id=run_id, agent="copy", input={"text": "x"}, group_size=1)
    req = RolloutRequest.for_task(spec, 0)
    await bus.publish(subjects.tasks(run_id), req, req.rollout_id)  # never run
    policy = await bus.kv(subjects.KV_POLICY)
    progress = TrainerProgress(run_id=run_id, step=3, version=3, groups_consumed=7)
    await policy.put(subjects.progress_key(run_id), progress.encode())
    leases = await bus.kv(subjects.KV_LEASES)
    await leases.put(subjects.lease_key("train", run_id), b"trainer-1")
    for version in (1, 2, 3):
        await publish_weights(bus, run_id, version, version, {"w": torch.full((4,), float(version))}, keep=4, signing_key=WEIGHTS_KEY)


async def _keys(bus: Bus, bucket: str) -> set[str]:
    """Keys with anything stored under them (values or delete markers), from the bucket's stream."""
    prefix = f"$KV.{bucket}."
    info = await bus.js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    return {s[len(prefix) :] for s in (info.state.subjects or {})}


async def _weights(bus: Bus) -> set[str]:
    store = await bus.object_store(subjects.OBJ_WEIGHTS)
    try:
        return {i.name for i in await store.list(ignore_deletes=True) if not i.deleted}
    except nats.js.errors.NotFoundError:
        return set()


async def test_an_ended_run_is_cleaned_up_once_and_a_restarted_store_brings_nothing_back(
    settings: ServiceSettings, bus: Bus, sqlite_url: str
) -> None:
    st_settings = StoreSettings(nats_url=settings.nats_url, database_url=sqlite_url, cleanup_after_s=0, reconcile_every_s=0.5)
    st = RunningStore(st_settings)
    await st.put_run("done")
    await st.put_run("gone")
    await st.put_run("live")
    await st.start()
    # "gone" keeps no weights once ended.
    async with st.store.runs.sessions.begin() as s:
        row = (await s.get(RunRow, "gone"))
        config = dict(row.config)
        config["training"] = {**config["training"], "keep_versions_after": 0}
        await s.execute(update(RunRow).where(RunRow.run_id == "gone").values(config=config))
    for run_id in ("done", "gone", "live"):
        await _leave_run_objects(bus, run_id)
    assert await stream_messages(bus, subjects.STREAM_GROUPS) == 3

    await st.store.runs.set_state("done", "finished", None, ["running"])
    await st.store.runs.set_state("gone", "cancelled", None, ["running"])

    async def cleaned() -> bool:
        views = {r: await st.store.runs.get_run(r) for r in ("done", "gone")}
        return all(v is not None and v.groups_consumed == 7 for v in views.values())

    await wait_until(cleaned, timeout_s=BOUND_S)
    consumers = {c.name for c in await bus.js.consumers_info(subjects.STREAM_GROUPS)}
    assert consumers == {subjects.trainer_durable("live")}
    assert await stream_messages(bus, subjects.STREAM_GROUPS) == 1  # only the live run's group
    assert await stream_messages(bus, subjects.STREAM_TASKS) == 1
    assert await _keys(bus, subjects.KV_POLICY) == {"done", "live", "live.progress"}
    assert await _keys(bus, subjects.KV_LEASES) == {subjects.lease_key("train", "live")}
    assert await _weights(bus) == {"done/3", "live/1", "live/2", "live/3"}
    assert (await latest_policy(bus, "done")).version == 3  # the kept version still serves
    objects = (await bus.js.stream_info(f"OBJ_{subjects.OBJ_WEIGHTS}")).state
    assert objects.messages == 4 * 2  # one chunk and one meta each: no delete markers left

    # Stragglers of an ended run are stored, not published; a restarted store recreates nothing.
    await st.stop()
    await st.engine.dispose()
    again = await RunningStore(st_settings).start()
    try:
        late = trajectory("done-late", 0, 1).model_copy(update={"run_id": "done"})
        await bus.publish(subjects.trajectories("done"), late, late.msg_id())
        await wait_until(lambda: again.count(GroupRow), expect=1, timeout_s=BOUND_S)
        await asyncio.sleep(1.5)  # three sweeps
        assert await stream_messages(bus, subjects.STREAM_GROUPS) == 1
        assert {c.name for c in await bus.js.consumers_info(subjects.STREAM_GROUPS)} == {subjects.trainer_durable("live")}
        assert await _keys(bus, subjects.KV_POLICY) == {"done", "live", "live.progress"}
    finally:
        await again.stop()
        await again.engine.dispose()


def test_the_embedded_nats_server_runs_with_a_soft_memory_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`relayrl up`'s nats-server gets GOMEMLIMIT (StackConfig.nats_memory_limit_mb): without
    one, bench/soak.py measured its RSS climbing through a run that kept ~3 MiB on the bus."""
    from pathlib import Path

    from services.cli.nats_server import NatsServer
    from services.cli.stack import StackConfig

    environ = Path("/proc/self/environ")
    if not environ.exists():
        pytest.skip("reads the server's environment from /proc (Linux)")
    limit = StackConfig().nats_memory_limit_mb
    assert limit is not None and limit > 0
    server = NatsServer(store_dir=tmp_path / "nats", memory_limit_mb=limit).start()
    try:
        assert server.proc is not None
        env = Path(f"/proc/{server.proc.pid}/environ").read_bytes().split(b"\0")
        assert f"GOMEMLIMIT={limit}MiB".encode() in env
    finally:
        server.stop()


async def test_a_stream_an_older_version_kept_with_limits_is_recreated_only_once_consumed(
    settings: ServiceSettings,
) -> None:
    """JetStream cannot change retention in place: a `limits` TRAJECTORIES whose consumer has
    not consumed everything is refused with what to do; once it has, it becomes a work queue."""
    old = await Bus.connect(settings, "old-version")
    try:
        await old.js.add_stream(
            js_api.StreamConfig(
                name=subjects.STREAM_TRAJECTORIES,
                subjects=[subjects.STREAM_SUBJECTS[subjects.STREAM_TRAJECTORIES]],
                retention=js_api.RetentionPolicy.LIMITS,
                max_age=7 * 86400.0,
            )
        )
        await old.js.add_consumer(
            subjects.STREAM_TRAJECTORIES,
            js_api.ConsumerConfig(durable_name=subjects.CONSUMER_STORE_TRAJECTORIES, ack_policy=js_api.AckPolicy.EXPLICIT),
        )
        t = trajectory("old", 0, 1)
        await old.publish(subjects.trajectories("r"), t, t.msg_id())

        new = await Bus.connect(settings, "new-version")
        try:
            with pytest.raises(RuntimeError, match="store-trajectories \\(1 pending"):
                await new.ensure_stream_named(subjects.STREAM_TRAJECTORIES)
            assert (await new.js.stream_info(subjects.STREAM_TRAJECTORIES)).state.messages == 1  # untouched

            sub = await old.js.pull_subscribe_bind(durable=subjects.CONSUMER_STORE_TRAJECTORIES, stream=subjects.STREAM_TRAJECTORIES)
            for m in await sub.fetch(1, timeout=5):
                await m.ack_sync()  # the old store stored it
            await new.ensure_stream_named(subjects.STREAM_TRAJECTORIES)
            info = await new.js.stream_info(subjects.STREAM_TRAJECTORIES)
            assert info.config.retention == js_api.RetentionPolicy.WORK_QUEUE and info.state.messages == 0
        finally:
            await new.close()
    finally:
        await old.close()
