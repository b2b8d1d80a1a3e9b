"""The trainer service as a real process against a real nats-server and store.

Trajectories are published the way rollout workers publish them; the store assembles groups;
the trainer (`python -m services.trainer`) trains them. Covered: drops, SIGKILL + restart
(no group trained twice, none lost), and replay reproducing the final weights bit for bit.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import pytest
import torch

from shared import subjects
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.messages import (
    GetById,
    GetMetrics,
    PutRun,
    ReplayRequest,
    RunConfig,
    RunView,
    StepMetrics,
    Trajectory,
    Transition,
    pack_f32,
    pack_i32,
)
from shared.store_api import RPCS, StoreClient
from shared.weights import latest_policy, load_state_dict, read_weights
from services.store.settings import StoreSettings
from tests.support.store import RunningStore
from tests.support.trainer import TrainerProcess
from tests.support.streams import read_stream, stream_messages
from tests.support.waiting import wait_until

GROUP_SIZE = 4


@pytest.fixture
async def store(settings: ServiceSettings, sqlite_url: str) -> AsyncIterator[RunningStore]:
    st = await RunningStore(StoreSettings(nats_url=settings.nats_url, database_url=sqlite_url)).start()
    yield st
    if not st.task.done():
        await st.stop()
    await st.engine.dispose()


def run_config(run_id: str, rows: int, **training: object) -> RunConfig:
    base: dict[str, object] = dict(batch_size=2, group_size=GROUP_SIZE, learning_rate=1e-3, epochs=1)
    base.update(training)
    return RunConfig(
        run_id=run_id, agent="copy", dataset=[{"i": i} for i in range(rows)], training=base, max_staleness=1000, seed=7
    )


async def rpc(bus: Bus, method: str, msg) -> object:  # type: ignore[no-untyped-def]
    """One store RPC by name through the typed client (raises on a refusal)."""
    return await StoreClient(bus, timeout_s=10).call({r.method: r for r in RPCS}[method], msg)


def trajectories(run_id: str, task: int, rewards: list[float]) -> list[Trajectory]:
    """One group: a shared prompt, a different 6-token response per member, versions 0."""
    rng = np.random.default_rng(task)
    prompt = rng.integers(3, 500, size=10)
    out = []
    for i, reward in enumerate(rewards):
        response = rng.integers(3, 500, size=6)
        out.append(
            Trajectory(
                rollout_id=f"{run_id}-t{task}.{i}", run_id=run_id, task_id=f"{run_id}-t{task}", group_id=f"{run_id}-t{task}",
                sample_index=i, group_size=len(rewards), agent="copy", status="ok", reward=reward,
                transitions=[Transition(
                    prompt_ids=pack_i32(prompt), response_ids=pack_i32(response),
                    response_logprobs=pack_f32(np.full(6, -6.0)), response_versions=pack_i32(np.zeros(6)),
                )],
                started_at=time.time(), finished_at=time.time(), worker_id="test",
            )
        )  # fmt: skip
    return out


def rewards_for(task: int) -> list[float]:
    # Every fifth group has zero variance: the trainer must drop it and count it.
    return [0.5] * GROUP_SIZE if task % 5 == 4 else [float((task + i) % 2) for i in range(GROUP_SIZE)]


async def publish_groups(bus: Bus, run_id: str, tasks: range) -> None:
    for task in tasks:
        for t in trajectories(run_id, task, rewards_for(task)):
            await bus.publish(subjects.trajectories(run_id), t, t.msg_id())


async def metrics(bus: Bus, run_id: str) -> list[StepMetrics]:
    return (await rpc(bus, "get_metrics", GetMetrics(run_id=run_id))).metrics or []  # type: ignore[attr-defined]


async def run_view(bus: Bus, run_id: str) -> RunView:
    return (await rpc(bus, "get_run", GetById(id=run_id))).run  # type: ignore[attr-defined]


async def wait_for(pred, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not await pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


def trained_ids(steps: list[StepMetrics]) -> list[str]:
    return [g for m in steps for g in m.group_ids]


async def test_trainer_survives_sigkill_without_retraining_or_losing_groups(
    store: RunningStore, bus: Bus, nats_url: str, tmp_path: Path
) -> None:
    run_id, rows = "killed", 15
    await rpc(bus, "put_run", PutRun(config=run_config(run_id, rows, batch_size=3), rows=rows))
    trainer = TrainerProcess(nats_url, tmp_path, run_id)
    await publish_groups(bus, run_id, range(0, 8))  # 2 full steps + held groups of a partial third

    async def two_steps() -> bool:
        return len(await metrics(bus, run_id)) >= 2

    await wait_for(two_steps, 120, "two steps before the kill")
    await asyncio.sleep(0.5)  # let it take the remaining groups into its next (partial) batch
    await trainer.kill()
    await publish_groups(bus, run_id, range(8, rows))
    assert await TrainerProcess(nats_url, tmp_path, run_id).wait(120) == 0

    steps = await metrics(bus, run_id)
    ids = trained_ids(steps)
    expected = {f"{run_id}-t{t}" for t in range(rows) if t % 5 != 4}
    assert len(ids) == len(set(ids)), "a group was trained twice"
    assert set(ids) == expected, f"lost: {expected - set(ids)}"
    dropped = {g for m in steps for g in m.dropped}
    assert dropped <= {f"{run_id}-t{t}" for t in range(rows) if t % 5 == 4}
    assert [m.step for m in steps] == list(range(1, len(steps) + 1))
    assert (await run_view(bus, run_id)).state == "finished"
    assert "resumed from checkpoint" in (tmp_path / f"trainer-{run_id}.log").read_text()


async def test_replay_into_a_fresh_trainer_reproduces_the_final_weights_bit_for_bit(
    store: RunningStore, bus: Bus, nats_url: str, tmp_path: Path
) -> None:
    run_id, rows = "original", 10
    config = run_config(run_id, rows)
    await rpc(bus, "put_run", PutRun(config=config, rows=rows))
    await publish_groups(bus, run_id, range(rows))
    assert await TrainerProcess(nats_url, tmp_path, run_id).wait(120) == 0
    original = await metrics(bus, run_id)
    assert original and (await run_view(bus, run_id)).state == "finished"

    replay = config.model_copy(update={"run_id": "replayed", "mode": "replay"})
    await rpc(bus, "put_run", PutRun(config=replay, rows=rows))
    reply = await rpc(bus, "replay", ReplayRequest(run_id=run_id, into="replayed"))
    assert reply.stored == len(trained_ids(original))  # type: ignore[attr-defined]
    assert await TrainerProcess(nats_url, tmp_path, "replayed").wait(120) == 0

    replayed = await metrics(bus, "replayed")
    # The original's last group (zero variance) was dropped alone: a final step without an
    # update records it. Replay re-publishes trained groups only.
    assert original[-1].group_ids == [] and list(original[-1].dropped) == [f"{run_id}-t9"]
    assert [m.group_ids for m in replayed] == [m.group_ids for m in original[:-1]]
    a, b = await latest_policy(bus, run_id), await latest_policy(bus, "replayed")
    assert a is not None and b is not None and b.version == len(replayed) and a.version == len(original)
    # Bit for bit (the files differ only in the version their header names).
    wa, wb = load_state_dict(await read_weights(bus, a)), load_state_dict(await read_weights(bus, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # The weights did change: the final version differs from the initial one.
    assert original[-2].values["grad_norm"] > 0


async def test_a_store_outage_pauses_the_trainer_and_never_fails_the_run(
    store: RunningStore, bus: Bus, nats_url: str, tmp_path: Path
) -> None:
    """The store stops mid-run (its RPCs get no responders, its consumers stop): the trainer
    waits and logs what it waits for; once a store is back on the same database the run
    finishes with every group trained once."""
    run_id, rows = "outage", 12
    await rpc(bus, "put_run", PutRun(config=run_config(run_id, rows, batch_size=3), rows=rows))
    trainer = TrainerProcess(nats_url, tmp_path, run_id)
    await publish_groups(bus, run_id, range(0, 8))  # 2 steps (group 4 has zero variance) + 1 held

    async def two_steps() -> bool:
        return len(await metrics(bus, run_id)) >= 2

    await wait_for(two_steps, 120, "two steps before the outage")
    await store.stop()
    await publish_groups(bus, run_id, range(8, rows))  # kept by the stream until a store is back
    await asyncio.sleep(4.0)  # dozens of the trainer's run-state checks fail meanwhile
    assert trainer.proc.poll() is None, "the trainer exited during a store outage"
    back = await RunningStore(store.settings).start()
    try:
        assert await trainer.wait(120) == 0
        steps = await metrics(bus, run_id)
        ids = trained_ids(steps)
        assert len(ids) == len(set(ids)), "a group was trained twice"
        assert set(ids) == {f"{run_id}-t{t}" for t in range(rows) if t % 5 != 4}
        assert [m.step for m in steps] == list(range(1, len(steps) + 1))
        assert (await run_view(bus, run_id)).state == "finished"
        assert "run failed" not in trainer.log.read_text()
    finally:
        await back.stop()
        await back.engine.dispose()


def long_agent_group(run_id: str, task: int, size: int, turns: int, start: int) -> list[Trajectory]:
    """A multi-turn agent's group: each call's prompt extends the previous context (prompt +
    response + a 20-token tool result), so the trainer merges each rollout into one sample."""
    rng = np.random.default_rng(1000 + task)
    out = []
    for i in range(size):
        context = list(rng.integers(3, 500, size=start))
        calls = []
        for _ in range(turns):
            response = list(rng.integers(3, 500, size=10))
            calls.append(Transition(
                prompt_ids=pack_i32(context), response_ids=pack_i32(response),
                response_logprobs=pack_f32(np.full(10, -6.0)), response_versions=pack_i32(np.zeros(10)),
            ))  # fmt: skip
            context = context + response + list(rng.integers(3, 500, size=20))
        out.append(Trajectory(
            rollout_id=f"{run_id}-t{task}.{i}", run_id=run_id, task_id=f"{run_id}-t{task}", group_id=f"{run_id}-t{task}",
            sample_index=i, group_size=size, agent="copy", status="ok", reward=float(i % 2), transitions=calls,
            started_at=time.time(), finished_at=time.time(), worker_id="test",
        ))  # fmt: skip
    return out


async def test_groups_too_big_for_one_message_are_trained_by_reference(tmp_path: Path, sqlite_url: str) -> None:
    """On a server with a 1 MB max_payload, 20-call groups of 8 (~1.2 MB each) reach GROUPS as
    references; the trainer fetches their members from the store and trains every one."""
    from services.cli.nats_server import NatsServer
    from shared.faults import StoreUnavailable
    from shared.messages import Group, GroupRef, decode_group

    server = NatsServer(store_dir=tmp_path / "nats1mb", max_payload_mb=1).start(log_file=tmp_path / "nats1mb.log")
    bus = await Bus.connect(ServiceSettings(nats_url=server.url, log_format="console"), "test")
    await bus.ensure_topology()
    st = await RunningStore(StoreSettings(nats_url=server.url, database_url=sqlite_url)).start()
    try:
        run_id, rows, size = "bigref", 4, 8
        config = run_config(run_id, rows, batch_size=2, group_size=size, micro_batch_tokens=4096)
        for _ in range(100):  # the store registers its RPCs as its task starts
            try:
                await StoreClient(bus, timeout_s=10).put_run(config, rows)
                break
            except StoreUnavailable:
                await asyncio.sleep(0.1)
        for task in range(rows):
            for t in long_agent_group(run_id, task, size, turns=20, start=1500):
                await bus.publish(subjects.trajectories(run_id), t, t.msg_id())

        async def sent() -> list[GroupRef | Group] | None:  # read, not consumed: they wait for the trainer
            msgs = await read_stream(bus, subjects.STREAM_GROUPS, subjects.groups(run_id))
            return [decode_group(m.data) for m in msgs] if len(msgs) == rows else None

        assert all(isinstance(g, GroupRef) for g in await wait_until(sent, timeout_s=60))
        assert await TrainerProcess(server.url, tmp_path, run_id).wait(300) == 0

        steps = await metrics(bus, run_id)
        assert sorted(trained_ids(steps)) == [f"{run_id}-t{t}" for t in range(rows)]
        assert [m.step for m in steps] == [1, 2] and all(m.values["samples"] == 2 * size for m in steps)
        # The trainer consumed every group (GROUPS is a work queue); what it was sent is in its log.
        assert await stream_messages(bus, subjects.STREAM_GROUPS, subjects.groups(run_id)) == 0
    finally:
        await st.stop()
        await st.engine.dispose()
        await bus.close()
        server.stop()


async def test_a_reference_the_store_cannot_resolve_is_dropped_and_the_run_finishes(
    store: RunningStore, bus: Bus, nats_url: str, tmp_path: Path
) -> None:
    """A GroupRef whose members the store does not have can never be trained: the trainer
    dead-letters it with the reason and counts it as dropped, so the run still ends by data."""
    from shared.messages import GroupRef

    run_id, rows = "badref", 5
    await rpc(bus, "put_run", PutRun(config=run_config(run_id, rows, batch_size=2), rows=rows))
    await publish_groups(bus, run_id, range(4))  # t0..t3 (all with variance)
    ghost = GroupRef(run_id=run_id, group_id=f"{run_id}-ghost", task_id=f"{run_id}-ghost", size=GROUP_SIZE)
    await bus.publish(subjects.groups(run_id), ghost, f"group:{ghost.group_id}")
    assert await TrainerProcess(nats_url, tmp_path, run_id).wait(120) == 0

    steps = await metrics(bus, run_id)
    assert sorted(trained_ids(steps)) == [f"{run_id}-t{t}" for t in range(4)]
    dropped = {g: r for m in steps for g, r in m.dropped.items()}
    assert list(dropped) == [ghost.group_id] and dropped[ghost.group_id].startswith("bad data:")
    assert (await run_view(bus, run_id)).state == "finished"


def test_a_trainer_without_the_weights_key_refuses_to_start(tmp_path: Path) -> None:
    """It could not sign what it publishes, and replicas would refuse it all: it never takes a run."""
    env = {k: v for k, v in os.environ.items() if k != "RELAYRL_WEIGHTS_KEY"}
    proc = subprocess.run(
        [sys.executable, "-m", "services.trainer", "--checkpoint-dir", str(tmp_path), "--log-format", "console"],
        env={**env, "NATS_URL": "nats://127.0.0.1:1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "weights_key is not set" in proc.stderr and "RELAYRL_WEIGHTS_KEY" in proc.stderr
