"""In-process bounds of inference and rollout: what a replica or a worker holds per request or
per rollout stays within a stated bound however long it runs, and what reaches a bound is
refused or retried, never lost.

- Inference: at most `max_queued_requests` sequences wait for a batch slot; one more is
  refused at once (503 `queue_full`, `Retry-After`), and every place (and in-flight count) is
  given back however a request ends, cancelled ones included.
- Rollout: the capture proxy forgets each rollout however it ends (ok, error, timeout,
  cancel, retried), its context stops calling inference, and a rollout that failed because
  inference was overloaded is run again rather than recorded as a failed sample.

A real tiny model serves every call (in-process, behind the stub that can inject 503s) and the
worker test runs against a real nats-server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from shared import subjects
from shared.bus import Bus, TransientError
from shared.config import ServiceSettings
from shared.messages import Trajectory
from services.inference.engine import EngineUnavailable, QueueFull, TorchEngine
from services.inference.sampling import SamplingConfig
from services.rollout import proxy, registry
from services.rollout.agents.openai_sdk import NAME as OPENAI_ECHO, openai_echo_agent
from services.rollout.capture import InferenceError
from services.rollout.context import AgentContext
from services.rollout.settings import RolloutSettings
from services.rollout.worker import Worker
from tests.support.inference_app import running, settings as inference_settings
from tests.support.proxy import INFERENCE, FailingStub, request, start_worker, worker_on_bus
from tests.support.streams import reader
from tests.support.waiting import wait_until
from tests.support.secrets import AUTH

BOUND = 3  # max_queued_requests of the bounded replica below (one decoding row besides)
# A context limit past the tiny model's 1024 positions (its rotary embeddings have no position
# table), so a row can decode until the test cancels it: "busy" never depends on how fast
# this machine decodes.
ENDLESS = 1_000_000


def bounded_settings(model_path: Path) -> Any:
    return inference_settings(model_path, max_batch_size=1, max_queued_requests=BOUND, batch_wait_ms=0.0,
                              max_model_len=ENDLESS + 8)  # fmt: skip


@pytest.fixture(scope="module")
async def bounded(model_path: Path) -> AsyncIterator[tuple[FailingStub, TorchEngine]]:
    """A replica that decodes one row at a time and lets BOUND more wait, behind the 503 stub."""
    async with running(bounded_settings(model_path), INFERENCE) as app:
        engine = app.state.runtime.engine
        assert engine is not None and engine.max_queued_requests == BOUND
        yield FailingStub(app), engine


@pytest.fixture
async def client(bounded: tuple[FailingStub, TorchEngine]) -> AsyncIterator[httpx.AsyncClient]:
    stub, engine = bounded
    stub.fail_next = stub.failed = 0
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=stub.app), base_url=INFERENCE, timeout=60,
                                 headers=AUTH) as c:
        yield c
    await wait_until(lambda: idle(engine))  # nothing a test left behind reaches the next one


def idle(engine: TorchEngine) -> bool:
    """Nothing waits, decodes or is counted in flight (every structure holding a request is empty)."""
    return (engine.queued_requests == 0 and engine.requests_in_flight == 0 and engine.active_rows == 0
            and not engine._parked and not engine._gathering and engine._queue.qsize() == 0)  # fmt: skip


def held(engine: TorchEngine) -> int:
    """Requests the waiting structures hold now, read downstream first: one moving along while
    this reads is missed, never counted twice (a true upper bound is never overstated)."""
    return len(engine._gathering) + len(engine._parked) + engine._queue.qsize()


def occupy(engine: TorchEngine, max_tokens: int = ENDLESS) -> asyncio.Task[Any]:
    """A generation straight on the engine, by default one that runs until cancelled: keeps
    the one batch row busy."""
    return asyncio.create_task(engine.generate([1, 2, 3], SamplingConfig(max_tokens=max_tokens, ignore_eos=True)))


async def cancelled(*tasks: asyncio.Task[Any]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def completion(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2, **body})


# --- inference: a full queue refuses at once ------------------------------------------------------


async def test_a_full_queue_answers_503_with_retry_after_at_once(
    client: httpx.AsyncClient, bounded: tuple[FailingStub, TorchEngine]
) -> None:
    _, engine = bounded
    refused_before = engine.stats.requests_refused
    busy = occupy(engine)
    await wait_until(lambda: engine.active_rows == 1)
    waiting = [asyncio.create_task(completion(client)) for _ in range(BOUND)]
    await wait_until(lambda: engine.queued_requests == BOUND)

    started = time.monotonic()
    r = await completion(client)
    assert time.monotonic() - started < 2.0  # refused at once, not queued behind the endless row
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    error = r.json()["error"]
    assert error["code"] == "queue_full" and error["type"] == "service_unavailable"
    assert f"max_queued_requests={BOUND}" in error["message"]
    stats = (await client.get("/v1/stats")).json()
    assert stats["queued_requests"] == BOUND and stats["max_queued_requests"] == BOUND
    assert stats["requests_refused"] == refused_before + 1
    assert held(engine) <= BOUND

    # More choices than the queue could ever hold: a permanent 400, not a 503 to retry forever.
    too_many = await completion(client, n=BOUND + 1)
    assert too_many.status_code == 400 and "max_queued_requests" in too_many.text

    await cancelled(busy)  # the waiting ones are served once the long row is gone
    assert [w.status_code for w in await asyncio.gather(*waiting)] == [200] * BOUND


async def test_the_queue_never_exceeds_its_bound_under_a_burst(
    client: httpx.AsyncClient, bounded: tuple[FailingStub, TorchEngine]
) -> None:
    """Callers that retry on 503 (as the capture client does) all get served; meanwhile the
    queue and every structure behind it stay within the bound."""
    _, engine = bounded
    peak = {"counted": 0, "held": 0}
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            peak["counted"] = max(peak["counted"], engine.queued_requests)
            peak["held"] = max(peak["held"], held(engine))
            await asyncio.sleep(0.001)

    refusals = 0

    async def caller(i: int) -> int:
        nonlocal refusals
        while True:
            r = await completion(client, max_tokens=4, seed=i, temperature=1.0)
            if r.status_code != 503:
                return r.status_code
            assert r.json()["error"]["code"] == "queue_full" and "retry-after" in r.headers
            refusals += 1
            await asyncio.sleep(0.01)  # shorter than Retry-After, so the queue stays contended

    watcher = asyncio.create_task(watch())
    try:
        statuses = await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(16))), timeout=120)
    finally:
        done.set()
        await watcher
    assert statuses == [200] * 16
    assert refusals > 0  # the burst did reach the bound
    assert 0 < peak["counted"] <= BOUND and peak["held"] <= BOUND
    await wait_until(lambda: idle(engine))


async def test_cancelled_requests_give_back_their_place_and_their_run(bounded: tuple[FailingStub, TorchEngine]) -> None:
    """A caller that goes away (client disconnect, a sibling choice failing) leaves nothing
    behind: neither its queue place nor the in-flight count that keeps a run's weights held."""
    _, engine = bounded
    decoding = occupy(engine)
    await wait_until(lambda: engine.active_rows == 1)
    queued = [occupy(engine, max_tokens=5) for _ in range(BOUND)]
    await wait_until(lambda: engine.queued_requests == BOUND)
    with pytest.raises(QueueFull):
        await engine.generate([1, 2], SamplingConfig(max_tokens=1))
    assert engine.requests_in_flight == BOUND + 1  # the refused one was never counted

    await cancelled(*queued)  # places are given back once the worker takes them out
    await wait_until(lambda: engine.queued_requests == 0 and not engine._parked)
    await cancelled(decoding)  # a row mid-decode: settled by the worker at its next step
    await wait_until(lambda: idle(engine))
    assert engine.requests_in_flight == 0 and dict(engine._in_flight) == {}
    # Served as before afterwards.
    gen = await engine.generate([1, 2], SamplingConfig(max_tokens=2, ignore_eos=True))
    assert len(gen.token_ids) == 2


