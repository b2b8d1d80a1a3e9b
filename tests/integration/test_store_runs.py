"""The store's training-run side against a real nats-server and real SQL: runs and their
lifecycle, pacing cursors, datasets, step metrics, and replay of trained groups."""

import asyncio
import math

import msgpack
import pytest
from sqlalchemy import text

from shared import subjects
from shared.bus import Bus
from shared.faults import NotFound, Rejected
from shared.messages import Failure, Group, PaceCursor, RunConfig, RunView, StepMetrics, TaskSpec
from shared.store_api import StoreClient
from services.store.db import create_engine, create_schema
from services.store.runs import RunRepository
from tests.support.factories import trajectory
from tests.support.store import RunningStore
from tests.support.streams import published_groups
from tests.support.waiting import wait_until


def client(bus: Bus) -> StoreClient:
    return StoreClient(bus, timeout_s=5.0)


def config(run_id: str, rows: int = 4, **training: object) -> RunConfig:
    return RunConfig(
        run_id=run_id,
        agent="copy",
        dataset=[{"text": f"row {i}"} for i in range(rows)],
        training={"batch_size": 2, "group_size": 2, **training},
    )


async def put_run(bus: Bus, cfg: RunConfig) -> RunView:
    return await client(bus).put_run(cfg, len(cfg.dataset))


def step(run_id: str, n: int, version: int, group_ids: list[str], **values: float) -> StepMetrics:
    return StepMetrics(run_id=run_id, step=n, version=version, group_ids=group_ids, values=values, staleness={0: 4})


async def publish_metrics(bus: Bus, *steps: StepMetrics) -> None:
    # No Nats-Msg-Id on purpose: a re-trained step is a new message, not a duplicate.
    for m in steps:
        await bus.publish(subjects.metrics(m.run_id), m)


async def replayed(bus: Bus, run_id: str) -> list[Group]:
    """Every group on `groups(run_id, replay=True)`, in stream order."""
    return await published_groups(bus, subjects.groups(run_id, replay=True))


async def replayed_n(bus: Bus, run_id: str, n: int) -> list[Group]:
    """The replayed groups once `n` are out (the replay job publishes in the background)."""

    async def enough() -> list[Group] | None:
        groups = await replayed(bus, run_id)
        return groups if len(groups) >= n else None

    return await wait_until(enough, timeout_s=30)


# --- runs ----------------------------------------------------------------------------------


async def test_put_get_list_runs_idempotent_and_conflicting(store: RunningStore, bus: Bus):
    api = client(bus)
    first = await put_run(bus, config("a"))
    assert first.state == "running" and first.cursor == PaceCursor()
    assert first.rows == 4 and first.total_steps == 2  # 4 rows x 1 epoch / batch 2
    assert (first.step, first.version, first.groups_consumed, first.reward_mean) == (0, 0, 0, None)
    await asyncio.sleep(0.01)
    await put_run(bus, config("b", rows=6))

    again = await put_run(bus, config("a"))
    assert again == first  # idempotent: the stored run, unchanged
    with pytest.raises(Rejected) as clash:
        await put_run(bus, config("a", learning_rate=0.5))
    assert clash.value.code == 409 and "training" in clash.value.reason

    got = await api.get_run("a")
    assert got == first and got.config == config("a")
    with pytest.raises(NotFound):
        await api.get_run("nope")
    listed = await api.list_runs()
    assert [r.run_id for r in listed] == ["b", "a"]  # newest first
    # Listed without inline rows; get_run has them.
    assert all(r.config.rows_omitted and r.config.dataset == [] for r in listed) and listed[1].rows == 4
    await api.set_run_state("b", "paused")
    only = await api.list_runs(states=["paused", "finished"])
    assert [r.run_id for r in only] == ["b"]
    assert [r.run_id for r in await api.list_runs(limit=1)] == ["b"]


