"""The gateway's OpenAPI schema, fuzzed with schemathesis (hypothesis) against a real nats-server
and store, with a valid admin key: valid and invalid requests alike, no answer is a 5xx."""

from __future__ import annotations

import asyncio

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from schemathesis.generation import GenerationMode

from shared import subjects
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.messages import AgentInfo
from tests.support.gateway import bearer, issue_key, served
from tests.support.store import RunningStore

CASES = 1000


async def test_no_generated_request_gets_a_5xx(settings: ServiceSettings, bus: Bus, sqlite_store: RunningStore) -> None:
    kv = await bus.kv(subjects.KV_AGENTS)
    await kv.put("copy", AgentInfo(name="copy", worker_id="test").encode())
    # Rate limit out of the way: the fuzzer sends as fast as it can with one key.
    async with served(settings, rate_per_s=1e6, rate_burst=1_000_000) as (app, url):
        key = await issue_key(app.state.store)
        schema = schemathesis.openapi.from_dict(app.openapi())
        strategy = st.one_of(
            [op.ok().as_strategy(generation_mode=mode) for op in schema.get_all_operations()
             for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]  # fmt: skip
        )
        failures: list[str] = []
        sent = [0]
        session = requests.Session()

        @hypothesis_settings(
            max_examples=CASES, deadline=None, database=None, derandomize=True,
            suppress_health_check=list(HealthCheck),
        )  # fmt: skip
        @given(case=strategy)
        def fuzz(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(base_url=url, session=session, headers=bearer(key), timeout=30)
            sent[0] += 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}")

        # hypothesis and requests are synchronous; the gateway and the store run on this loop.
        await asyncio.to_thread(fuzz)
        session.close()
    assert sent[0] >= CASES
    assert not failures, "\n".join(failures[:20])
