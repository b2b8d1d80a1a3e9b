"""End to end through the real processes: nats-server, gateway, rollout workers, store, inference."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path
from typing import Iterator

import msgpack
import nats
import pytest

from services.cli.client import GatewayClient
from services.cli.stack import Stack, StackConfig

pytestmark = pytest.mark.e2e


def start_stack(tmp_path: Path, **kw) -> Stack:  # type: ignore[no-untyped-def]
    return Stack(StackConfig(state_dir=tmp_path / "stack", gateway_port=0, log_format="console", **kw)).start()


def stored_rollouts(stack: Stack) -> list[tuple[str, int, str]]:
    with sqlite3.connect(stack.state_dir / "relayrl.db") as db:
        return db.execute("SELECT rollout_id, attempt, worker_id FROM rollouts").fetchall()


async def rollout_acks_pending(stack: Stack) -> int:
    nc = await nats.connect(stack.admin_url)
    try:
        info = await nc.jetstream().consumer_info("TASKS", "rollout")
        return info.num_ack_pending
    finally:
        await nc.close()


@pytest.fixture
def null_stack(tmp_path: Path) -> Iterator[Stack]:
    """Three rollout replicas and no inference: the null agent needs no model."""
    stack = start_stack(tmp_path, rollout_replicas=3, inference_replicas=0, rollout_ack_wait_s=3.0)
    yield stack
    stack.stop()


def test_three_replicas_share_300_requests_exactly_once(null_stack: Stack):
    client = GatewayClient(null_stack.gateway_url, api_key=null_stack.api_key)
    accepted = client.submit([{"agent": "null", "input": {"size_bytes": 512}, "group_size": 3} for _ in range(100)])
    views = client.wait([t["task_id"] for t in accepted], timeout_s=120)
    assert all(v["status"] == "done" and len(v["rollouts"]) == 3 for v in views.values())
    rows = stored_rollouts(null_stack)
    ids = [r[0] for r in rows]
    assert len(ids) == 300 and len(set(ids)) == 300
    expected = {rid for t in accepted for rid in t["rollout_ids"]}
    assert set(ids) == expected
    workers = {r[2] for r in rows}
    assert workers == {"rollout-1", "rollout-2", "rollout-3"}, "all replicas should take a share"
    assert all(r[1] == 1 for r in rows)  # nobody died: first attempts only


def test_worker_killed_mid_task_is_redelivered_and_completes_once(null_stack: Stack):
    client = GatewayClient(null_stack.gateway_url, api_key=null_stack.api_key)
    # Stop two replicas so the long task surely lands on the one we kill.
    for name in ("rollout-2", "rollout-3"):
        null_stack.service(name).signal(signal.SIGTERM)
        assert null_stack.service(name).wait(30)
    (task,) = client.submit([{"agent": "null", "input": {"sleep_s": 2.0}, "task_id": "slow"}])
    victim = null_stack.service("rollout-1")
    deadline = time.monotonic() + 20
    while asyncio.run(rollout_acks_pending(null_stack)) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # wait until a worker holds the task
    victim.signal(signal.SIGKILL)  # mid-task: it sleeps 2 s before publishing
    victim.wait(10)
    assert client.task("slow")["status"] == "pending"
    null_stack.add_rollout("rollout-4")
    view = client.wait(["slow"], timeout_s=60)["slow"]
    assert view["status"] == "done"
    (rollout,) = view["rollouts"]
    assert rollout["attempt"] == 2 and rollout["worker_id"] == "rollout-4"
    assert [r[0] for r in stored_rollouts(null_stack)] == ["slow.0"]


def test_malformed_rollout_request_is_dead_lettered_and_workers_keep_serving(null_stack: Stack):
    async def publish_garbage() -> None:
        nc = await nats.connect(null_stack.admin_url)
        js = nc.jetstream()
        await js.publish("relayrl.tasks.default", msgpack.packb({"rollout_id": 1}))
        await nc.close()

    asyncio.run(publish_garbage())
    client = GatewayClient(null_stack.gateway_url, api_key=null_stack.api_key)
    (task,) = client.submit([{"agent": "null", "input": {}, "task_id": "after-garbage"}])
    assert client.wait(["after-garbage"], timeout_s=60)["after-garbage"]["status"] == "done"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with sqlite3.connect(null_stack.state_dir / "relayrl.db") as db:
            rows = db.execute("SELECT stream, reason FROM dead_letters").fetchall()
        if rows:
            break
        time.sleep(0.1)
    assert rows and rows[0][0] == "TASKS" and "invalid RolloutRequest" in rows[0][1]


@pytest.fixture
def model_stack(tmp_path: Path) -> Iterator[Stack]:
    """The whole pipeline with the tiny model: gateway, 2 rollout workers, store, inference."""
    stack = start_stack(tmp_path, rollout_replicas=2, inference_replicas=1)
    yield stack
    stack.stop()


def test_twenty_tasks_over_http_come_back_with_tokens_logprobs_versions_rewards(model_stack: Stack):
    client = GatewayClient(model_stack.gateway_url, api_key=model_stack.api_key)
    words = ["apple", "river", "stone", "cloud", "maple", "ember", "frost", "grain", "heron", "ivory",
             "jewel", "koala", "lemon", "mango", "noble", "ocean", "pearl", "quilt", "raven", "solar"]
    accepted = client.submit(
        [{"agent": "copy", "input": {"text": w}, "sampling": {"max_tokens": 8, "seed": i}} for i, w in enumerate(words)]
    )
    assert len(accepted) == 20
    views = client.wait([t["task_id"] for t in accepted], timeout_s=240)
    rollout_ids = [r["rollout_id"] for v in views.values() for r in v["rollouts"]]
    assert len(rollout_ids) == 20
    for rid in rollout_ids:
        t = client.rollout(rid)
        assert t["status"] == "ok", t["error"]
        assert 0.0 <= t["reward"] <= 1.0
        assert t["trace_id"] and len(t["trace_id"]) == 32
        (x,) = t["transitions"]
        assert len(x["prompt_ids"]) > 0 and len(x["response_ids"]) > 0
        assert len(x["response_logprobs"]) == len(x["response_ids"]) == len(x["response_versions"])
        assert all(lp <= 0.0 for lp in x["response_logprobs"])
        assert set(x["response_versions"]) == {0}
        assert x["finish_reason"] in ("stop", "length")
