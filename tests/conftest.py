"""Fixtures: a real nats-server per test (free loopback port, temp store dir), real SQLite."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest

from services.cli.nats_server import NatsServer
from shared.bus import Bus
from shared.config import ServiceSettings

POSTGRES_URL = os.environ.get("RELAYRL_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(store_dir=tmp_path / "nats").start(log_file=tmp_path / "nats.log")
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def settings(nats_url: str) -> ServiceSettings:
    return ServiceSettings(nats_url=nats_url, log_format="console", request_timeout_s=5.0)


@pytest.fixture
async def bus(settings: ServiceSettings) -> AsyncIterator[Bus]:
    b = await Bus.connect(settings, "test")
    await b.ensure_topology()
    yield b
    await b.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'relayrl.db'}"


def postgres_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, sqlite_url: str) -> AsyncIterator[str]:
    """SQLite always; PostgreSQL when a server is reachable (a fresh schema per test)."""
    if request.param == "sqlite":
        yield sqlite_url
        return
    if not postgres_reachable():
        pytest.skip("PostgreSQL not reachable on 127.0.0.1:5432 (set RELAYRL_TEST_POSTGRES_URL)")
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    name = f"relayrl_t{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}"
    from sqlalchemy.pool import NullPool

    # No pooled connection is kept across the test: a test may restart the server.
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    async with admin.connect() as conn:
        await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


_UNSET = object()


async def wait_until(predicate, timeout_s: float = 20.0, interval_s: float = 0.05, expect=_UNSET):  # type: ignore[no-untyped-def]
    """Poll a sync or async callable until it returns `expect` (or anything truthy); fail on timeout."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    value = None
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if (value == expect) if expect is not _UNSET else value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last value: {value!r})")
        await asyncio.sleep(interval_s)


# The session-wide stack the example agents' end-to-end tests share (tests/agent_stack.py).
from tests.agent_stack import agent_stack  # noqa: E402, F401
