"""The HTTP API against a real nats-server and a real store: validation, limits, submission, reads."""

from typing import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from shared import subjects
from shared.apikeys import new_key
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.messages import AgentInfo
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from tests.support.gateway import authenticated, bearer
from tests.support.store import RunningStore


@pytest.fixture
async def app(settings: ServiceSettings, bus: Bus) -> AsyncIterator[FastAPI]:
    kv = await bus.kv(subjects.KV_AGENTS)
    await kv.put("null", AgentInfo(name="null", worker_id="test").encode())
    app = create_app(GatewaySettings(nats_url=settings.nats_url, max_body_bytes=64 * 1024, store_timeout_s=2.0))
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI, sqlite_store: RunningStore) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway with an admin key, the store serving."""
    async with authenticated(app) as c:
        yield c


@pytest.fixture
async def storeless(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway with no store serving, sending a well-formed key nobody can verify."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway", headers=bearer(new_key()[2])
    ) as c:
        yield c


async def test_malformed_json_is_400(client: httpx.AsyncClient):
    r = await client.post("/v1/tasks", content=b'{"agent": "null", ', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["detail"][0]["type"] == "json_invalid"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"agent": "null", "input": {}, "group_size": "many"}, "group_size"),
        ({"agent": "null", "input": "not an object"}, "input"),
        ({"agent": "null"}, "input"),
        ({"agent": "null", "input": {}, "group_size": 0}, "group_size"),
        ({"agent": "null", "input": {}, "run_id": "has.dots"}, "run_id"),
        ({"agent": "null", "input": {}, "sampling": {"temperature": -1}}, "temperature"),
        ({"agent": "null", "input": {}, "unknown_field": 1}, "unknown_field"),
        ({"tasks": []}, "tasks"),
        ({"tasks": [{"agent": "null", "input": {}, "timeout_s": "soon"}]}, "timeout_s"),
        ([1, 2, 3], ""),
    ],
)
async def test_wrong_fields_are_422_with_reason(client: httpx.AsyncClient, body, field):
    r = await client.post("/v1/tasks", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail and all("msg" in d for d in detail)
    assert field in str([d["loc"] for d in detail])


async def test_unknown_agent_is_400(client: httpx.AsyncClient):
    r = await client.post("/v1/tasks", json={"agent": "nope", "input": {}})
    assert r.status_code == 400
    assert "unknown agent" in r.json()["detail"] and "null" in r.json()["detail"]


async def test_an_agent_registered_after_a_miss_is_accepted_at_once(client: httpx.AsyncClient, bus: Bus):
    """A miss is never served from the agent cache: a worker that registers right after the
    gateway looked (a stack starting up) is seen by the next request, not after the cache expires."""
    r = await client.post("/v1/tasks", json={"agent": "late", "input": {}})
    assert r.status_code == 400 and "unknown agent" in r.json()["detail"]
    kv = await bus.kv(subjects.KV_AGENTS)
    await kv.put("late", AgentInfo(name="late", worker_id="test").encode())
    r = await client.post("/v1/tasks", json={"agent": "late", "input": {}})
    assert r.status_code != 400, r.text


async def test_oversized_body_is_413(client: httpx.AsyncClient):
    big = {"agent": "null", "input": {"blob": "x" * 70_000}}
    r = await client.post("/v1/tasks", json=big)
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]

    async def chunks():  # no content-length: counted while streaming
        for _ in range(20):
            yield b"x" * 8192

    r = await client.post("/v1/tasks", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


async def test_store_down_is_503_not_500(storeless: httpx.AsyncClient):
    """Not 401 either: a key the store cannot check now is an outage, not the caller's fault."""
    r = await storeless.get("/v1/tasks/abc")
    assert r.status_code == 503 and "store" in r.json()["detail"] and r.headers.get("retry-after")
    assert (await storeless.get("/readyz")).status_code == 503
    assert (await storeless.get("/healthz")).status_code == 200


async def test_submit_publishes_requests_and_reads_back(client: httpx.AsyncClient, sqlite_store: RunningStore, bus: Bus):
    assert (await client.get("/readyz")).status_code == 200
    r = await client.post(
        "/v1/tasks",
        json={"tasks": [{"agent": "null", "input": {"i": i}, "group_size": 3, "task_id": f"t{i}"} for i in range(4)]},
    )
    assert r.status_code == 202, r.text
    accepted = r.json()["tasks"]
    assert [t["rollout_ids"] for t in accepted][0] == ["t0.0", "t0.1", "t0.2"]
    assert (await bus.js.stream_info(subjects.STREAM_TASKS)).state.messages == 12
    # Retrying the same request creates nothing twice (stored once, stream dedupes by msg id).
    assert (await client.post("/v1/tasks", json={"tasks": [{"agent": "null", "input": {"i": 0}, "group_size": 3, "task_id": "t0"}]})).status_code == 202
    assert (await bus.js.stream_info(subjects.STREAM_TASKS)).state.messages == 12
    task = (await client.get("/v1/tasks/t1")).json()
    assert task["status"] == "pending" and task["group_size"] == 3 and task["input"] == {"i": 1}
    assert (await client.get("/v1/tasks/missing")).status_code == 404
    assert (await client.get("/v1/rollouts/t1.0")).status_code == 404


async def test_duplicate_task_ids_in_one_request_are_422(client: httpx.AsyncClient, sqlite_store: RunningStore):
    body = {"tasks": [{"agent": "null", "input": {}, "task_id": "dup"}, {"agent": "null", "input": {}, "task_id": "dup"}]}
    r = await client.post("/v1/tasks", json=body)
    assert r.status_code == 422 and "unique" in r.json()["detail"]


async def test_a_full_task_stream_is_503_with_retry_after_and_the_retry_is_accepted(
    client: httpx.AsyncClient, sqlite_store: RunningStore, bus: Bus
):
    """TASKS at its byte bound refuses the publish (`discard: new`): the caller is told to come
    back, and once workers consumed what was queued, the same request goes through."""
    def body(i: int) -> dict:
        return {"tasks": [{"agent": "null", "input": {"i": i}, "group_size": 4, "task_id": f"full{i}"}]}

    assert (await client.post("/v1/tasks", json=body(0))).status_code == 202
    info = await bus.js.stream_info(subjects.STREAM_TASKS)
    info.config.max_bytes = info.state.bytes + 64  # no room for another request
    await bus.js.update_stream(info.config)

    r = await client.post("/v1/tasks", json=body(1))
    assert r.status_code == 503 and r.headers.get("retry-after"), r.text
    await bus.js.purge_stream(subjects.STREAM_TASKS)  # what a worker taking the queue does
    r = await client.post("/v1/tasks", json=body(1))  # the client's retry
    assert r.status_code == 202, r.text
    assert (await bus.js.stream_info(subjects.STREAM_TASKS)).state.messages == 4
