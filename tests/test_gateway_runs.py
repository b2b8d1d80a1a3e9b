"""Training runs over HTTP with a real nats-server and store: validation, pacing, lease, states.

No trainer runs here: the test plays the trainer by writing its progress into the policy KV,
which is exactly what pacing reads.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx
import pytest

from shared import subjects
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.messages import AgentInfo, TrainerProgress
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from services.store.settings import StoreSettings
from tests.test_store import RunningStore


@pytest.fixture
async def store(settings: ServiceSettings, sqlite_url: str) -> AsyncIterator[RunningStore]:
    st = await RunningStore(StoreSettings(nats_url=settings.nats_url, database_url=sqlite_url)).start()
    yield st
    await st.stop()
    await st.engine.dispose()


@asynccontextmanager
async def gateway(settings: ServiceSettings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewaySettings(nats_url=settings.nats_url, store_timeout_s=5.0, pace_interval_s=0.05))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as c:
            yield c


@pytest.fixture
async def client(settings: ServiceSettings, bus: Bus, store: RunningStore) -> AsyncIterator[httpx.AsyncClient]:
    kv = await bus.kv(subjects.KV_AGENTS)
    await kv.put("copy", AgentInfo(name="copy", worker_id="test").encode())
    async with gateway(settings) as c:
        yield c


def run_body(run_id: str = "r1", rows: int = 12, **training: Any) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "model": "tiny",
        "agent": "copy",
        "algorithm": "grpo",
        "dataset": [{"text": f"w{i}"} for i in range(rows)],
        "training": {"learning_rate": 1e-3, "batch_size": 2, "group_size": 3, "epochs": 1, **training},
        "runtime": {"nworkers": 2},
        "max_staleness": 1,
    }


async def queued_requests(bus: Bus, run_id: str) -> int:
    info = await bus.js.stream_info(subjects.STREAM_TASKS, subjects_filter=subjects.tasks(run_id))
    return sum((info.state.subjects or {}).values())


async def settle(bus: Bus, run_id: str, expected: int, timeout_s: float = 10.0) -> int:
    """Wait until the queue holds `expected` requests, then a little longer to see it stays there."""
    deadline = time.monotonic() + timeout_s
    while await queued_requests(bus, run_id) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    return await queued_requests(bus, run_id)


async def consume(bus: Bus, run_id: str, groups: int) -> None:
    kv = await bus.kv(subjects.KV_POLICY)
    progress = TrainerProgress(run_id=run_id, step=groups // 2, version=groups // 2, groups_consumed=groups)
    await kv.put(subjects.progress_key(run_id), progress.encode())


@pytest.mark.parametrize(
    "change, status, reason",
    [
        ({"training": {"learning_rate": -0.1}}, 422, "learning_rate"),
        ({"training": {"group_size": 1}}, 422, "group_size 1"),
        ({"training": {"policy_loss": "made_up"}}, 422, "unknown policy_loss"),
        ({"agent": "nobody"}, 400, "unknown agent"),
        ({"algorithm": "ppo"}, 422, "algorithm"),
        ({"dataset": []}, 422, "dataset"),
        ({"dataset": [], "dataset_name": "missing"}, 400, "unknown dataset"),
        ({"max_staleness": -1}, 422, "max_staleness"),
        ({"run_id": "has.dot"}, 422, "run_id"),
    ],
)
async def test_bad_run_configs_are_refused_with_a_reason(client: httpx.AsyncClient, change, status, reason):
    body = run_body()
    for key, value in change.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) else value
    r = await client.post("/v1/runs", json=body)
    assert r.status_code == status, r.text
    assert reason in r.text
    assert (await client.get("/v1/runs")).json() == []


async def test_pacing_follows_the_admission_rule(client: httpx.AsyncClient, bus: Bus):
    r = await client.post("/v1/runs", json=run_body(rows=12))
    assert r.status_code == 201, r.text
    view = r.json()
    assert view["state"] == "running" and view["rows"] == 12 and view["total_steps"] == 6
    # (eta + 1) x batch = 4 groups of 3 requests before the trainer consumed anything.
    assert await settle(bus, "r1", 12) == 12
    await consume(bus, "r1", 2)
    assert await settle(bus, "r1", 18) == 18
    await consume(bus, "r1", 12)
    assert await settle(bus, "r1", 36) == 36  # every row once, nothing more
    run = (await client.get("/v1/runs/r1")).json()
    assert run["cursor"]["groups_published"] == 12 and run["cursor"]["done"]
    assert run["groups_consumed"] == 12 and run["step"] == 6


async def test_same_config_is_idempotent_and_another_is_409(client: httpx.AsyncClient):
    assert (await client.post("/v1/runs", json=run_body())).status_code == 201
    assert (await client.post("/v1/runs", json=run_body())).status_code == 201
    r = await client.post("/v1/runs", json=run_body(learning_rate=0.5))
    assert r.status_code == 409 and "training" in r.text


async def test_pause_resume_cancel(client: httpx.AsyncClient, bus: Bus):
    await client.post("/v1/runs", json=run_body(rows=12))
    assert await settle(bus, "r1", 12) == 12
    assert (await client.post("/v1/runs/r1/pause")).json()["state"] == "paused"
    await consume(bus, "r1", 4)
    assert await settle(bus, "r1", 13, timeout_s=1.0) == 12  # paused: nothing new
    r = await client.post("/v1/runs/r1/pause")
    assert r.status_code == 409 and "paused" in r.text
    assert (await client.post("/v1/runs/r1/resume")).json()["state"] == "running"
    assert await settle(bus, "r1", 24) == 24
    assert (await client.post("/v1/runs/r1/cancel")).json()["state"] == "cancelled"
    assert await queued_requests(bus, "r1") == 0  # queued work of a cancelled run is dropped
    assert (await client.post("/v1/runs/r1/resume")).status_code == 409
    assert (await client.post("/v1/runs/nope/pause")).status_code == 404


async def test_a_restarted_gateway_resumes_from_the_cursor_and_two_never_pace_one_run(
    client: httpx.AsyncClient, bus: Bus, settings: ServiceSettings
):
    async with gateway(settings) as second:
        await client.post("/v1/runs", json=run_body(rows=12))
        assert await settle(bus, "r1", 12) == 12
        await consume(bus, "r1", 4)
        # Two gateways pace concurrently; the lease lets only one publish, and task ids dedupe.
        assert await settle(bus, "r1", 24) == 24
        assert (await second.get("/v1/runs/r1")).json()["cursor"]["groups_published"] == 8
    async with gateway(settings) as third:
        await consume(bus, "r1", 12)
        assert await settle(bus, "r1", 36) == 36
        assert (await third.get("/v1/runs/r1")).json()["cursor"]["done"]


async def test_datasets_by_name(client: httpx.AsyncClient, bus: Bus):
    r = await client.post("/v1/datasets", json={"name": "words", "rows": [{"text": "a"}, {"text": "b"}]})
    assert r.status_code == 201 and r.json()["rows"] == 2
    body = run_body()
    body["dataset"], body["dataset_name"] = [], "words"
    r = await client.post("/v1/runs", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["rows"] == 2
    assert await settle(bus, "r1", 6) == 6


async def test_metrics_and_replay_of_an_untrained_run(client: httpx.AsyncClient):
    await client.post("/v1/runs", json=run_body())
    assert (await client.get("/v1/runs/r1/metrics")).json() == []
    assert (await client.get("/v1/runs/missing/metrics")).status_code == 404
    r = await client.post("/v1/runs/r1/replay", json={})
    assert r.status_code == 404, r.text
