"""The gateway app in-process (lifespan entered, served over ASGI) with an API key, API keys
made through the store (as `POST /v1/keys` makes them), and a training run's body."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Iterator

import httpx
import uvicorn
from fastapi import FastAPI

from shared.apikeys import DEFAULT_PROJECT, Scope, new_key, secret_hash
from shared.config import ServiceSettings
from shared.faults import StoreUnavailable
from shared.store_api import StoreClient
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings


async def issue_key(store: StoreClient, project: str = DEFAULT_PROJECT, scope: Scope = "admin", name: str = "test") -> str:
    """A new API key stored through the real store (hash only), as the gateway makes one. A
    store started a moment ago may not serve yet: its absence is waited out (10 s at most)."""
    key_id, secret, text = new_key()
    deadline = time.monotonic() + 10.0
    while True:
        try:
            await store.create_key(key_id, secret_hash(secret), project, scope, name)
            return text
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@asynccontextmanager
async def authenticated(app: FastAPI, project: str = DEFAULT_PROJECT, scope: Scope = "admin") -> AsyncIterator[httpx.AsyncClient]:
    """An ASGI client of `app` (its lifespan entered by the caller) sending a new key of `scope`
    in `project`; the key's text is `client.api_key`."""
    key = await issue_key(app.state.store, project, scope)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", headers=bearer(key)) as c:
        c.api_key = key  # type: ignore[attr-defined]
        yield c


@asynccontextmanager
async def running_app(settings: ServiceSettings, **overrides: Any) -> AsyncIterator[FastAPI]:
    """The gateway app with its lifespan entered (NATS connected, pacing on), settings overridden."""
    app = create_app(GatewaySettings(nats_url=settings.nats_url, store_timeout_s=5.0, pace_interval_s=0.05, **overrides))
    async with app.router.lifespan_context(app):
        yield app


def client_of(app: FastAPI, key: str | None = None) -> httpx.AsyncClient:
    """An ASGI client of `app` sending `key` (none: no Authorization header)."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway", headers=bearer(key) if key else {}
    )


class _Server(uvicorn.Server):
    """uvicorn in the test's loop; the test runner keeps its own signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@asynccontextmanager
async def served(settings: ServiceSettings, **overrides: Any) -> AsyncIterator[tuple[FastAPI, str]]:
    """The gateway over real HTTP on a free loopback port (for synchronous clients), and its URL."""
    app = create_app(GatewaySettings(nats_url=settings.nats_url, store_timeout_s=5.0, pace_interval_s=0.05, **overrides))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    server = _Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the gateway exited at startup")
        await asyncio.sleep(0.01)
    try:
        yield app, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def gateway(settings: ServiceSettings) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway, and a client of it with an admin key of the default project."""
    app = create_app(GatewaySettings(nats_url=settings.nats_url, store_timeout_s=5.0, pace_interval_s=0.05))
    async with app.router.lifespan_context(app):
        async with authenticated(app) as c:
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
