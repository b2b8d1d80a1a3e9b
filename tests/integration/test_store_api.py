"""The typed store API against a real nats-server and real SQLite: errors by type (no store,
a store whose database is gone, missing and refused objects, through the gateway's one
handler), listings that page instead of losing runs, task writes kept under max_payload, and
a pacer that outlives its failures.

The nats-server here allows 1 MB messages (the default is 8 MB), so replies and requests
outgrow one message with little data."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx
import pytest

from services.cli.nats_server import NatsServer
from shared import subjects
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.faults import NotFound, Rejected, StoreUnavailable
from shared.messages import AgentInfo, ListRuns, PaceCursor, RunConfig, TaskSpec
from shared.store_api import LIST_RUNS, RunPage, StoreClient, packed_size
from services.gateway.app import create_app
from services.gateway.pacing import Pacer, next_tasks
from services.gateway.settings import GatewaySettings
from services.store.db import create_schema
from services.store.settings import StoreSettings
from tests.support.gateway import authenticated
from services.trainer.progress import runs_to_train
from tests.support.store import RunningStore
from tests.support.waiting import wait_until


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(store_dir=tmp_path / "nats", max_payload_mb=1).start(log_file=tmp_path / "nats.log")
    yield server
    server.stop()


@pytest.fixture
def db_dir(tmp_path: Path) -> Path:
    (tmp_path / "db").mkdir()
    return tmp_path / "db"


@pytest.fixture
async def store(settings: ServiceSettings, db_dir: Path) -> AsyncIterator[RunningStore]:
    url = f"sqlite+aiosqlite:///{db_dir / 'relayrl.db'}"
    st = await RunningStore(StoreSettings(nats_url=settings.nats_url, database_url=url)).start()
    yield st
    if not st.task.done():
        await st.stop()
    await st.engine.dispose()


@pytest.fixture
async def gateway(settings: ServiceSettings, bus: Bus, store: RunningStore) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway with an admin key (made through `store`, which must serve before it)."""
    kv = await bus.kv(subjects.KV_AGENTS)
    await kv.put("copy", AgentInfo(name="copy", worker_id="test").encode())
    app = create_app(GatewaySettings(nats_url=settings.nats_url, store_timeout_s=2.0, pace_interval_s=0.05))
    async with app.router.lifespan_context(app):
        async with authenticated(app) as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


def config(run_id: str, rows: int = 4, row_bytes: int = 8, roles_bytes: int = 0, **training: object) -> RunConfig:
    return RunConfig(
        run_id=run_id,
        agent="copy",
        dataset=[{"text": f"{i:06d}" + "x" * row_bytes} for i in range(rows)],
        # A long (valid) regex makes the run view itself big, inline rows left out.
        trained_roles=f"(assistant{'a' * roles_bytes})|.*",
        training={"batch_size": 2, "group_size": 2, **training},
    )


# --- errors by type ----------------------------------------------------------------------


async def test_no_store_serving_is_unavailable(bus: Bus):
    api = StoreClient(bus, timeout_s=1.0)
    for call in (api.ping(), api.get_run("r"), api.list_runs(), api.put_tasks([TaskSpec(task_id="t", run_id="r", agent="a", input={})])):
        with pytest.raises(StoreUnavailable, match="no responders"):
            await call


async def test_a_store_whose_database_is_gone_is_unavailable_not_an_error(store: RunningStore, bus: Bus, db_dir: Path):
    api = StoreClient(bus, timeout_s=5.0)
    await api.put_run(config("r"), 4)
    await store.engine.dispose()  # drop pooled connections: the next query opens the file again
    shutil.rmtree(db_dir)
    for call in (api.ping(), api.get_run("r"), api.list_runs(), api.save_cursor("r", PaceCursor(row=1))):
        with pytest.raises(StoreUnavailable, match="database unavailable"):
            await call
    # Transient indeed: the database back (empty here), the same store answers again.
    db_dir.mkdir()
    await create_schema(store.engine)
    await api.ping()
    with pytest.raises(NotFound):
        await api.get_run("r")


