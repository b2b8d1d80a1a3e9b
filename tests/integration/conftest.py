"""Fixtures several integration modules share: the store service in-process (on each database,
or on SQLite with its default settings), the tiny model, and the capture proxy's inference stub.

The nats-server, bus and database fixtures they build on are in tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import httpx
import pytest

from services.store.settings import StoreSettings
from shared.config import ServiceSettings
from shared.models import ensure_tiny_model
from tests.support.inference_app import running, settings as inference_settings
from tests.support.proxy import INFERENCE, FailingStub
from tests.support.store import RunningStore
from tests.support.nats_users import AuthNats
from tests.support.secrets import AUTH


@pytest.fixture
async def store(settings: ServiceSettings, database_url: str) -> AsyncIterator[RunningStore]:
    """The store service on each database (SQLite; PostgreSQL where reachable), 64-row batches."""
    st = await RunningStore(StoreSettings(nats_url=settings.nats_url, database_url=database_url, batch_size=64)).start()
    yield st
    if not st.task.done():
        await st.stop()
    await st.engine.dispose()


@pytest.fixture
async def sqlite_store(settings: ServiceSettings, sqlite_url: str) -> AsyncIterator[RunningStore]:
    """The store service on SQLite with its default settings."""
    st = await RunningStore(StoreSettings(nats_url=settings.nats_url, database_url=sqlite_url)).start()
    yield st
    await st.stop()
    await st.engine.dispose()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, created once per module."""
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
async def stub(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FailingStub]:
    """The inference app (tiny model) in-process behind a stub that can inject 503s, per module."""
    model = ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    async with running(inference_settings(model), INFERENCE) as app:
        yield FailingStub(app)


@pytest.fixture
async def direct(stub: FailingStub) -> AsyncIterator[httpx.AsyncClient]:
    """Straight to inference, bypassing the stub's failures and the proxy."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=stub.app), base_url=INFERENCE, timeout=60,
                                 headers=AUTH) as c:
        yield c


@pytest.fixture
async def auth_nats(tmp_path: Path) -> AsyncIterator[AuthNats]:
    """A nats-server with relayrl's users and permissions, topology made by the admin step."""
    server = await AuthNats(store_dir=tmp_path / "nats-auth").start()
    yield server
    await server.stop()
