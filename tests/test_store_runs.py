"""The store's training-run side against a real nats-server and real SQL: runs and their
lifecycle, pacing cursors, datasets, step metrics, and replay of trained groups."""

import asyncio
import math

import msgpack
from sqlalchemy import text

from shared import subjects
from shared.bus import Bus
from shared.messages import (
    GetById,
    GetMetrics,
    Group,
    ListRuns,
    Message,
    PaceCursor,
    PutDataset,
    PutRun,
    PutTasks,
    ReplayRequest,
    Reply,
    RunConfig,
    SaveCursor,
    SetRunState,
    StepMetrics,
    TaskSpec,
)
from services.store.db import create_engine, create_schema
from services.store.runs import RunRepository
from tests.conftest import wait_until
from tests.test_store import RunningStore, published_groups, store, trajectory  # noqa: F401  (store is a fixture)


async def rpc(bus: Bus, method: str, msg: Message) -> Reply:
    return await bus.request(subjects.store_rpc(method), msg)


def config(run_id: str, rows: int = 4, **training: object) -> RunConfig:
    return RunConfig(
        run_id=run_id,
        agent="copy",
        dataset=[{"text": f"row {i}"} for i in range(rows)],
        training={"batch_size": 2, "group_size": 2, **training},
    )


async def put_run(bus: Bus, cfg: RunConfig) -> Reply:
    return await rpc(bus, "put_run", PutRun(config=cfg, rows=len(cfg.dataset)))


def step(run_id: str, n: int, version: int, group_ids: list[str], **values: float) -> StepMetrics:
    return StepMetrics(run_id=run_id, step=n, version=version, group_ids=group_ids, values=values, staleness={0: 4})


async def publish_metrics(bus: Bus, *steps: StepMetrics) -> None:
    # No Nats-Msg-Id on purpose: a re-trained step is a new message, not a duplicate.
    for m in steps:
        await bus.publish(subjects.metrics(m.run_id), m)


async def replayed(bus: Bus, run_id: str) -> list[Group]:
    """Every group on `groups(run_id, replay=True)`, in stream order."""
    return await published_groups(bus, subjects.groups(run_id, replay=True))


# --- runs ----------------------------------------------------------------------------------


async def test_put_get_list_runs_idempotent_and_conflicting(store: RunningStore, bus: Bus):
    first = await put_run(bus, config("a"))
    assert first.ok and first.run.state == "running" and first.run.cursor == PaceCursor()
    assert first.run.rows == 4 and first.run.total_steps == 2  # 4 rows x 1 epoch / batch 2
    assert (first.run.step, first.run.version, first.run.groups_consumed, first.run.reward_mean) == (0, 0, 0, None)
    await asyncio.sleep(0.01)
    assert (await put_run(bus, config("b", rows=6))).ok

    again = await put_run(bus, config("a"))
    assert again.ok and again.run == first.run  # idempotent: the stored run, unchanged
    clash = await put_run(bus, config("a", learning_rate=0.5))
    assert clash.code == 409 and "training" in clash.error

    got = await rpc(bus, "get_run", GetById(id="a"))
    assert got.run == first.run and got.run.config == config("a")
    assert (await rpc(bus, "get_run", GetById(id="nope"))).code == 404
    listed = await rpc(bus, "list_runs", ListRuns())
    assert [r.run_id for r in listed.runs] == ["b", "a"]  # newest first
    await rpc(bus, "set_run_state", SetRunState(run_id="b", state="paused"))
    only = await rpc(bus, "list_runs", ListRuns(states=["paused", "finished"]))
    assert [r.run_id for r in only.runs] == ["b"]
    assert [r.run_id for r in (await rpc(bus, "list_runs", ListRuns(limit=1))).runs] == ["b"]


async def test_adhoc_task_runs_are_not_runs_until_put(store: RunningStore, bus: Bus):
    spec = TaskSpec(task_id="t1", run_id="adhoc", agent="copy", input={}, group_size=2)
    assert (await rpc(bus, "put_tasks", PutTasks(tasks=[spec]))).stored == 1
    assert (await rpc(bus, "get_run", GetById(id="adhoc"))).code == 404
    assert (await rpc(bus, "list_runs", ListRuns())).runs == []
    assert (await rpc(bus, "set_run_state", SetRunState(run_id="adhoc", state="paused"))).code == 404
    # Creating a run of that id adopts the bucket; later tasks of the run keep its config.
    assert (await put_run(bus, config("adhoc"))).run.state == "running"
    spec2 = spec.model_copy(update={"task_id": "t2"})
    assert (await rpc(bus, "put_tasks", PutTasks(tasks=[spec2]))).stored == 1
    assert (await rpc(bus, "get_run", GetById(id="adhoc"))).run.config == config("adhoc")


async def test_state_transitions_and_refused_transition(store: RunningStore, bus: Bus):
    await put_run(bus, config("s"))
    paused = await rpc(bus, "set_run_state", SetRunState(run_id="s", state="paused", from_states=["running"]))
    assert paused.ok and paused.run.state == "paused"
    resumed = await rpc(bus, "set_run_state", SetRunState(run_id="s", state="running", from_states=["paused"]))
    assert resumed.run.state == "running" and resumed.run.updated_at >= paused.run.updated_at
    failed = await rpc(bus, "set_run_state", SetRunState(run_id="s", state="failed", error="trainer crashed"))
    assert failed.run.state == "failed" and failed.run.error == "trainer crashed"
    refused = await rpc(bus, "set_run_state", SetRunState(run_id="s", state="running", from_states=["paused"]))
    assert refused.code == 409 and "is failed" in refused.error and "paused" in refused.error
    assert (await rpc(bus, "get_run", GetById(id="s"))).run.state == "failed"  # unchanged
    missing = await rpc(bus, "set_run_state", SetRunState(run_id="none", state="paused"))
    assert missing.code == 404


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
    assert (await rpc(bus, "get_run", GetById(id="race"))).run.state == won[0].state