async def test_a_stopped_engine_refuses_and_leaves_nothing_waiting(model_path: Path) -> None:
    """Stopping answers every waiting request (503) at once, lets the running row go on until
    it ends, and refuses what comes after: nothing is left waiting forever."""
    async with running(bounded_settings(model_path)) as app:
        engine: TorchEngine = app.state.runtime.engine
        busy = occupy(engine)
        await wait_until(lambda: engine.active_rows == 1)
        waiting = [occupy(engine, max_tokens=2) for _ in range(BOUND)]
        await wait_until(lambda: engine.queued_requests == BOUND)
        stopping = asyncio.create_task(asyncio.to_thread(engine.stop, 30.0))
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), timeout=20)
        assert all(isinstance(r, EngineUnavailable) and "stopping" in str(r) for r in results), results
        assert engine.queued_requests == 0 and engine.active_rows == 1 and not busy.done()
        with pytest.raises(EngineUnavailable):
            await engine.generate([1, 2], SamplingConfig(max_tokens=1))
        await cancelled(busy)  # the running row ends (here: its caller went away); the worker stops
        await stopping
        assert not engine.alive and idle(engine)


# --- rollout: per-rollout state ends with the rollout ---------------------------------------------------

CONTEXTS: dict[str, AgentContext] = {}
GATE: dict[str, asyncio.Event] = {}