async def test_the_gateway_maps_store_errors_to_http(store: RunningStore, gateway: httpx.AsyncClient):
    body = config("g").model_dump()
    assert (await gateway.post("/v1/runs", json=body)).status_code == 201
    missing = await gateway.get("/v1/runs/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert (await gateway.get("/v1/rollouts/nope")).status_code == 404
    clash = await gateway.post("/v1/runs", json={**body, "seed": 5})
    assert clash.status_code == 409 and "g" in clash.json()["detail"]
    unknown = await gateway.post("/v1/runs", json={**body, "run_id": "n", "dataset": [], "dataset_name": "absent"})
    assert unknown.status_code == 400 and "unknown dataset" in unknown.json()["detail"]
    paused = await gateway.post("/v1/runs/g/pause")
    assert paused.status_code == 200
    assert (await gateway.post("/v1/runs/g/pause")).status_code == 409  # only a running run pauses

    await store.stop()
    down = await gateway.get("/v1/runs/g")
    assert down.status_code == 503 and "store" in down.json()["detail"] and down.headers["retry-after"]
    ready = await gateway.get("/readyz")
    assert ready.status_code == 503 and ready.headers["retry-after"]


# --- listings that page ------------------------------------------------------------------


async def test_list_runs_returns_every_running_run_beyond_one_message(store: RunningStore, bus: Bus):
    api = StoreClient(bus, timeout_s=10.0)
    # 12 runs of ~120 kB inline rows and a ~100 kB view each: 2.6 MB in all, 1 MB per message.
    ids = [f"big{i:02d}" for i in range(12)]
    for run_id in ids:
        await api.put_run(config(run_id, rows=40, row_bytes=3000, roles_bytes=100_000), 40)
    await api.set_run_state("big03", "paused")
    await api.set_run_state("big05", "finished")

    first = await bus.request(LIST_RUNS.subject, ListRuns(states=["running", "paused"], limit=100), RunPage)
    assert isinstance(first, RunPage) and first.next is not None and len(first.runs) < 11  # paged

    live = await api.list_runs(states=["running", "paused"], limit=10000)
    assert [r.run_id for r in live] == [i for i in reversed(ids) if i != "big05"]  # newest first, each once
    assert all(r.config.rows_omitted and not r.config.dataset and r.rows == 40 for r in live)
    assert [r.run_id for r in await api.list_runs(limit=5)] == list(reversed(ids))[:5]
    trainable = await runs_to_train(bus, 10.0)
    assert [r.run_id for r in trainable] == [i for i in ids if i != "big05"]  # oldest first
    assert (await api.get_run("big00")).config.dataset == config("big00", rows=40, row_bytes=3000).dataset


async def test_named_dataset_rows_come_back_in_pages(store: RunningStore, bus: Bus):
    api = StoreClient(bus, timeout_s=10.0)
    # Just under max_payload as one request; over what one reply may carry besides its envelope.
    rows = [{"i": i, "text": "y" * 3200} for i in range(310)]
    assert api.payload_budget < packed_size(rows) < bus.nc.max_payload - 1024
    await api.put_dataset("wide", rows)
    assert await api.get_dataset("wide") == rows


# --- task writes under max_payload ---------------------------------------------------------


async def test_an_admission_window_larger_than_max_payload_gets_through(
    store: RunningStore, gateway: httpx.AsyncClient, bus: Bus
):
    cfg = config("wide", rows=4000, row_bytes=100, batch_size=2000, group_size=1, norm_adv_by_std=False)
    cfg = cfg.model_copy(update={"max_staleness": 1, "shuffle": False})
    _, window = next_tasks(cfg, cfg.dataset, PaceCursor(), 4000)
    assert sum(packed_size(s) for s in window) > bus.nc.max_payload  # one PutTasks could not carry it
    r = await gateway.post("/v1/runs", json=cfg.model_dump())
    assert r.status_code == 201, r.text

    async def published() -> int:
        return (await gateway.get("/v1/runs/wide")).json()["cursor"]["groups_published"]

    await wait_until(published, expect=4000, timeout_s=60)
    assert (await bus.js.stream_info(subjects.STREAM_TASKS)).state.messages == 4000
    assert (await gateway.get("/v1/tasks/wide-e0-r3999")).status_code == 200


async def test_a_task_too_big_for_any_message_is_refused(store: RunningStore, bus: Bus):
    huge = TaskSpec(task_id="huge", run_id="r", agent="copy", input={"blob": "z" * 1_100_000})
    with pytest.raises(Rejected) as refused:
        await StoreClient(bus, timeout_s=5.0).put_tasks([huge])
    assert refused.value.code == 413


# --- the pacer supervises itself -----------------------------------------------------------


class FlakyPacer(Pacer):
    """Ticks fail (a bug, then the store away) before they succeed."""

    failures: list[Exception]

    async def tick(self) -> None:
        self.ticks = getattr(self, "ticks", 0) + 1
        if self.failures:
            raise self.failures.pop(0)


async def test_the_pacer_outlives_failing_ticks(bus: Bus):
    pacer = FlakyPacer(bus, StoreClient(bus, 1.0), interval_s=0.01, max_backoff_s=0.05)
    pacer.failures = [KeyError("bug"), StoreUnavailable("store restarting"), RuntimeError("again")]
    stop = asyncio.Event()
    task = asyncio.create_task(pacer.run(stop))
    await wait_until(lambda: pacer.failing_for() > 0)
    await wait_until(lambda: getattr(pacer, "ticks", 0) >= 5)  # kept ticking after each failure
    assert not task.done() and pacer.failing_for() == 0 and pacer.last_error is None
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_readyz_reports_a_dead_or_failing_pacer(store: RunningStore, gateway: httpx.AsyncClient):
    assert (await gateway.get("/readyz")).status_code == 200
    app = gateway.app  # type: ignore[attr-defined]
    pacer = app.state.pacer

    async def broken() -> None:
        raise RuntimeError("a bug in pacing")

    pacer.tick = broken
    pacer.wake.set()
    await wait_until(lambda: "a bug" in (pacer.last_error or ""))
    assert (await gateway.get("/readyz")).status_code == 200  # failing, but not for long yet
    pacer.failing_since -= 3600  # as if it had failed for an hour
    failing = await gateway.get("/readyz")
    assert failing.status_code == 503 and "a bug in pacing" in failing.json()["detail"]
    app.state.pacing.cancel()
    await asyncio.gather(app.state.pacing, return_exceptions=True)
    dead = await gateway.get("/readyz")
    assert dead.status_code == 503 and "pacing has stopped" in dead.json()["detail"]
