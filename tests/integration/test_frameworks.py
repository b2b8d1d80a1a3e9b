"""Agents written for other frameworks run unchanged through the capture proxy, with exact ids.

Each agent below only receives a base URL (what a framework user already passes) and never
touches relayrl's own client: LangChain's `ChatOpenAI` (async, two roles), a plain `def`
agent on the blocking OpenAI SDK (run in the worker's thread pool), and raw httpx. Every
recorded transition must equal, token for token, the same greedy call made straight to
inference.
"""

from __future__ import annotations

from typing import AsyncIterator

import httpx
import openai
from langchain_core.messages import AIMessage, HumanMessage
from langchain_openai import ChatOpenAI

from services.rollout import registry
from services.rollout.context import API_KEY, AgentContext
from services.rollout.worker import Worker
from tests.support.proxy import FailingStub, assert_transition_is, direct_chat, request, start_worker

import pytest

QUESTION = "name a color"


@pytest.fixture
async def worker(stub: FailingStub) -> AsyncIterator[Worker]:
    async for w in start_worker(stub):
        yield w


@registry.agent("test-langchain")
async def langchain_agent(ctx: AgentContext) -> float:
    """A writer proposes, a critic answers on the same history: two roles, one policy."""
    def llm(role: str) -> ChatOpenAI:
        return ChatOpenAI(base_url=ctx.base_url_for(role), api_key=API_KEY, model="any", temperature=0,
                          max_tokens=6, max_retries=0)

    first = await llm("writer").ainvoke([HumanMessage(QUESTION)])
    await llm("critic").ainvoke([HumanMessage(QUESTION), AIMessage(first.content), HumanMessage("Is that right?")])
    return 1.0


@registry.agent("test-sync-openai")
def sync_openai_agent(ctx: AgentContext) -> float:
    client = openai.OpenAI(base_url=ctx.base_url_for("solver"), api_key=API_KEY, max_retries=0)
    try:
        reply = client.chat.completions.create(model="any", messages=[{"role": "user", "content": QUESTION}],
                                               temperature=0, max_tokens=6)
    finally:
        client.close()
    ctx.event("answered", chars=len(reply.choices[0].message.content or ""))
    return 0.5


@registry.agent("test-httpx")
async def httpx_agent(ctx: AgentContext) -> float:
    async with httpx.AsyncClient(base_url=ctx.base_url, timeout=60) as http:
        r = await http.post("/chat/completions", json={
            "model": "any", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 6})
        r.raise_for_status()
    return 0.0


async def test_langchain_chat_openai_runs_unchanged_with_exact_ids(worker: Worker, direct: httpx.AsyncClient):
    traj = await worker.run_rollout(request("test-langchain"), attempt=1)
    assert traj.status == "ok", traj.error
    assert [t.role for t in traj.transitions] == ["writer", "critic"]
    first = await direct_chat(direct, [{"role": "user", "content": QUESTION}])
    answer = first["choices"][0]["message"]["content"]
    second = await direct_chat(direct, [{"role": "user", "content": QUESTION},
                                        {"role": "assistant", "content": answer},
                                        {"role": "user", "content": "Is that right?"}])
    assert_transition_is(traj.transitions[0], first["prompt_token_ids"], first["choices"][0])
    assert_transition_is(traj.transitions[1], second["prompt_token_ids"], second["choices"][0])


@pytest.mark.parametrize("agent, role, reward", [("test-sync-openai", "solver", 0.5), ("test-httpx", "assistant", 0.0)])
async def test_sync_sdk_and_raw_http_agents_are_captured_exactly(
    worker: Worker, direct: httpx.AsyncClient, agent: str, role: str, reward: float
):
    traj = await worker.run_rollout(request(agent), attempt=1)
    assert traj.status == "ok", traj.error
    assert traj.reward == reward
    (t,) = traj.transitions
    assert t.role == role
    same = await direct_chat(direct, [{"role": "user", "content": QUESTION}])
    assert_transition_is(t, same["prompt_token_ids"], same["choices"][0])
    if agent == "test-sync-openai":
        assert [e.name for e in traj.events] == ["answered"]