async def test_adhoc_task_runs_are_not_runs_until_put(store: RunningStore, bus: Bus):
    api = client(bus)
    spec = TaskSpec(task_id="t1", run_id="adhoc", agent="copy", input={}, group_size=2)
    assert await api.put_tasks([spec]) == 1
    with pytest.raises(NotFound):
        await api.get_run("adhoc")
    assert await api.list_runs() == []
    with pytest.raises(NotFound):
        await api.set_run_state("adhoc", "paused")
    # Creating a run of that id adopts the bucket; later tasks of the run keep its config.
    assert (await put_run(bus, config("adhoc"))).state == "running"
    spec2 = spec.model_copy(update={"task_id": "t2"})
    assert await api.put_tasks([spec2]) == 1
    assert (await api.get_run("adhoc")).config == config("adhoc")


async def test_state_transitions_and_refused_transition(store: RunningStore, bus: Bus):
    api = client(bus)
    await put_run(bus, config("s"))
    paused = await api.set_run_state("s", "paused", from_states=["running"])
    assert paused.state == "paused"
    resumed = await api.set_run_state("s", "running", from_states=["paused"])
    assert resumed.state == "running" and resumed.updated_at >= paused.updated_at
    failed = await api.set_run_state("s", "failed", error="trainer crashed")
    assert failed.state == "failed" and failed.error == "trainer crashed"
    with pytest.raises(Rejected) as refused:
        await api.set_run_state("s", "running", from_states=["paused"])
    assert refused.value.code == 409 and "is failed" in refused.value.reason and "paused" in refused.value.reason
    assert (await api.get_run("s")).state == "failed"  # unchanged
    with pytest.raises(NotFound):
        await api.set_run_state("none", "paused")


async def test_concurrent_transitions_one_wins(store: RunningStore, bus: Bus, database_url: str):
    await put_run(bus, config("race"))
    # Two repositories with their own connection pools: like two store replicas.
    other = create_engine(database_url)
    try:
        results = await asyncio.gather(
            store.store.runs.set_state("race", "paused", None, ["running"]),
            RunRepository(other).set_state("race", "cancelled", None, ["running"]),
            return_exceptions=True,
        )
    finally:
        await other.dispose()
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1 and len(lost) == 1 and lost[0].code == 409
    assert (await client(bus).get_run("race")).state == won[0].state


async def test_cursor_never_moves_back(store: RunningStore, bus: Bus):
    api = client(bus)
    await put_run(bus, config("c"))
    ahead = PaceCursor(epoch=0, row=3, groups_published=3)
    assert await api.save_cursor("c", ahead)
    stale = PaceCursor(epoch=0, row=1, groups_published=1)
    assert not await api.save_cursor("c", stale)
    assert (await api.get_run("c")).cursor == ahead
    done = PaceCursor(epoch=1, row=0, groups_published=3, done=True)
    assert await api.save_cursor("c", done)
    assert (await api.get_run("c")).cursor == done
    with pytest.raises(NotFound):
        await api.save_cursor("x", done)


# --- datasets ------------------------------------------------------------------------------


async def test_datasets_are_immutable_by_name(store: RunningStore, bus: Bus):
    api = client(bus)
    rows = [{"q": "1+1", "a": 2}, {"q": "2+2", "a": 4, "tags": ["x"]}]
    assert await api.put_dataset("math.v1", rows) == 2
    assert await api.put_dataset("math.v1", rows) == 2  # same: ok
    with pytest.raises(Rejected) as clash:
        await api.put_dataset("math.v1", rows[:1])
    assert clash.value.code == 409
    assert await api.get_dataset("math.v1") == rows
    with pytest.raises(NotFound):
        await api.get_dataset("nope")
    with pytest.raises(Rejected) as bad:
        await api.put_dataset("nan", [{"x": math.nan}])
    assert bad.value.code == 400 and "JSON" in bad.value.reason


# --- metrics -------------------------------------------------------------------------------