async def test_cursor_never_moves_back(store: RunningStore, bus: Bus):
    await put_run(bus, config("c"))
    ahead = PaceCursor(epoch=0, row=3, groups_published=3)
    assert (await rpc(bus, "save_cursor", SaveCursor(run_id="c", cursor=ahead))).stored == 1
    stale = PaceCursor(epoch=0, row=1, groups_published=1)
    assert (await rpc(bus, "save_cursor", SaveCursor(run_id="c", cursor=stale))).stored == 0
    assert (await rpc(bus, "get_run", GetById(id="c"))).run.cursor == ahead
    done = PaceCursor(epoch=1, row=0, groups_published=3, done=True)
    assert (await rpc(bus, "save_cursor", SaveCursor(run_id="c", cursor=done))).stored == 1
    assert (await rpc(bus, "get_run", GetById(id="c"))).run.cursor == done
    assert (await rpc(bus, "save_cursor", SaveCursor(run_id="x", cursor=done))).code == 404


# --- datasets ------------------------------------------------------------------------------


async def test_datasets_are_immutable_by_name(store: RunningStore, bus: Bus):
    rows = [{"q": "1+1", "a": 2}, {"q": "2+2", "a": 4, "tags": ["x"]}]
    assert (await rpc(bus, "put_dataset", PutDataset(name="math.v1", rows=rows))).stored == 2
    assert (await rpc(bus, "put_dataset", PutDataset(name="math.v1", rows=rows))).stored == 2  # same: ok
    clash = await rpc(bus, "put_dataset", PutDataset(name="math.v1", rows=rows[:1]))
    assert clash.code == 409
    assert (await rpc(bus, "get_dataset", GetById(id="math.v1"))).rows == rows
    assert (await rpc(bus, "get_dataset", GetById(id="nope"))).code == 404
    bad = await rpc(bus, "put_dataset", PutDataset(name="nan", rows=[{"x": math.nan}]))
    assert bad.code == 400 and "JSON" in bad.error


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
        return (await rpc(bus, "get_metrics", GetMetrics(run_id="m", after_step=after, limit=limit))).metrics

    await wait_until(lambda: _len(steps()), expect=3)
    stored = await steps()
    assert [m.step for m in stored] == [1, 2, 3] and stored[0].group_ids == ["g1", "g2"]
    assert math.isnan(stored[1].values["loss"]) and stored[0].staleness == {0: 4}
    run = (await rpc(bus, "get_run", GetById(id="m"))).run
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

    reply = await rpc(bus, "replay", ReplayRequest(run_id="src", into="dst"))
    assert reply.ok and reply.stored == 6
    groups = await replayed(bus, "dst")
    assert [g.group_id for g in groups] == ["g3", "g1", "g0", "g5", "g4", "g2"]
    assert all(g.run_id == "dst" and len(g.trajectories) == 2 for g in groups)
    original = await store.store.repo.load_trajectories(["g3"])
    assert groups[0].trajectories == original["g3"]  # trajectories unchanged

    created = (await rpc(bus, "get_run", GetById(id="dst"))).run
    # Like the gateway's replay endpoint: a run trained only from replayed groups.
    assert created.state == "running" and created.config == config("src").model_copy(
        update={"run_id": "dst", "mode": "replay"}
    )

    again = await rpc(bus, "replay", ReplayRequest(run_id="src", into="dst"))
    assert again.ok and again.stored == 0  # within the duplicate window: each group once
    assert len(await replayed(bus, "dst")) == 6


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

    by_version = await rpc(bus, "replay", ReplayRequest(run_id="src", into="v23", versions=(2, 3)))
    assert by_version.stored == 4
    assert [g.group_id for g in await replayed(bus, "v23")] == ["g0", "g5", "g4", "g2"]

    by_reward = await rpc(bus, "replay", ReplayRequest(run_id="src", into="good", min_reward=0.25))
    assert by_reward.stored == 3
    assert [g.group_id for g in await replayed(bus, "good")] == ["g3", "g5", "g4"]

    both = await rpc(bus, "replay", ReplayRequest(run_id="src", versions=(1, 2), min_reward=0.25))
    assert both.stored == 2  # into the same run by default
    assert [g.group_id for g in await replayed(bus, "src")] == ["g3", "g5"]

    assert (await rpc(bus, "replay", ReplayRequest(run_id="nope"))).code == 404
    assert (await rpc(bus, "replay", ReplayRequest(run_id="src", into="no.dots"))).code == 400


async def rpc_metrics(bus: Bus, run_id: str) -> list[StepMetrics]:
    return (await rpc(bus, "get_metrics", GetMetrics(run_id=run_id))).metrics or []


# --- requests and schema -------------------------------------------------------------------


async def test_undecodable_requests_get_400(store: RunningStore, bus: Bus):
    for method in ("put_run", "replay", "save_cursor", "get_metrics"):
        resp = await bus.nc.request(subjects.store_rpc(method), b"\xc1 not msgpack", timeout=5)
        reply = Reply.decode(resp.data)
        assert reply.code == 400 and "MessagePack" in reply.error
    wrong = await bus.nc.request(subjects.store_rpc("put_run"), msgpack.packb({"rows": 1}), timeout=5)
    assert Reply.decode(wrong.data).code == 400


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
    page = (await rpc(bus, "get_metrics", GetMetrics(run_id="p", after_step=1, limit=1))).metrics
    assert [m.step for m in page] == [2]
    assert (await rpc(bus, "get_metrics", GetMetrics(run_id="p", after_step=3))).metrics == []
