"""The rollout worker's capture proxy: unchanged OpenAI-SDK agents, captured token for token.

A real inference app (tiny model, in-process) sits behind a stub that can fail requests; the
worker's proxy is served by uvicorn on a free loopback port and agents use the OpenAI SDK.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from shared import subjects
from shared.bus import Bus
from shared.config import ConfigError, ServiceSettings
from shared.messages import Trajectory, unpack_f32, unpack_i32
from services.rollout import proxy, registry
from services.rollout.agents.openai_sdk import NAME as OPENAI_ECHO, first_messages, second_messages
from services.rollout.context import AgentContext
from services.rollout.settings import RolloutSettings
from services.rollout.worker import Worker
from tests.support.proxy import INFERENCE, FailingStub, assert_transition_is, direct_chat, request, start_worker, worker_on_bus
from tests.support.secrets import INFERENCE_TOKEN
from tests.support.streams import reader


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def worker(stub: FailingStub) -> AsyncIterator[Worker]:
    stub.fail_next = stub.failed = 0
    async for w in start_worker(stub):
        yield w


# --- the example agent: two turns, OpenAI SDK only --------------------------------------------------


async def test_openai_sdk_agent_is_captured_exactly(worker: Worker, direct: httpx.AsyncClient):
    traj = await worker.run_rollout(request(OPENAI_ECHO, text="hi", max_tokens=6), attempt=1)
    assert traj.status == "ok", traj.error
    assert [t.role for t in traj.transitions] == ["assistant", "assistant"]
    # The same conversation straight to inference, greedy: the captured ids are exactly these.
    first = await direct_chat(direct, first_messages("hi"))
    second = await direct_chat(direct, second_messages("hi", first["choices"][0]["message"]["content"]))
    assert_transition_is(traj.transitions[0], first["prompt_token_ids"], first["choices"][0])
    assert_transition_is(traj.transitions[1], second["prompt_token_ids"], second["choices"][0])
    assert all(len(t.response_ids) > 0 for t in traj.transitions)
    assert worker.proxy.rollouts == {}  # finished rollouts are forgotten: their URLs now 404


# --- roles, both endpoints, n > 1, models, ctx.chat on the same recorder ------------------------------

SEEN: dict[str, Any] = {}


@registry.agent("test-proxy-roles")
async def roles_agent(ctx: AgentContext) -> float:
    planner, tool = ctx.openai(role="planner"), ctx.openai(role="tool")
    assert ctx.openai(role="planner") is planner  # one client per role per rollout
    chat = await planner.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": "plan"}],
                                                 max_tokens=4)
    text = await tool.completions.create(model=ctx.model, prompt="The tool says", max_tokens=3)
    pair = await ctx.openai(role="sampler").chat.completions.create(
        model=ctx.model, messages=[{"role": "user", "content": "two"}], n=2, temperature=1.0, seed=7, max_tokens=3)
    own = await ctx.chat([{"role": "user", "content": "in-process"}], max_tokens=2)
    models = await planner.models.list()
    SEEN.update(chat=chat.to_dict(), text=text.to_dict(), pair=pair.to_dict(), own=own,
                models=[m.id for m in models.data], base_url=ctx.base_url_for("planner"))
    return 1.0


async def test_roles_come_from_the_path_and_responses_carry_the_recorded_ids(worker: Worker):
    rollout_id = "task/with odd?chars.0"
    traj = await worker.run_rollout(request("test-proxy-roles", rollout_id=rollout_id), attempt=1)
    assert traj.status == "ok", traj.error
    assert SEEN["base_url"] == f"{worker.proxy.url}/r/task%2Fwith%20odd%3Fchars.0/planner/v1"
    assert [t.role for t in traj.transitions] == ["planner", "tool", "sampler", "sampler", "assistant"]
    chat, text, pair = SEEN["chat"], SEEN["text"], SEEN["pair"]
    # What the SDK got back is what was recorded (the extra token fields survive the SDK).
    assert_transition_is(traj.transitions[0], chat["prompt_token_ids"], chat["choices"][0])
    t = traj.transitions[1]
    assert unpack_i32(t.prompt_ids).tolist() == text["choices"][0]["prompt_token_ids"]
    assert unpack_i32(t.response_ids).tolist() == text["choices"][0]["token_ids"]
    assert unpack_f32(t.response_logprobs).tolist() == pytest.approx(text["choices"][0]["logprobs"]["token_logprobs"])
    for i in range(2):  # n=2: one transition per choice, same prompt
        assert_transition_is(traj.transitions[2 + i], pair["prompt_token_ids"], pair["choices"][i])
    assert unpack_i32(traj.transitions[4].response_ids).tolist() == SEEN["own"].token_ids
    assert len(SEEN["models"]) == 1


# --- refusals --------------------------------------------------------------------------------------------


async def test_streamed_calls_are_captured_and_replayed_as_sse(worker: Worker, direct: httpx.AsyncClient):
    ctx = AgentContext(request=request("none"), client=worker.client, proxy=worker.proxy)
    messages = [{"role": "user", "content": "hi"}]
    with worker.proxy.track(ctx):
        client = openai.AsyncOpenAI(base_url=ctx.base_url, api_key="x", max_retries=0)
        stream = await client.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}, max_tokens=6)
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = [c.usage for c in chunks if c.usage is not None]
        async with httpx.AsyncClient() as http:
            r = await http.post(ctx.base_url + "/completions", json={"prompt": "hi", "stream": True, "max_tokens": 4})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = [ln[len("data: "):] for ln in r.text.split("\n\n") if ln.startswith("data: ")]
        await client.close()
    # The streamed chat call was recorded exactly as the same call straight to inference.
    same = await direct_chat(direct, messages)
    (chat_t, completion_t) = ctx.transitions
    assert_transition_is(chat_t, same["prompt_token_ids"], same["choices"][0])
    assert text == same["choices"][0]["message"]["content"]
    assert finish == [same["choices"][0]["finish_reason"]]
    assert usage and usage[0].completion_tokens == len(same["choices"][0]["token_ids"])
    # Completions stream: text chunks, then a finish chunk, then [DONE].
    assert lines[-1] == "[DONE]"
    body = [json.loads(x) for x in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in body) and body[-1]["choices"][0]["finish_reason"]
    assert unpack_i32(completion_t.response_ids).tolist() == body[0]["choices"][0]["token_ids"]


async def test_unknown_and_finished_rollouts_are_404(worker: Worker):
    ctx = AgentContext(request=request("none"), client=worker.client, proxy=worker.proxy)
    with worker.proxy.track(ctx):
        pass
    async with httpx.AsyncClient() as http:
        for rid in ("nope", ctx.request.rollout_id):  # never here / finished
            r = await http.post(f"{worker.proxy.url}/r/{rid}/assistant/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 404 and "unknown rollout" in r.json()["error"]["message"]
            assert (await http.get(f"{worker.proxy.url}/r/{rid}/assistant/v1/models")).status_code == 404


async def test_inference_refusals_pass_through_with_status_and_body(worker: Worker, direct: httpx.AsyncClient):
    tools = [{"type": "function", "function": {"name": "add", "description": "add two numbers",
                                               "parameters": {"type": "object", "properties": {}}}}]
    bodies = [
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},  # past the context: 400
        {"messages": [{"role": "user", "content": "hi"}], "tools": tools, "max_tokens": 2},  # unchanged, either way
    ]
    ctx = AgentContext(request=request("none"), client=worker.client, proxy=worker.proxy)
    with worker.proxy.track(ctx):
        async with httpx.AsyncClient(timeout=60) as http:
            statuses = []
            for body in bodies:
                full = {"model": "m", "temperature": 0.0, **body}
                want = await direct.post("/v1/chat/completions", json={**full, "logprobs": True,
                                                                        "return_token_ids": True})
                got = await http.post(ctx.base_url + "/chat/completions", json=full)
                assert got.status_code == want.status_code, (got.text, want.text)
                if want.status_code != 200:
                    assert got.json() == want.json()
                    # Machine-readable, as OpenAI's: agents can tell "prompt too long" from other refusals.
                    assert got.json()["error"]["code"] == "context_length_exceeded"
                else:  # the tools reached the chat template: the same prompt ids as a direct call
                    assert got.json()["prompt_token_ids"] == want.json()["prompt_token_ids"]
                statuses.append(got.status_code)
    assert statuses[0] == 400
    assert len(ctx.transitions) == (1 if statuses[1] == 200 else 0)


# --- retries and a missing inference ---------------------------------------------------------------


async def test_a_503_from_inference_is_retried_and_recorded_once(worker: Worker, stub: FailingStub):
    ctx = AgentContext(request=request("none"), client=worker.client, proxy=worker.proxy)
    stub.fail_next = 1
    with worker.proxy.track(ctx):
        client = ctx.openai()
        reply = await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": "hi"}])
    await ctx.aclose()
    assert stub.failed == 1 and stub.fail_next == 0
    assert len(ctx.transitions) == 1
    assert unpack_i32(ctx.transitions[0].response_ids).tolist() == reply.to_dict()["choices"][0]["token_ids"]


async def test_inference_gone_is_a_clear_502_or_503(stub: FailingStub):
    dead = f"http://127.0.0.1:{free_port()}"
    async for w in start_worker(stub, inference_urls=dead, inference_retries=1):
        ctx = AgentContext(request=request("none"), client=w.client, proxy=w.proxy)
        with w.proxy.track(ctx):
            with pytest.raises(openai.APIStatusError) as err:
                await ctx.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await ctx.aclose()
        assert err.value.status_code == 502 and "unreachable after 2 attempts" in str(err.value)
        assert ctx.transitions == []
    stub.fail_next, stub.failed = 100, 0
    try:
        async for w in start_worker(stub, inference_retries=2):
            ctx = AgentContext(request=request("none"), client=w.client, proxy=w.proxy)
            with w.proxy.track(ctx):
                with pytest.raises(openai.APIStatusError) as err:
                    await ctx.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
            await ctx.aclose()
            assert err.value.status_code == 503 and "after 3 attempts" in str(err.value)
            assert stub.failed == 3 and ctx.transitions == []
    finally:
        stub.fail_next = 0


# --- authentication toward inference, and where the proxy listens ------------------------------------


async def test_a_worker_with_the_wrong_token_is_refused_401_and_records_nothing(stub: FailingStub):
    async for w in start_worker(stub, inference_token=INFERENCE_TOKEN + "-not-it"):
        ctx = AgentContext(request=request("none"), client=w.client, proxy=w.proxy)
        with w.proxy.track(ctx):
            with pytest.raises(openai.APIStatusError) as err:
                await ctx.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await ctx.aclose()
        # Inference's own refusal passes through (not retried): the reason says which secret is wrong.
        assert err.value.status_code == 401 and "RELAYRL_INFERENCE_TOKEN" in str(err.value)
        assert ctx.transitions == []


async def test_a_worker_checks_its_token_with_inference_at_start(stub: FailingStub):
    async for w in start_worker(stub, inference_token=INFERENCE_TOKEN + "-not-it"):
        assert w.client is not None
        with pytest.raises(ConfigError, match="refuses this worker's token"):
            await w.client.check_token()
    async for w in start_worker(stub):
        assert w.client is not None
        await w.client.check_token()  # the right one: no error
    async for w in start_worker(stub, inference_urls=f"http://127.0.0.1:{free_port()}"):
        assert w.client is not None
        await w.client.check_token(timeout_s=1.0)  # not up (yet): left to the calls' retries


async def test_a_worker_without_a_token_refuses_to_start(stub: FailingStub):
    with pytest.raises(ConfigError, match="RELAYRL_INFERENCE_TOKEN"):
        async for _ in start_worker(stub, inference_token=None):
            pass
    async for w in start_worker(stub, inference_token=None, inference_urls=""):
        assert w.client is None  # no inference configured (model-free agents only): nothing to authenticate to


async def test_the_proxy_listens_on_loopback_by_default(worker: Worker):
    assert RolloutSettings().proxy_host == "127.0.0.1"
    assert worker.proxy.url is not None and worker.proxy.url.startswith("http://127.0.0.1:")


# --- the whole worker: NATS in, trajectory out ----------------------------------------------------------


async def test_worker_runs_the_openai_agent_from_the_task_stream(stub: FailingStub, settings: ServiceSettings,
                                                                 bus: Bus):
    ws = RolloutSettings(nats_url=settings.nats_url, worker_id="w-nats", inference_urls=INFERENCE)
    async with worker_on_bus(stub, bus, ws):
        req = request(OPENAI_ECHO, rollout_id="n.0", text="ab")
        await bus.publish(subjects.tasks("r"), req, req.rollout_id)
        async with reader(bus, subjects.STREAM_TRAJECTORIES, subjects.trajectories("r")) as sub:
            (msg,) = await sub.fetch(1, timeout=30)
        traj = Trajectory.decode(msg.data)
    assert traj.rollout_id == "n.0" and traj.status == "ok", traj.error
    assert len(traj.transitions) == 2 and 0.0 <= traj.reward <= 1.0


# --- tracing ------------------------------------------------------------------------------------------


async def test_each_proxied_call_is_a_span_under_its_rollout(worker: Worker, monkeypatch: pytest.MonkeyPatch):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from shared import telemetry

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "_exporting", True)
    monkeypatch.setattr(telemetry, "_tracer", provider.get_tracer("test"))
    with telemetry.tracer().start_as_current_span("rollout") as rollout_span:
        ctx = AgentContext(request=request("none"), client=worker.client, proxy=worker.proxy)
    # The call arrives through the proxy, in another task than the one that made the context.
    with worker.proxy.track(ctx):
        await ctx.openai(role="writer").chat.completions.create(
            model=ctx.model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    await ctx.aclose()
    (call,) = [s for s in exporter.get_finished_spans() if s.name == "llm_call"]
    assert call.parent is not None and call.parent.span_id == rollout_span.get_span_context().span_id
    assert call.context.trace_id == rollout_span.get_span_context().trace_id
    (t,) = ctx.transitions
    assert call.attributes["role"] == "writer"
    assert call.attributes["completion_tokens"] == t.num_response_tokens
    assert call.attributes["prompt_tokens"] == t.num_prompt_tokens