async def test_metrics_are_stored_and_a_retrained_step_replaces_its_row(store: RunningStore, bus: Bus):
    await put_run(bus, config("m"))
    await publish_metrics(
        bus,
        step("m", 1, 1, ["g1", "g2"], loss=0.5, reward_mean=0.1),
        step("m", 2, 2, ["g3", "g4"], loss=math.nan, reward_mean=0.2),
        step("m", 3, 3, ["g5", "g6"], loss=0.3, reward_mean=0.3),
    )

    async def steps(after: int = 0, limit: int = 100) -> list[StepMetrics]:
        return await client(bus).get_metrics("m", after_step=after, limit=limit)

    await wait_until(lambda: _len(steps()), expect=3)
    stored = await steps()
    assert [m.step for m in stored] == [1, 2, 3] and stored[0].group_ids == ["g1", "g2"]
    assert math.isnan(stored[1].values["loss"]) and stored[0].staleness == {0: 4}
    run = await client(bus).get_run("m")
    assert (run.step, run.version, run.reward_mean) == (3, 3, 0.3)

    # The trainer restarted from its step-1 checkpoint and trained step 2 again, other groups.
    await publish_metrics(bus, step("m", 2, 2, ["g7", "g8"], loss=0.4, reward_mean=0.25))

    async def step2_groups() -> list[str]:
        return (await steps(after=1, limit=1))[0].group_ids

    await wait_until(step2_groups, expect=["g7", "g8"])
    assert [m.step for m in await steps()] == [1, 2, 3]
    assert (await steps(after=1, limit=1))[0].values == {"loss": 0.4, "reward_mean": 0.25}


async def _len(items) -> int:  # type: ignore[no-untyped-def]
    return len(await items)


async def test_older_redelivered_step_never_overwrites_a_newer_one(store: RunningStore):
    runs = store.store.runs
    newer = step("o", 1, 5, ["new"])
    older = step("o", 1, 4, ["old"])
    await runs.put_metrics([(newer, 20)])
    await runs.put_metrics([(older, 10)])  # a stream sequence before the stored one
    assert (await runs.get_metrics("o", 0, 10))[0].group_ids == ["new"]
    await runs.put_metrics([(older, 30), (newer, 31)])  # one batch: the later message wins
    assert (await runs.get_metrics("o", 0, 10))[0].group_ids == ["new"]


# --- replay --------------------------------------------------------------------------------


async def stored_groups(bus: Bus, store: RunningStore, run_id: str, rewards: dict[str, tuple[float, float]]) -> None:
    """Store one two-member group per entry, member rewards as given."""
    members = []
    for g, pair in rewards.items():
        for i, r in enumerate(pair):
            t = trajectory(g, i, 2)
            members.append(t.model_copy(update={"run_id": run_id, "reward": r}))
    await bus.publish_many((subjects.trajectories(run_id), t, t.msg_id()) for t in members)
    await wait_until(store.count, expect=len(members))


async def test_replay_publishes_trained_groups_in_consumed_order(store: RunningStore, bus: Bus):
    await put_run(bus, config("src"))
    means = {f"g{i}": i / 10 for i in range(6)}
    await stored_groups(bus, store, "src", {g: (0.0, 2 * m) for g, m in means.items()})
    # Consumed order differs from id order and from storage order on purpose.
    await publish_metrics(
        bus,
        step("src", 2, 2, ["g0", "g5"]),
        step("src", 1, 1, ["g3", "g1"]),
        step("src", 3, 3, ["g4", "g2"]),
    )
    await wait_until(lambda: _len(rpc_metrics(bus, "src")), expect=3)

    assert await client(bus).replay("src", into="dst") == 6
    groups = await replayed_n(bus, "dst", 6)
    assert [g.group_id for g in groups] == ["g3", "g1", "g0", "g5", "g4", "g2"]
    assert all(g.run_id == "dst" and len(g.trajectories) == 2 for g in groups)
    original = await store.store.repo.load_trajectories(["g3"])
    assert groups[0].trajectories == original["g3"]  # trajectories unchanged

    created = await client(bus).get_run("dst")
    # Like the gateway's replay endpoint: a run trained only from replayed groups, sized by the job.
    assert created.state == "running" and created.config == config("src").model_copy(
        update={"run_id": "dst", "mode": "replay"}
    )
    assert created.rows == 6 and created.total_steps == 6 // created.config.training.batch_size

    # A repeated request finds the durable job: the same count, nothing published again (also
    # after the stream's duplicate window, which no longer matters).
    assert await client(bus).replay("src", into="dst") == 6
    await asyncio.sleep(0.5)
    assert len(await replayed(bus, "dst")) == 6


