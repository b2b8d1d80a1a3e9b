"""Fixtures for every kind of test: a real nats-server per test (free loopback port, temp store
dir), real SQLite (and PostgreSQL where reachable), and the session's shared agent stack.

Fixtures only the integration tests share are in tests/integration/conftest.py; helpers that
are not fixtures are in tests/support/. Tests are laid out by kind: unit/ (starts nothing),
integration/ (a real nats-server and/or SQL, services in-process or one process), e2e/ (the
whole stack as processes), examples/ (the example agents, unit and end to end).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest

from examples.text_to_sql.access import DB_DIR_ENV as TEXT_TO_SQL_DB_DIR_ENV
from services.cli.nats_server import NatsServer
from services.cli.stack import Stack, StackConfig
from shared.bus import Bus
from shared.config import ServiceSettings
from tests.support import secrets
from tests.support.databases import POSTGRES_URL, postgres_reachable


@pytest.fixture(scope="session", autouse=True)
def service_secrets() -> Iterator[None]:
    """The inference token and the weights signing key, generated for this session and set in the
    environment: settings built in-process and service processes started by tests read them
    there, as deployed services do (tests/support/secrets.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(secrets.INFERENCE_TOKEN_ENV, secrets.INFERENCE_TOKEN)
        mp.setenv(secrets.WEIGHTS_KEY_ENV, secrets.WEIGHTS_KEY)
        yield


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


@pytest.fixture(scope="session")
def text_to_sql_db_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The directory the text-to-SQL agent may open databases from besides its generated ones
    (examples/text_to_sql/access.py), set in the environment before `agent_stack`'s worker
    starts: end-to-end tests put their Spider-format folders under it."""
    path = tmp_path_factory.mktemp("text-to-sql-databases")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TEXT_TO_SQL_DB_DIR_ENV, str(path))
        yield path


@pytest.fixture(scope="session")
def agent_stack(tmp_path_factory: pytest.TempPathFactory, text_to_sql_db_dir: Path) -> Iterator[Stack]:
    """One real stack (nats-server, store, inference with the tiny model, a rollout worker,
    gateway; no trainer) shared by the example agents' end-to-end tests (tests/support/agent_stack.py)."""
    state = tmp_path_factory.mktemp("agent-stack")
    stack = Stack(
        StackConfig(state_dir=state, gateway_port=0, log_format="console", trainers=0, rollout_replicas=1)
    ).start()
    yield stack
    stack.stop()
