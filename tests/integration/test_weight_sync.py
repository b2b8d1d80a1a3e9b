"""Weight sync: trainer publish -> object store + KV -> inference replicas swap (real nats-server)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from structlog.testing import capture_logs

from services.cli.nats_server import free_port
from services.inference.api import create_app
from services.inference.policy import PolicySyncError
from shared import subjects
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.messages import PolicyVersion, TrainerProgress
from shared.weights import (
    WeightsError,
    latest_policy,
    load_state_dict,
    publish_weights,
    put_weight_bytes,
    read_weights,
    serialize_state_dict,
    sign_weights,
)
from tests.support.replica import PROMPT, greedy, replica, replica_settings, stats, trained
from tests.support.waiting import wait_until
from tests.support.secrets import WEIGHTS_KEY


# --- helpers -------------------------------------------------------------------------------


async def complete(client: httpx.AsyncClient, max_tokens: int) -> dict[str, Any]:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def serving(client: httpx.AsyncClient, run_id: str, version: int) -> bool:
    s = await stats(client)
    return s["policy_version"] == version and s["policy_run_id"] == run_id


# --- the protocol ------------------------------------------------------------------------------


async def test_publish_read_round_trip_and_integrity(bus: Bus, model_path: Path) -> None:
    model = trained(model_path, seed=1)
    state = model.state_dict()
    pv = await publish_weights(bus, "r1", version=1, step=10, state_dict=state, keep=2, signing_key=WEIGHTS_KEY)
    assert (pv.run_id, pv.version, pv.step, pv.object) == ("r1", 1, 10, subjects.weights_object("r1", 1))
    assert await latest_policy(bus, "r1") == pv
    assert await latest_policy(bus, "never-published") is None

    data = await read_weights(bus, pv)
    assert len(data) == pv.size
    loaded = load_state_dict(data)
    # tied embeddings are written once; every other tensor comes back bit-exact
    assert len(loaded) == len(state) - 1 and {"lm_head.weight", "model.embed_tokens.weight"} & loaded.keys()
    assert all(torch.equal(t, state[name]) for name, t in loaded.items())

    # the layout is the object store's own: nats-py's reader gets the same bytes
    store = await bus.object_store(subjects.OBJ_WEIGHTS)
    assert (await store.get(pv.object)).data == data

    with pytest.raises(WeightsError, match="sha256"):
        await read_weights(bus, pv.model_copy(update={"sha256": "0" * 64}))
    with pytest.raises(WeightsError, match="bytes"):
        await read_weights(bus, pv.model_copy(update={"size": pv.size + 1}))
    with pytest.raises(WeightsError, match="not found"):
        await read_weights(bus, pv.model_copy(update={"object": "r1/999"}))
    with pytest.raises(WeightsError, match="safetensors"):
        load_state_dict(b"not a safetensors file")


async def test_chunked_put_replaces_and_reads_back(bus: Bus) -> None:
    """Many chunks with a small ack window; writing a name again replaces its bytes."""
    first, second = bytes(range(256)) * 12_000, bytes(reversed(range(256))) * 9_000
    stored = await put_weight_bytes(bus, "chunks", 1, first, chunk_size=64 * 1024, window=3)
    assert stored.chunks == -(-len(first) // (64 * 1024)) and stored.size == len(first)
    pv = PolicyVersion(run_id="chunks", version=1, object=stored.name, sha256=stored.sha256, size=stored.size, step=0)
    assert await read_weights(bus, pv) == first

    again = await put_weight_bytes(bus, "chunks", 1, second, chunk_size=100_000)
    pv2 = pv.model_copy(update={"sha256": again.sha256, "size": again.size})
    assert await read_weights(bus, pv2) == second
    with pytest.raises(WeightsError):  # the old digest no longer describes the object
        await read_weights(bus, pv)


async def test_pruning_keeps_the_newest_k(bus: Bus) -> None:
    state = {"w": torch.arange(12.0).reshape(3, 4)}
    store = await bus.object_store(subjects.OBJ_WEIGHTS)

    async def versions(run: str) -> list[int]:
        infos = await store.list(ignore_deletes=True)
        return sorted(int(i.name.split("/")[1]) for i in infos if i.name.startswith(f"{run}/") and not i.deleted)

    await publish_weights(bus, "other", 1, 1, state, keep=1, signing_key=WEIGHTS_KEY)
    for v in range(1, 6):
        await publish_weights(bus, "prune", v, v, state, keep=3, signing_key=WEIGHTS_KEY)
    assert await versions("prune") == [3, 4, 5]
    await publish_weights(bus, "prune", 6, 6, state, keep=1, signing_key=WEIGHTS_KEY)
    assert await versions("prune") == [6]
    # a trainer resumed from an older checkpoint: its version stays, the abandoned newer one goes
    await publish_weights(bus, "prune", 4, 4, state, keep=2, signing_key=WEIGHTS_KEY)
    assert await versions("prune") == [4]
    assert (await latest_policy(bus, "prune")).version == 4  # type: ignore[union-attr]
    assert await versions("other") == [1]
    with pytest.raises(ValueError):
        await publish_weights(bus, "prune", 7, 7, state, keep=0, signing_key=WEIGHTS_KEY)


def test_serialize_writes_tied_tensors_once() -> None:
    shared = torch.randn(4, 3)
    data = serialize_state_dict({"embed": shared, "head": shared, "norm": torch.ones(3)})
    assert sorted(load_state_dict(data)) == ["embed", "norm"]


# --- replicas ---------------------------------------------------------------------------------------


async def test_two_replicas_serve_a_published_version(bus: Bus, nats_url: str, model_path: Path) -> None:
    new = trained(model_path, seed=2)
    fixed = replica_settings(model_path, nats_url, run_id="r1")
    follow = replica_settings(model_path, nats_url, run_id=None)
    async with replica(fixed) as (a, _, _), replica(follow) as (b, _, _):
        before = await complete(a, 8)
        assert before["policy_version"] == 0 and (await stats(b))["policy_follows"] == "*"
        # progress entries share the bucket; replicas must not mistake them for weights
        kv = await bus.kv(subjects.KV_POLICY)
        await kv.put(subjects.progress_key("r1"), TrainerProgress(run_id="r1", step=3, version=3).encode())

        await publish_weights(bus, "r1", version=1, step=1, state_dict=new.state_dict(), keep=2, signing_key=WEIGHTS_KEY)
        await wait_until(lambda: serving(a, "r1", 1), timeout_s=15)
        await wait_until(lambda: serving(b, "r1", 1), timeout_s=15)

        expected = greedy(new, PROMPT, 8)
        for client in (a, b):
            out = await complete(client, 8)
            choice = out["choices"][0]
            assert choice["token_versions"] == [1] * 8 and out["policy_version"] == 1
            assert choice["token_ids"] == expected  # the new weights produced these tokens
            ready = (await client.get("/readyz")).json()
            assert ready["policy_version"] == 1 and ready["policy_run_id"] == "r1" and ready["policy_synced"]
        assert before["choices"][0]["token_ids"] != expected


async def test_bad_versions_are_skipped(bus: Bus, nats_url: str, model_path: Path) -> None:
    good = trained(model_path, seed=3)
    async with replica(replica_settings(model_path, nats_url, run_id="bad")) as (client, engine, _):
        await publish_weights(bus, "bad", 1, 1, good.state_dict(), keep=5, signing_key=WEIGHTS_KEY)
        await wait_until(lambda: serving(client, "bad", 1), timeout_s=15)
        kv = await bus.kv(subjects.KV_POLICY)

        # 1: the KV entry's digest does not match the object's bytes
        stored = await put_weight_bytes(bus, "bad", 2, serialize_state_dict(good.state_dict()))
        # (signed, so it is the digest check that catches it)
        wrong_sha = PolicyVersion(run_id="bad", version=2, object=stored.name, sha256="ab" * 32, size=stored.size, step=2,
                                  signature=sign_weights(WEIGHTS_KEY, "bad", 2, "ab" * 32))  # fmt: skip
        await kv.put(subjects.policy_key("bad"), wrong_sha.encode())
        await wait_until(lambda: _rejected(client, 1), timeout_s=15)
        assert "sha256" in (await stats(client))["policy_last_error"]

        # 2: well-formed weights of another shape
        await publish_weights(bus, "bad", 3, 3, {"model.norm.weight": torch.ones(7)}, keep=5, signing_key=WEIGHTS_KEY)
        await wait_until(lambda: _rejected(client, 2), timeout_s=15)
        s = await stats(client)
        assert "shape" in s["policy_last_error"]
        assert s["policy_version"] == 1 and engine.version == 1 and s["policy_swaps"] == 1
        assert (await client.get("/healthz")).status_code == 200
        out = await complete(client, 4)
        assert out["choices"][0]["token_versions"] == [1] * 4

        # and the next good version is taken
        await publish_weights(bus, "bad", 4, 4, good.state_dict(), keep=5, signing_key=WEIGHTS_KEY)
        await wait_until(lambda: serving(client, "bad", 4), timeout_s=15)


async def test_unsigned_or_missigned_weights_are_refused_and_the_previous_served(
    bus: Bus, settings: ServiceSettings, nats_url: str, model_path: Path
) -> None:
    """Someone with NATS access but without RELAYRL_WEIGHTS_KEY writes a weight object and the
    run's PolicyVersion: every replica refuses it with the reason logged and keeps serving the
    version it had; a correctly signed version is served again after that."""
    good, forged = trained(model_path, seed=11), trained(model_path, seed=12)
    expected, forged_tokens = greedy(good, PROMPT, 8), greedy(forged, PROMPT, 8)
    assert expected != forged_tokens
    intruder = await Bus.connect(settings, "intruder")  # its own connection: NATS access, no key
    try:
        async with replica(replica_settings(model_path, nats_url, run_id="sig")) as (client, engine, _), \
                replica(replica_settings(model_path, nats_url, run_id=None)) as (following, _, _):  # fmt: skip
            first = await publish_weights(bus, "sig", 1, 1, good.state_dict(), keep=5, signing_key=WEIGHTS_KEY)
            assert first.signature and first.signature.startswith("hmac-sha256-v1:")
            await wait_until(lambda: serving(client, "sig", 1), timeout_s=15)
            await wait_until(lambda: serving(following, "sig", 1), timeout_s=15)

            kv = await intruder.kv(subjects.KV_POLICY)
            stored = await put_weight_bytes(intruder, "sig", 2, serialize_state_dict(forged.state_dict()))
            base = dict(run_id="sig", object=stored.name, sha256=stored.sha256, size=stored.size)
            attempts = {
                "unsigned": PolicyVersion(version=2, step=2, **base),
                "signed with another key": PolicyVersion(
                    version=3, step=3, signature=sign_weights("an-intruder's-own-key-0123456789", "sig", 3,
                                                              stored.sha256), **base),  # fmt: skip
                # a genuine signature copied from version 1 onto the forged bytes and a new version
                "replayed signature": PolicyVersion(version=4, step=4, signature=first.signature, **base),
            }
            with capture_logs() as logs:
                for n, (why, pv) in enumerate(attempts.items(), start=1):
                    await kv.put(subjects.policy_key("sig"), pv.encode())
                    for c in (client, following):
                        await wait_until(lambda c=c, n=n: _refused(c, n), timeout_s=15)
                        s = await stats(c)
                        assert s["policy_version"] == 1 and s["policy_run_id"] == "sig", (why, s)
                        assert "unsigned" in s["policy_last_error"] if why == "unsigned" else \
                            "does not match" in s["policy_last_error"], (why, s["policy_last_error"])  # fmt: skip
                    for out in (await complete(client, 8), await _complete_run(following, "sig")):
                        assert out["choices"][0]["token_ids"] == expected, why  # never the forged weights
                        assert out["policy_sha256"] == first.sha256
            refusals = [e for e in logs if e["event"].startswith("policy version refused")]
            assert len(refusals) == 2 * len(attempts), logs  # once per replica and version: never retried
            assert all(e["log_level"] == "error" and e["serving"] == 1 and e["reason"] for e in refusals)
            assert WEIGHTS_KEY not in repr(logs)
            await asyncio.sleep(1.5)  # past the first retry delay: a refused version is not read again
            s = await stats(client)
            assert s["policy_refused_signature"] == len(attempts) and s["policy_retries"] == 0
            assert engine.version == 1 and s["policy_swaps"] == 1

            # The trainer's next version, signed, is taken.
            await publish_weights(bus, "sig", 5, 5, forged.state_dict(), keep=5, signing_key=WEIGHTS_KEY)
            await wait_until(lambda: serving(client, "sig", 5), timeout_s=15)
            await wait_until(lambda: serving(following, "sig", 5), timeout_s=15)
            assert (await complete(client, 8))["choices"][0]["token_ids"] == forged_tokens
    finally:
        await intruder.close()


async def _refused(client: httpx.AsyncClient, n: int) -> bool:
    return (await stats(client))["policy_refused_signature"] >= n


async def _complete_run(client: httpx.AsyncClient, run: str) -> dict[str, Any]:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            "run_id": run}  # fmt: skip
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def _rejected(client: httpx.AsyncClient, n: int) -> bool:
    return (await stats(client))["policy_rejected"] >= n


async def test_in_flight_request_spans_the_swap(bus: Bus, nats_url: str, model_path: Path) -> None:
    new = trained(model_path, seed=4)
    async with replica(replica_settings(model_path, nats_url, run_id="live")) as (client, engine, _):
        start = engine.stats.generated_tokens
        long = asyncio.create_task(complete(client, 900))
        # publish only once the request is decoding, so the swap lands inside it
        await wait_until(lambda: engine.stats.generated_tokens >= start + 16, timeout_s=15, interval_s=0.002)
        await publish_weights(bus, "live", 1, 1, new.state_dict(), keep=2, signing_key=WEIGHTS_KEY)
        out = await long
        versions = out["choices"][0]["token_versions"]
        assert len(versions) == 900 and versions == sorted(versions)
        assert versions[0] == 0 and versions[-1] == 1, "the swap did not land inside the request"
        assert out["policy_version"] == 1
        assert (await stats(client))["weight_swaps"] == 1


async def test_late_replica_is_ready_only_with_the_latest(bus: Bus, nats_url: str, model_path: Path) -> None:
    v1, v2 = trained(model_path, seed=5), trained(model_path, seed=6)
    await publish_weights(bus, "late", 1, 1, v1.state_dict(), keep=2, signing_key=WEIGHTS_KEY)
    await publish_weights(bus, "late", 2, 2, v2.state_dict(), keep=2, signing_key=WEIGHTS_KEY)
    async with replica(replica_settings(model_path, nats_url, run_id="late")) as (client, _, seen):
        first_ready = seen[-1]
        assert first_ready["status"] == "ready" and first_ready["policy_version"] == 2
        assert all(body["status"] in ("loading", "syncing") for body in seen[:-1])
        out = await complete(client, 8)
        assert out["choices"][0]["token_versions"] == [2] * 8
        assert out["choices"][0]["token_ids"] == greedy(v2, PROMPT, 8)

    # a following replica takes whichever run published last
    other = trained(model_path, seed=7)
    await publish_weights(bus, "later", 5, 50, other.state_dict(), keep=1, signing_key=WEIGHTS_KEY)
    async with replica(replica_settings(model_path, nats_url, run_id=None)) as (client, _, seen):
        assert seen[-1]["policy_run_id"] == "later" and seen[-1]["policy_version"] == 5
        out = await complete(client, 8)
        assert out["choices"][0]["token_ids"] == greedy(other, PROMPT, 8)


async def test_unreachable_nats_fails_startup(model_path: Path) -> None:
    settings = replica_settings(
        model_path, f"nats://127.0.0.1:{free_port()}", run_id="r1", nats_connect_attempts=1, nats_connect_timeout_s=0.5
    )
    app = create_app(settings)
    started = time.monotonic()
    with pytest.raises(PolicySyncError, match="unreachable.*--no-watch-policy"):
        async with app.router.lifespan_context(app):
            pass
    assert time.monotonic() - started < 10
