"""The gateway's bounds, its reserved ids and its per-key rate limit, against a real nats-server
and store: each refusal is a 4xx with the reason, and nothing of a refused request is stored
or published."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from shared import subjects
from shared.apikeys import new_key
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.messages import AgentInfo
from services.cli.client import GatewayClient
from tests.support.gateway import client_of, issue_key, run_body, running_app, served
from tests.support.store import RunningStore

LIMITS: dict[str, Any] = {
    "max_rollouts_per_request": 64,
    "max_rollouts_per_run": 200,
    "max_dataset_rows": 50,
    "max_dataset_bytes": 4096,
    "max_run_config_bytes": 8192,
}


@pytest.fixture
async def app(settings: ServiceSettings, bus: Bus, sqlite_store: RunningStore) -> AsyncIterator[FastAPI]:
    kv = await bus.kv(subjects.KV_AGENTS)
    await kv.put("copy", AgentInfo(name="copy", worker_id="test").encode())
    async with running_app(settings, **LIMITS) as app:
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(app, await issue_key(app.state.store)) as c:
        yield c


async def published(bus: Bus) -> int:
    return (await bus.js.stream_info(subjects.STREAM_TASKS)).state.messages


def tasks(n: int, group_size: int, prefix: str = "t", **extra: Any) -> dict[str, Any]:
    return {"tasks": [{"agent": "copy", "input": {"i": i}, "group_size": group_size, "task_id": f"{prefix}{i}", **extra}
                      for i in range(n)]}  # fmt: skip


async def test_an_oversize_submission_is_refused_and_nothing_is_published(client: httpx.AsyncClient, bus: Bus):
    r = await client.post("/v1/tasks", json=tasks(5, 13))  # 65 rollouts > 64
    assert r.status_code == 413 and "65 rollouts" in r.json()["detail"] and "64" in r.json()["detail"]
    assert await published(bus) == 0
    assert (await client.get("/v1/tasks/t0")).status_code == 404  # nor stored
    assert (await client.post("/v1/tasks", json=tasks(4, 16))).status_code == 202  # 64: at the limit
    assert await published(bus) == 64


@pytest.mark.parametrize("task_id", ["ra-e0-r5", "victim-e12-r0", "ra-eval-v3-r0-0123456789"])
async def test_ids_in_a_runs_reserved_format_are_refused(client: httpx.AsyncClient, bus: Bus, task_id: str):
    """The pacer's own ids: a user's task under one would be taken for the run's (and stall it)."""
    assert (await client.post("/v1/runs", json=run_body("ra"))).status_code == 201
    before = await published(bus)
    r = await client.post("/v1/tasks", json={"agent": "copy", "input": {}, "task_id": task_id})
    assert r.status_code == 422 and "only the gateway makes" in r.json()["detail"]
    assert await published(bus) == before
    assert (await client.get(f"/v1/tasks/{task_id}")).status_code == 404


async def test_a_task_id_of_another_run_is_refused_whole(client: httpx.AsyncClient, bus: Bus):
    assert (await client.post("/v1/tasks", json=tasks(1, 1, prefix="mine"))).status_code == 202
    assert (await client.post("/v1/runs", json=run_body("rb"))).status_code == 201
    before = await published(bus)
    # The new task comes first: the refusal must still leave nothing of the request behind.
    body = {"tasks": [{"agent": "copy", "input": {}, "task_id": "fresh", "run_id": "rb"},
                      {"agent": "copy", "input": {}, "task_id": "mine0", "run_id": "rb"}]}  # fmt: skip
    r = await client.post("/v1/tasks", json=body)
    assert r.status_code == 409 and "belongs to another run" in r.json()["detail"]
    assert await published(bus) == before
    assert (await client.get("/v1/tasks/fresh")).status_code == 404
    assert (await client.get("/v1/tasks/mine0")).json()["run_id"] == "default"


async def test_dataset_caps(client: httpx.AsyncClient):
    many = await client.post("/v1/datasets", json={"name": "many", "rows": [{"i": i} for i in range(51)]})
    assert many.status_code == 413 and "51 rows" in many.json()["detail"]
    wide = await client.post("/v1/datasets", json={"name": "wide", "rows": [{"text": "x" * 5000}]})
    assert wide.status_code == 413 and "bytes" in wide.json()["detail"]
    inline = await client.post("/v1/runs", json=run_body("inline", rows=51))
    assert inline.status_code == 413 and "dataset has 51 rows" in inline.json()["detail"]
    for name in ("many", "wide"):
        assert (await client.post("/v1/runs", json={**run_body(name), "dataset": [], "dataset_name": name})).status_code == 400
    assert (await client.get("/v1/runs/inline")).status_code == 404


async def test_run_caps(client: httpx.AsyncClient, bus: Bus):
    big = await client.post("/v1/runs", json={**run_body("big"), "trained_roles": "a" * 9000})
    assert big.status_code == 413 and "run config is" in big.json()["detail"]
    # 12 rows x 6 epochs x group_size 3 = 216 rollouts > 200
    long = await client.post("/v1/runs", json=run_body("long", epochs=6))
    assert long.status_code == 413 and "216 rollouts" in long.json()["detail"]
    capped = await client.post("/v1/runs", json=run_body("capped", epochs=6, max_steps=2))  # (2+1+1) x 2 x 3 = 24
    assert capped.status_code == 201, capped.text
    for refused in ("big", "long"):
        assert (await client.get(f"/v1/runs/{refused}")).status_code == 404
        assert (await bus.js.stream_info(subjects.STREAM_TASKS, subjects_filter=subjects.tasks(refused))).state.messages == 0


async def test_a_key_over_its_rate_is_429_with_retry_after(settings: ServiceSettings, sqlite_store: RunningStore):
    async with running_app(settings, rate_per_s=0.5, rate_burst=3) as app:
        busy, calm = await issue_key(app.state.store), await issue_key(app.state.store)
        async with client_of(app, busy) as b, client_of(app, calm) as c:
            assert [(await b.get("/v1/runs")).status_code for _ in range(3)] == [200] * 3
            limited = await b.get("/v1/runs")
            assert limited.status_code == 429 and "rate limit" in limited.json()["detail"]
            assert int(limited.headers["retry-after"]) == 2  # one token at 0.5/s
            assert (await c.get("/v1/runs")).status_code == 200  # another key has its own bucket
            assert (await b.get("/healthz")).status_code == 200  # probes are not limited


async def test_a_client_sending_wrong_keys_is_limited_by_its_address(settings: ServiceSettings, sqlite_store: RunningStore):
    """Every wrong key costs the store a query: past the burst, the address is told to wait."""
    async with running_app(settings, rate_per_s=0.5, rate_burst=3) as app:
        async with client_of(app, new_key()[2]) as guessing:
            assert [(await guessing.get("/v1/runs")).status_code for _ in range(3)] == [401] * 3
            limited = await guessing.get("/v1/runs")
            assert limited.status_code == 429 and limited.headers["retry-after"]


async def test_the_cli_client_waits_out_a_429(settings: ServiceSettings, sqlite_store: RunningStore):
    async with served(settings, rate_per_s=2.0, rate_burst=1) as (app, url):
        client = GatewayClient(url, api_key=await issue_key(app.state.store))
        try:
            started = time.monotonic()
            assert await asyncio.to_thread(lambda: [client.runs(), client.runs()]) == [[], []]
            assert time.monotonic() - started >= 0.9  # the second call waited Retry-After (1 s)
        finally:
            client.close()

