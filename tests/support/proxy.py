"""The rollout worker's capture proxy in front of an in-process inference app: a stub that can
inject 503s, a worker serving the proxy, requests, and checks that a transition equals a call
made straight to inference."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from shared.bus import Bus
from shared.messages import RolloutRequest, SamplingParams, unpack_f32, unpack_i32
from services.rollout import proxy, registry
from services.rollout.settings import RolloutSettings
from services.rollout.worker import Worker

INFERENCE = "http://inference"


class FailingStub:
    """ASGI app in front of inference: answers the next `fail_next` POSTs with 503 itself."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.fail_next = 0
        self.failed = 0
        self.forwarded = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            if self.fail_next > 0:
                self.fail_next -= 1
                self.failed += 1
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": b'{"error": {"message": "injected"}}'})
                return
            self.forwarded += 1
        await self.app(scope, receive, send)


async def start_worker(stub: FailingStub, **overrides: Any) -> AsyncIterator[Worker]:
    registry.load_builtin_and()
    values: dict[str, Any] = dict(worker_id="w-proxy", inference_urls=INFERENCE, inference_retries=2,
                                  inference_backoff_s=0.01, inference_backoff_max_s=0.05)
    values.update(overrides)
    ws = RolloutSettings(**values)
    mounts = {INFERENCE: httpx.ASGITransport(app=stub)}
    async with httpx.AsyncClient(mounts=mounts, timeout=60) as http:
        w = Worker(None, ws, http)  # type: ignore[arg-type] - run_rollout needs no bus
        async with proxy.serve(w.proxy, ws.proxy_host, ws.proxy_port):
            yield w


@asynccontextmanager
async def worker_on_bus(stub: FailingStub, bus: Bus, settings: RolloutSettings) -> AsyncIterator[Worker]:
    """A worker consuming the real task stream through its proxy, stopped (drained) on exit."""
    registry.load_builtin_and()
    async with httpx.AsyncClient(mounts={INFERENCE: httpx.ASGITransport(app=stub)}, timeout=60) as http:
        w = Worker(bus, settings, http)
        async with proxy.serve(w.proxy):
            stop = asyncio.Event()
            task = asyncio.create_task(w.run(stop))
            try:
                yield w
            finally:
                stop.set()
                await task


def request(agent: str, rollout_id: str = "p.0", temperature: float = 0.0, **input: Any) -> RolloutRequest:
    return RolloutRequest(rollout_id=rollout_id, run_id="r", task_id="p", group_id="p", sample_index=0, group_size=1,
                          agent=agent, input=input, timeout_s=60,
                          sampling=SamplingParams(temperature=temperature, max_tokens=6))


async def direct_chat(direct: httpx.AsyncClient, messages: list[dict[str, Any]], **body: Any) -> dict[str, Any]:
    r = await direct.post("/v1/chat/completions", json={
        "model": "x", "messages": messages, "temperature": 0.0, "max_tokens": 6,
        "logprobs": True, "return_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def assert_transition_is(t: Any, prompt_ids: list[int], choice: dict[str, Any]) -> None:
    assert unpack_i32(t.prompt_ids).tolist() == prompt_ids
    assert unpack_i32(t.response_ids).tolist() == choice["token_ids"]
    assert unpack_i32(t.response_versions).tolist() == choice["token_versions"]
    lps = [c["logprob"] for c in choice["logprobs"]["content"]]
    assert unpack_f32(t.response_logprobs).tolist() == pytest.approx(lps, abs=1e-4)
    assert t.finish_reason == choice["finish_reason"]