@registry.agent("test-bounds-fails")
async def fails_after_a_call(ctx: AgentContext) -> float:
    CONTEXTS[ctx.request.rollout_id] = ctx
    await ctx.openai().chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": "x"}],
                                               max_tokens=2)  # fmt: skip
    raise RuntimeError("tool exploded")


@registry.agent("test-bounds-hangs")
async def hangs_after_a_call(ctx: AgentContext) -> float:
    CONTEXTS[ctx.request.rollout_id] = ctx
    await ctx.openai(role="planner").completions.create(model=ctx.model, prompt="x", max_tokens=2)
    await asyncio.sleep(3600)
    return 1.0


@registry.agent("test-bounds-waits")
async def waits_for_the_gate(ctx: AgentContext) -> float:
    CONTEXTS[ctx.request.rollout_id] = ctx
    await ctx.chat([{"role": "user", "content": "x"}], max_tokens=2)
    await GATE[ctx.request.rollout_id].wait()
    return 1.0


@registry.agent("test-bounds-records")
async def records(ctx: AgentContext) -> float:
    CONTEXTS[ctx.request.rollout_id] = ctx
    return await openai_echo_agent(ctx)


def timed(agent: str, rollout_id: str, timeout_s: float = 60.0) -> Any:
    return request(agent, rollout_id=rollout_id).model_copy(update={"timeout_s": timeout_s})


@pytest.fixture
async def worker(bounded: tuple[FailingStub, TorchEngine]) -> AsyncIterator[Worker]:
    stub, engine = bounded
    stub.fail_next = stub.failed = 0
    CONTEXTS.clear()
    async for w in start_worker(stub):
        yield w
    await wait_until(lambda: idle(engine))


