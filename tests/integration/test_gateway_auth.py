"""API keys and tenancy over HTTP, against a real nats-server and a real store.

The authorization matrix takes its routes from the app's OpenAPI schema, so a route added
later without an entry in `EXPECTED` fails here: every route x {no key, a key of too weak a
scope, a key of another project, the right key}. Then: revocation within the key cache time,
the bootstrap key file, and keys never showing in responses or logs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from shared import subjects
from shared.apikeys import SCOPES, Scope, new_key
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.messages import AgentInfo
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from tests.support.factories import make_trajectory
from tests.support.gateway import client_of, issue_key, run_body, running_app
from tests.support.store import RunningStore
from tests.support.waiting import wait_until

OPEN = {("GET", "/healthz"), ("GET", "/readyz")}


def routes() -> list[tuple[str, str]]:
    """Every (method, path) the gateway serves, from its OpenAPI schema (no NATS needed)."""
    schema = create_app(GatewaySettings()).openapi()
    return sorted((m.upper(), p) for p, ops in schema["paths"].items() for m in ops if (m.upper(), p) not in OPEN)


@dataclass
class Call:
    """How to call a route on project A's objects; what the right key gets; what a key of
    project B gets (404 as for a missing object, or a listing without A's objects)."""

    path: str
    ok: int
    body: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    other: int = 404
    ok_detail: str | None = None  # for an ok that is an error of the object itself, not of access
    other_detail: str | None = "not found"


# Project A's objects (made by the `world` fixture): run "ra", task "ta" (rollout "ta.0"),
# dataset "da", key "spare" (revoked by the DELETE case).
EXPECTED: dict[tuple[str, str], Call] = {
    ("POST", "/v1/tasks"): Call("/v1/tasks", 202, body={"agent": "copy", "input": {}, "run_id": "ra"}),
    ("GET", "/v1/tasks/{task_id}"): Call("/v1/tasks/ta", 200),
    ("GET", "/v1/rollouts/{rollout_id}"): Call("/v1/rollouts/ta.0", 200),
    # Dataset names are global: another project's name is taken (409), its rows never shown.
    ("POST", "/v1/datasets"): Call("/v1/datasets", 201, body={"name": "da", "rows": [{"text": "a"}]}, other=409,
                                   other_detail="taken"),
    # Another project's dataset is as unknown as a missing one.
    ("POST", "/v1/runs"): Call("/v1/runs", 201, body={**run_body("rb"), "dataset": [], "dataset_name": "da"},
                               other=400, other_detail="unknown dataset"),
    ("GET", "/v1/runs"): Call("/v1/runs", 200, other=200, other_detail=None),
    ("GET", "/v1/runs/{run_id}"): Call("/v1/runs/ra", 200),
    ("GET", "/v1/runs/{run_id}/metrics"): Call("/v1/runs/ra/metrics", 200),
    ("POST", "/v1/runs/{run_id}/replay"): Call("/v1/runs/ra/replay", 404, body={}, ok_detail="no stored training steps"),
    ("POST", "/v1/runs/{run_id}/evals"): Call("/v1/runs/ra/evals", 202, body={"rows": [{"text": "e"}]}),
    ("GET", "/v1/runs/{run_id}/evals"): Call("/v1/runs/ra/evals", 200),
    ("POST", "/v1/runs/{run_id}/{action}"): Call("/v1/runs/ra/pause", 200),
    ("GET", "/v1/runs/{run_id}/weights"): Call("/v1/runs/ra/weights", 404, ok_detail="no published weights"),
    # An admin of another project manages only its own project's keys.
    ("POST", "/v1/keys"): Call("/v1/keys", 201, body={"name": "k", "scope": "read", "project": "default"}, other=403,
                               other_detail="manages only"),
    ("GET", "/v1/keys"): Call("/v1/keys", 200, other=200, other_detail=None),
    ("DELETE", "/v1/keys/{key_id}"): Call("/v1/keys/{spare}", 200),
}


def needed(method: str, path: str) -> Scope:
    return "admin" if path.startswith("/v1/keys") else ("read" if method == "GET" else "write")


@dataclass
class World:
    app: FastAPI
    keys: dict[str, str]  # "<project>:<scope>" -> key text
    spare: str  # key id of project A's key the DELETE case revokes


@pytest.fixture
async def world(settings: ServiceSettings, bus: Bus, sqlite_store: RunningStore) -> AsyncIterator[World]:
    kv = await bus.kv(subjects.KV_AGENTS)
    await kv.put("copy", AgentInfo(name="copy", worker_id="test").encode())
    async with running_app(settings) as app:
        keys = {f"{p}:{s}": await issue_key(app.state.store, p, s) for p in ("default", "other") for s in SCOPES}
        spare = (await issue_key(app.state.store, "default", "read", "spare")).split("_")[1]
        async with client_of(app, keys["default:admin"]) as a:
            assert (await a.post("/v1/datasets", json={"name": "da", "rows": [{"text": "a"}]})).status_code == 201
            body = {**run_body("ra"), "eval_dataset": [{"text": "e"}]}
            assert (await a.post("/v1/runs", json=body)).status_code == 201, "run ra"
            task = {"agent": "copy", "input": {}, "task_id": "ta", "group_size": 2}
            assert (await a.post("/v1/tasks", json=task)).status_code == 202
            t = make_trajectory("ta.0").model_copy(update={"run_id": "default"})
            await bus.publish(subjects.trajectories("default"), t, t.msg_id())
            await wait_until(lambda: _status(a, "/v1/rollouts/ta.0"), expect=200)
        yield World(app, keys, spare)


async def _status(client: httpx.AsyncClient, path: str) -> int:
    return (await client.get(path)).status_code


async def _call(world: World, method: str, call: Call, key: str | None) -> httpx.Response:
    async with client_of(world.app, key) as c:
        path = call.path.format(spare=world.spare)
        return await c.request(method, path, json=call.body, params=call.params)


def test_the_matrix_names_every_route() -> None:
    assert set(routes()) == set(EXPECTED), "a route without an authorization expectation (or a stale one)"


@pytest.mark.parametrize("method, path", routes())
async def test_authorization_matrix(world: World, method: str, path: str) -> None:
    call = EXPECTED[(method, path)]
    scope = needed(method, path)

    anonymous = await _call(world, method, call, None)
    assert anonymous.status_code == 401 and "missing API key" in anonymous.json()["detail"]
    assert anonymous.headers["www-authenticate"] == "Bearer"
    forged = await _call(world, method, call, new_key()[2])
    assert forged.status_code == 401 and forged.json()["detail"] == "invalid API key"

    weaker = SCOPES[: SCOPES.index(scope)]
    if weaker:  # a GET needs only read: no key is too weak for it
        refused = await _call(world, method, call, world.keys[f"default:{weaker[-1]}"])
        assert refused.status_code == 403, refused.text
        assert f"needs {scope!r}" in refused.json()["detail"]

    stranger = await _call(world, method, call, world.keys["other:admin"])
    assert stranger.status_code == call.other, stranger.text
    if call.other_detail:
        assert call.other_detail in stranger.text
    if method == "GET" and call.other == 200:  # a listing: none of project A's objects
        assert not {"ra", "rb", world.spare} & {item.get("run_id") or item.get("key_id") for item in stranger.json()}

    right = await _call(world, method, call, world.keys[f"default:{scope}"])
    assert right.status_code == call.ok, right.text
    if call.ok_detail:
        assert call.ok_detail in right.json()["detail"]
    if (method, path) == ("GET", "/v1/runs"):
        assert "ra" in {r["run_id"] for r in right.json()}
    if (method, path) == ("DELETE", "/v1/keys/{key_id}"):
        assert right.json()["revoked_at"] is not None


async def test_a_revoked_key_is_refused_within_the_cache_time(settings: ServiceSettings, sqlite_store: RunningStore):
    """The gateway that revokes drops the key at once; another one trusts its cache at most key_cache_s."""
    async with running_app(settings) as admin_app, running_app(settings, key_cache_s=1.0) as other_app:
        admin = await issue_key(admin_app.state.store)
        victim = await issue_key(admin_app.state.store, scope="read")
        async with client_of(admin_app, victim) as here, client_of(other_app, victim) as there:
            assert (await here.get("/v1/runs")).status_code == 200
            assert (await there.get("/v1/runs")).status_code == 200  # now cached there
            async with client_of(admin_app, admin) as a:
                assert (await a.delete(f"/v1/keys/{victim.split('_')[1]}")).status_code == 200
            gone = await here.get("/v1/runs")
            assert gone.status_code == 401 and "revoked" in gone.json()["detail"]
            await wait_until(lambda: _status(there, "/v1/runs"), expect=401, timeout_s=1.5)


async def test_a_key_of_a_new_project_sees_only_that_project(settings: ServiceSettings, bus: Bus, sqlite_store: RunningStore):
    """An operator (admin of the default project) makes a tenant's first key; that tenant's
    tasks without a run go to its own ad-hoc bucket, and it cannot create a run under
    another project's bucket name."""
    kv = await bus.kv(subjects.KV_AGENTS)
    await kv.put("copy", AgentInfo(name="copy", worker_id="test").encode())
    async with running_app(settings) as app:
        async with client_of(app, await issue_key(app.state.store)) as operator:
            made = await operator.post("/v1/keys", json={"name": "acme admin", "scope": "admin", "project": "acme"})
            assert made.status_code == 201 and made.json()["project"] == "acme"
            task = await operator.post("/v1/tasks", json={"agent": "copy", "input": {}, "task_id": "op-task"})
            assert task.json()["tasks"][0]["run_id"] == "default"
        async with client_of(app, made.json()["key"]) as acme:
            accepted = await acme.post("/v1/tasks", json={"agent": "copy", "input": {}, "task_id": "acme-task"})
            assert accepted.status_code == 202 and accepted.json()["tasks"][0]["run_id"] == "default-acme"
            assert (await acme.get("/v1/tasks/acme-task")).status_code == 200
            assert (await acme.get("/v1/tasks/op-task")).status_code == 404
            into_default = await acme.post("/v1/tasks", json={"agent": "copy", "input": {}, "run_id": "default"})
            assert into_default.status_code == 404
            squat = await acme.post("/v1/runs", json=run_body("default-other"))
            assert squat.status_code == 422 and "reserved" in squat.json()["detail"]
            others = await acme.post("/v1/keys", json={"scope": "admin", "project": "default"})
            assert others.status_code == 403


@pytest.mark.parametrize("how", ["file", "setting"])
async def test_the_bootstrap_key_is_installed_at_start(
    settings: ServiceSettings, sqlite_store: RunningStore, tmp_path: Path, how: str
):
    """`relayrl up` gives the gateway a key file; compose and Kubernetes the key from a secret."""
    key = new_key()[2]
    path = tmp_path / "api_key"
    path.write_text(key + "\n")
    given = {"bootstrap_key_file": path} if how == "file" else {"bootstrap_key": SecretStr(key)}
    async with running_app(settings, **given) as app:
        async with client_of(app, key) as c:
            await wait_until(lambda: _status(c, "/readyz"), expect=200)
            listed = await c.get("/v1/keys")
            assert listed.status_code == 200
            assert [(k["name"], k["scope"], k["project"]) for k in listed.json()] == [("bootstrap", "admin", "default")]
    async with running_app(settings, **given) as again:  # a restart installs nothing twice
        async with client_of(again, key) as c:
            await wait_until(lambda: _status(c, "/readyz"), expect=200)
            assert len((await c.get("/v1/keys")).json()) == 1


async def test_a_bootstrap_file_without_a_key_keeps_the_gateway_unready(
    settings: ServiceSettings, sqlite_store: RunningStore, tmp_path: Path
):
    path = tmp_path / "api_key"
    path.write_text("not-a-key-but-maybe-a-secret")
    async with running_app(settings, bootstrap_key_file=path) as app:
        async with client_of(app) as c:
            await wait_until(lambda: _status(c, "/readyz"), expect=503)
            detail = (await c.get("/readyz")).json()["detail"]
            assert "not a relayrl API key" in detail and "not-a-key" not in detail


async def test_keys_never_show_in_responses_or_logs(
    settings: ServiceSettings, sqlite_store: RunningStore, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
):
    caplog.set_level(logging.DEBUG)
    async with running_app(settings) as app:
        admin = await issue_key(app.state.store)
        async with client_of(app, admin) as c:
            made = (await c.post("/v1/keys", json={"name": "ci", "scope": "write"})).json()
            secret = made["key"].split("_", 2)[2]
            answers = [
                await c.get("/v1/keys"),
                await c.delete(f"/v1/keys/{made['key_id']}"),
            ]
            async with client_of(app, made["key"]) as revoked:
                answers.append(await revoked.get("/v1/runs"))  # 401 revoked
            async with client_of(app, made["key"] + "x") as wrong:
                answers.append(await wrong.get("/v1/runs"))  # 401 invalid
    responses = "\n".join(r.text for r in answers)
    shown = responses + caplog.text + "".join(capsys.readouterr())
    assert made["key_id"] in shown  # the public id is what names a key
    assert secret not in shown and admin.split("_", 2)[2] not in shown
    # Not even the hash in a response (debug logs of the SQL driver may carry it: it is not a key).
    assert "secret_hash" not in responses