async def test_a_replay_interrupted_by_a_store_restart_resumes_at_its_cursor(store: RunningStore, bus: Bus):
    """The job is stored before anything is published and its cursor after each chunk: a store
    that died after publishing the first groups publishes only the rest when it starts again."""
    await put_run(bus, config("src"))
    await stored_groups(bus, store, "src", {f"g{i}": (0.0, 1.0) for i in range(5)})
    await store.stop()
    job = await store.store.runs.create_replay_job("src", "resumed", ["g4", "g0", "g3", "g1", "g2"])
    await store.store.runs.advance_replay_job(job.into, 2, done=False)  # "g4", "g0" went out before the crash
    back = await RunningStore(store.settings).start()
    try:
        groups = await replayed_n(bus, "resumed", 3)
        assert [g.group_id for g in groups] == ["g3", "g1", "g2"]
        await asyncio.sleep(0.5)
        assert len(await replayed(bus, "resumed")) == 3
        assert await back.store.runs.unfinished_replay_jobs() == []
    finally:
        await back.stop()
        await back.engine.dispose()


async def test_replay_filters_by_version_and_reward(store: RunningStore, bus: Bus):
    await put_run(bus, config("src"))
    means = {f"g{i}": i / 10 for i in range(6)}
    await stored_groups(bus, store, "src", {g: (0.0, 2 * m) for g, m in means.items()})
    await publish_metrics(
        bus,
        step("src", 1, 1, ["g3", "g1"]),
        step("src", 2, 2, ["g0", "g5"]),
        step("src", 3, 3, ["g4", "g2"]),
    )
    await wait_until(lambda: _len(rpc_metrics(bus, "src")), expect=3)

    api = client(bus)
    assert await api.replay("src", into="v23", versions=(2, 3)) == 4
    assert [g.group_id for g in await replayed_n(bus, "v23", 4)] == ["g0", "g5", "g4", "g2"]

    assert await api.replay("src", into="good", min_reward=0.25) == 3
    assert [g.group_id for g in await replayed_n(bus, "good", 3)] == ["g3", "g5", "g4"]

    assert await api.replay("src", versions=(1, 2), min_reward=0.25) == 2  # into the same run by default
    assert [g.group_id for g in await replayed_n(bus, "src", 2)] == ["g3", "g5"]

    with pytest.raises(NotFound):
        await api.replay("nope")
    with pytest.raises(Rejected) as bad_into:
        await api.replay("src", into="no.dots")
    assert bad_into.value.code == 400


async def rpc_metrics(bus: Bus, run_id: str) -> list[StepMetrics]:
    return await client(bus).get_metrics(run_id)


# --- requests and schema -------------------------------------------------------------------


async def test_undecodable_requests_get_400(store: RunningStore, bus: Bus):
    for method in ("put_run", "replay", "save_cursor", "get_metrics"):
        resp = await bus.nc.request(subjects.store_rpc(method), b"\xc1 not msgpack", timeout=5)
        reply = Failure.decode(resp.data)
        assert reply.code == 400 and "MessagePack" in reply.error and resp.headers
    wrong = await bus.nc.request(subjects.store_rpc("put_run"), msgpack.packb({"rows": 1}), timeout=5)
    assert Failure.decode(wrong.data).code == 400


async def test_schema_upgrade_adds_run_columns_to_an_old_database(database_url: str):
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:  # the runs table as the first schema made it
            await conn.execute(text("CREATE TABLE runs (run_id VARCHAR(64) PRIMARY KEY, created_at FLOAT, config JSON)"))
            await conn.execute(text("INSERT INTO runs VALUES ('old', 1.0, '{}')"))
        await create_schema(engine)
        await create_schema(engine)  # and again: nothing left to add
        runs = RunRepository(engine)
        assert await runs.get_run("old") is None  # an ad-hoc bucket
        view = await runs.put_run(config("old"), 4)
        assert view.state == "running" and view.cursor == PaceCursor()
    finally:
        await engine.dispose()


async def test_get_metrics_pages_in_order(store: RunningStore, bus: Bus):
    await publish_metrics(bus, *(step("p", i, i, [f"g{i}"]) for i in range(1, 4)))
    await wait_until(lambda: _len(rpc_metrics(bus, "p")), expect=3)
    page = await client(bus).get_metrics("p", after_step=1, limit=1)
    assert [m.step for m in page] == [2]
    assert await client(bus).get_metrics("p", after_step=3) == []