async def test_the_proxy_forgets_every_rollout_however_it_ends(worker: Worker) -> None:
    GATE["b.cancelled"] = asyncio.Event()
    runs = {
        "b.ok": asyncio.create_task(worker.run_rollout(timed("test-bounds-records", "b.ok"), attempt=1)),
        "b.error": asyncio.create_task(worker.run_rollout(timed("test-bounds-fails", "b.error"), attempt=1)),
        "b.timeout": asyncio.create_task(worker.run_rollout(timed("test-bounds-hangs", "b.timeout", 2.0), attempt=1)),
        "b.cancelled": asyncio.create_task(worker.run_rollout(timed("test-bounds-waits", "b.cancelled"), attempt=1)),
    }
    # While they run, each has exactly one entry: the proxy holds what is in flight, no more.
    await wait_until(lambda: "b.cancelled" in CONTEXTS and CONTEXTS["b.cancelled"].transitions)
    assert set(worker.proxy.rollouts) <= set(runs) and "b.cancelled" in worker.proxy.rollouts
    runs["b.cancelled"].cancel()  # e.g. the worker shutting down mid-rollout
    results = dict(zip(runs, await asyncio.gather(*runs.values(), return_exceptions=True)))

    assert results["b.ok"].status == "ok" and len(results["b.ok"].transitions) == 2
    assert results["b.error"].status == "error" and "tool exploded" in results["b.error"].error
    assert results["b.timeout"].status == "timeout"
    assert isinstance(results["b.cancelled"], asyncio.CancelledError)
    assert worker.proxy.rollouts == {}
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{worker.proxy.url}/healthz")).json()["rollouts_in_flight"] == 0
    for rollout_id, ctx in CONTEXTS.items():
        assert ctx.closed and ctx._openai == {}, rollout_id
        # Over means over: no more calls to inference, through the proxy or in process.
        late = openai.AsyncOpenAI(base_url=ctx.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            await late.chat.completions.create(model="m", messages=[{"role": "user", "content": "late"}])
        await late.close()
        with pytest.raises(InferenceError) as refused:
            await ctx.chat([{"role": "user", "content": "late"}], max_tokens=2)
        assert refused.value.status == 404
    assert len(CONTEXTS["b.cancelled"].transitions) == 1  # nothing recorded after its end


async def test_an_overloaded_inference_hands_the_rollout_back_until_its_last_attempt(
    worker: Worker, bounded: tuple[FailingStub, TorchEngine]
) -> None:
    stub, engine = bounded
    refused_before = engine.stats.requests_refused
    busy = occupy(engine)
    await wait_until(lambda: engine.active_rows == 1)
    waiting = [occupy(engine, max_tokens=2) for _ in range(BOUND)]
    await wait_until(lambda: engine.queued_requests == BOUND)
    try:
        # Not its last attempt: handed back (redelivered later), nothing recorded as failed.
        with pytest.raises(TransientError, match="queue_full"):
            await worker.run_rollout(timed(OPENAI_ECHO, "o.0"), attempt=1)
        retries = worker.settings.inference_retries
        assert engine.stats.requests_refused - refused_before == retries + 1  # the client retried, bounded
        assert worker.proxy.rollouts == {}
        # Its last attempt: recorded as failed, with the reason.
        last = await worker.run_rollout(timed(OPENAI_ECHO, "o.0"), attempt=worker.settings.max_attempts)
        assert last.status == "error" and "queue_full" in (last.error or "")
        assert worker.proxy.rollouts == {}
    finally:
        await cancelled(busy, *waiting)


async def test_a_rollout_refused_for_overload_is_run_again_and_published_once(
    bounded: tuple[FailingStub, TorchEngine], settings: ServiceSettings, bus: Bus
) -> None:
    """Through the real task stream: the first delivery meets a full inference queue and is
    handed back; the redelivery, once inference has room, publishes the one trajectory."""
    stub, engine = bounded
    stub.fail_next = stub.failed = 0
    ws = RolloutSettings(nats_url=settings.nats_url, worker_id="w-bounds", inference_urls=INFERENCE,
                         inference_retries=2, inference_backoff_s=0.01, inference_backoff_max_s=0.05)  # fmt: skip
    busy = occupy(engine)
    await wait_until(lambda: engine.active_rows == 1)
    waiting = [occupy(engine, max_tokens=2) for _ in range(BOUND)]
    await wait_until(lambda: engine.queued_requests == BOUND)
    refused_before = engine.stats.requests_refused
    try:
        async with worker_on_bus(stub, bus, ws) as w:
            req = timed(OPENAI_ECHO, "q.0")
            await bus.publish(subjects.tasks("r"), req, req.rollout_id)
            # The first attempt spends its retries on 503 queue_full, then hands the task back.
            await wait_until(lambda: engine.stats.requests_refused - refused_before >= ws.inference_retries + 1)
            await wait_until(lambda: w.proxy.rollouts == {})
            await cancelled(busy, *waiting)  # inference has room again
            async with reader(bus, subjects.STREAM_TRAJECTORIES, subjects.trajectories("r")) as sub:
                (msg,) = await sub.fetch(1, timeout=30)
                with pytest.raises(Exception):  # nats-py's fetch timeout: no second trajectory
                    await sub.fetch(1, timeout=1.0)
    finally:
        await cancelled(busy, *waiting)
    traj = Trajectory.decode(msg.data)
    assert traj.rollout_id == "q.0" and traj.status == "ok", traj.error
    assert traj.attempt == 2 and len(traj.transitions) == 2
    assert w.proxy.rollouts == {}
    await wait_until(lambda: idle(engine))
