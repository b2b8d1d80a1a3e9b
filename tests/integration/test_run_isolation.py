"""Run isolation and weight-sync recovery (issue 9 items 8 and 12), with a real nats-server.

- a version whose read fails once is retried while it is the run's latest, and then served;
- a nats-server restart under a running replica does not end its watch;
- two runs sampled concurrently by one replica each get their own weights (tokens and
  logprobs checked against a forward pass with each run's weights, sha256 of what served);
- a pinned replica refuses another run; the capture client always names its run;
- the gateway refuses a run whose model no inference replica serves.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import pytest
import torch

from services.cli.nats_server import NatsServer
from services.rollout.capture import CHAT, CaptureClient, InferenceError
from shared import subjects
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.messages import AgentInfo, PolicyVersion
from shared.models import load_causal_lm
from shared.weights import publish_weights, put_weight_bytes, serialize_state_dict, sign_weights
from tests.support.gateway import gateway, run_body
from tests.support.replica import PROMPT, greedy, replica, replica_settings, stats, trained
from tests.support.waiting import wait_until
from tests.support.secrets import WEIGHTS_KEY

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


async def complete(client: httpx.AsyncClient, run: str | None, max_tokens: int = 8, header: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                            "return_token_ids": True, "logprobs": 0}  # fmt: skip
    headers = {}
    if run is not None and header:
        headers["X-Relayrl-Run"] = run
    elif run is not None:
        body["run_id"] = run
    r = await client.post("/v1/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def logprobs_of(model: Any, prompt: list[int], tokens: list[int]) -> list[float]:
    """What `model` gives each sampled token after its prefix (one forward pass)."""
    ids = torch.tensor([prompt + tokens])
    with torch.inference_mode():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]


async def publish_when_up(bus: Bus, run: str, version: int, state_dict: Any) -> PolicyVersion:
    """Publish, waiting out the JetStream 503s / timeouts right after a server restart."""
    for _ in range(60):
        try:
            return await publish_weights(bus, run, version, version, state_dict, keep=2, signing_key=WEIGHTS_KEY)
        except (nats.errors.Error, asyncio.TimeoutError, OSError):
            await asyncio.sleep(0.5)
    raise AssertionError("could not publish after the restart")


# --- item 8: a failed read never sticks ----------------------------------------------------


async def test_a_missing_object_is_retried_until_it_is_there(bus: Bus, nats_url: str, model_path: Path) -> None:
    new = trained(model_path, seed=31)
    data = serialize_state_dict(new.state_dict())
    pv = PolicyVersion(run_id="miss", version=1, object=subjects.weights_object("miss", 1),
                       sha256=hashlib.sha256(data).hexdigest(), size=len(data), step=1,
                       signature=sign_weights(WEIGHTS_KEY, "miss", 1, hashlib.sha256(data).hexdigest()))  # fmt: skip
    async with replica(replica_settings(model_path, nats_url, run_id="miss")) as (client, engine, _):
        kv = await bus.kv(subjects.KV_POLICY)
        await kv.put(subjects.policy_key("miss"), pv.encode())  # the KV names an object not written yet
        await wait_until(lambda: _stat(client, "policy_rejected"), timeout_s=15)
        assert "not found" in (await stats(client))["policy_last_error"]
        assert engine.version == 0
        # the object arrives under the same name: the same version is tried again and taken
        await put_weight_bytes(bus, "miss", 1, data)
        await wait_until(lambda: _serving(client, "miss", 1), timeout_s=20)
        out = await complete(client, None)
        assert out["choices"][0]["token_ids"] == greedy(new, PROMPT, 8)
        assert out["choices"][0]["token_versions"] == [1] * 8 and out["policy_sha256"] == pv.sha256


async def test_a_corrupt_object_is_retried_once_fixed(bus: Bus, nats_url: str, model_path: Path) -> None:
    new = trained(model_path, seed=32)
    data = serialize_state_dict(new.state_dict())
    corrupt = bytearray(data)
    corrupt[-1] ^= 0xFF
    stored = await put_weight_bytes(bus, "fix", 1, bytes(corrupt))
    pv = PolicyVersion(run_id="fix", version=1, object=stored.name, sha256=hashlib.sha256(data).hexdigest(),
                       size=len(data), step=1,
                       signature=sign_weights(WEIGHTS_KEY, "fix", 1, hashlib.sha256(data).hexdigest()))  # fmt: skip
    async with replica(replica_settings(model_path, nats_url, run_id=None)) as (client, _, _):
        kv = await bus.kv(subjects.KV_POLICY)
        await kv.put(subjects.policy_key("fix"), pv.encode())
        await wait_until(lambda: _stat(client, "policy_rejected"), timeout_s=15)
        assert "sha256" in (await stats(client))["policy_last_error"]
        await put_weight_bytes(bus, "fix", 1, data)  # repaired in place
        await wait_until(lambda: _serving(client, "fix", 1), timeout_s=20)
        out = await complete(client, "fix")
        assert out["choices"][0]["token_ids"] == greedy(new, PROMPT, 8) and out["policy_run_id"] == "fix"


async def test_the_watch_survives_a_nats_restart(nats_server: NatsServer, settings: ServiceSettings, model_path: Path) -> None:
    v1, v2 = trained(model_path, seed=33), trained(model_path, seed=34)
    bus = await Bus.connect(settings, "test-restart")
    try:
        await bus.ensure_topology()
        async with replica(replica_settings(model_path, nats_server.url, run_id=None)) as (client, _, _):
            await publish_weights(bus, "rs", 1, 1, v1.state_dict(), keep=2, signing_key=WEIGHTS_KEY)
            await wait_until(lambda: _serving(client, "rs", 1), timeout_s=15)
            nats_server.stop()
            await asyncio.sleep(1.0)
            nats_server.start()  # same port, same store dir
            await wait_until(lambda: bus.nc.is_connected, timeout_s=30)
            await publish_when_up(bus, "rs", 2, v2.state_dict())
            await wait_until(lambda: _serving(client, "rs", 2), timeout_s=30)
            out = await complete(client, "rs")
            assert out["choices"][0]["token_ids"] == greedy(v2, PROMPT, 8)
            assert out["choices"][0]["token_versions"] == [2] * 8
            assert (await client.get("/healthz")).status_code == 200
    finally:
        await bus.close()


# --- item 12: runs never mix ---------------------------------------------------------------------


async def test_two_runs_on_one_replica_each_get_their_own_weights(bus: Bus, nats_url: str, model_path: Path) -> None:
    a, b = trained(model_path, seed=41), trained(model_path, seed=42)
    expected = {"ra": greedy(a, PROMPT, 8), "rb": greedy(b, PROMPT, 8)}
    assert expected["ra"] != expected["rb"]
    async with replica(replica_settings(model_path, nats_url, run_id=None, max_runs=2)) as (client, engine, _):
        pa = await publish_weights(bus, "ra", 1, 1, a.state_dict(), keep=2, signing_key=WEIGHTS_KEY)
        pb = await publish_weights(bus, "rb", 3, 3, b.state_dict(), keep=2, signing_key=WEIGHTS_KEY)
        await wait_until(lambda: _serving(client, "rb", 3), timeout_s=15)  # the default: published last
        runs = ["ra", "rb"] * 6
        outs = await asyncio.gather(*(complete(client, r, header=i % 4 == 0) for i, r in enumerate(runs)))
        for run, out in zip(runs, outs):
            model, pv = (a, pa) if run == "ra" else (b, pb)
            choice = out["choices"][0]
            assert out["policy_run_id"] == run and out["policy_sha256"] == pv.sha256
            assert choice["token_versions"] == [pv.version] * 8
            assert choice["token_ids"] == expected[run]
            want = logprobs_of(model, PROMPT, choice["token_ids"])
            assert choice["logprobs"]["token_logprobs"] == pytest.approx(want, abs=2e-3)
        assert engine.stats.run_switches >= 1
        # a run that published nothing is served with the checkpoint's weights (its version 0)
        fresh = await complete(client, "rc")
        assert fresh["policy_run_id"] is None and fresh["choices"][0]["token_versions"] == [0] * 8
        base = load_causal_lm(model_path).eval()
        assert fresh["choices"][0]["token_ids"] == greedy(base, PROMPT, 8)
        want = logprobs_of(base, PROMPT, fresh["choices"][0]["token_ids"])
        assert fresh["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(want, abs=2e-3)
        # no run named: the run that published last, as before
        plain = await complete(client, None)
        assert plain["policy_run_id"] == "rb" and plain["choices"][0]["token_ids"] == expected["rb"]
        held = (await stats(client))["policy_runs"]
        assert held["ra"]["version"] == 1 and held["rb"]["version"] == 3


async def test_a_run_loads_on_first_request_and_sets_beyond_max_runs_are_dropped(
    bus: Bus, nats_url: str, model_path: Path
) -> None:
    models = {f"m{i}": trained(model_path, seed=50 + i) for i in range(3)}
    for run, model in models.items():
        await publish_weights(bus, run, 1, 1, model.state_dict(), keep=1, signing_key=WEIGHTS_KEY)
    async with replica(replica_settings(model_path, nats_url, run_id=None, max_runs=1)) as (client, engine, _):
        for run in ("m0", "m1", "m0"):  # m2 (published last) is the default and is never dropped
            out = await complete(client, run)
            assert out["policy_run_id"] == run
            assert out["choices"][0]["token_ids"] == greedy(models[run], PROMPT, 8)
        await wait_until(lambda: len([k for k in engine.versions if k is not None]) <= 2, timeout_s=10)


async def test_a_pinned_replica_refuses_other_runs(bus: Bus, nats_url: str, model_path: Path) -> None:
    async with replica(replica_settings(model_path, nats_url, run_id="pin")) as (client, _, _):
        body = {"prompt": PROMPT, "max_tokens": 2, "run_id": "other"}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "wrong_run" and "'pin'" in err["message"] and "'other'" in err["message"]
        r = await client.post("/v1/completions", json={**body, "run_id": "pin"}, headers={"X-Relayrl-Run": "x"})
        assert r.status_code == 400 and "header" in r.text
        assert (await complete(client, "pin"))["choices"][0]["token_versions"] == [0] * 8

        # the capture client names the rollout's run: another run's call is refused, never sampled
        capture = CaptureClient(client, ["http://inference"], retries=0)
        chat = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        with pytest.raises(InferenceError) as refused:
            await capture.capture("http://inference", CHAT, chat, "assistant", run_id="other")
        assert refused.value.status == 409
        ok = await capture.capture("http://inference", CHAT, {**chat, "run_id": "other"}, "assistant", run_id="pin")
        assert len(ok.transitions) == 1


# --- the gateway: a run's model must be one inference serves -------------------------------------


async def test_a_run_with_a_model_inference_does_not_serve_is_refused(
    settings: ServiceSettings, bus: Bus, nats_url: str, model_path: Path, sqlite_store: Any
) -> None:
    kv = await bus.kv(subjects.KV_AGENTS)
    await kv.put("copy", AgentInfo(name="copy", worker_id="test").encode())
    async with gateway(settings) as gw:
        # no replica advertises yet: nothing to check against, the run is taken
        assert (await gw.post("/v1/runs", json=run_body("early"))).status_code == 201
        async with replica(replica_settings(model_path, nats_url, run_id=None, served_model_name="tiny-policy")):
            leases = await bus.kv(subjects.KV_LEASES, ttl_s=subjects.LEASE_TTL_S)
            await wait_until(lambda: _advertised(leases), timeout_s=15)
            r = await gw.post("/v1/runs", json={**run_body("wrong"), "model": "Qwen/Qwen2.5-7B"})
            assert r.status_code == 409, r.text
            assert "Qwen/Qwen2.5-7B" in r.text and "tiny-policy" in r.text
            for name in ("tiny-policy", str(model_path)):
                r = await gw.post("/v1/runs", json={**run_body(f"ok{len(name)}"), "model": name})
                assert r.status_code == 201, r.text
        # a stopped replica takes its advert with it
        assert not await _advertised(leases)


async def _advertised(leases: Any) -> bool:
    try:
        return any(k.startswith("inference.") for k in await leases.keys())
    except Exception:  # noqa: BLE001 - NoKeysError: nothing there
        return False


async def _stat(client: httpx.AsyncClient, name: str) -> Any:
    return (await stats(client))[name]


async def _serving(client: httpx.AsyncClient, run: str, version: int) -> bool:
    s = await stats(client)
    return s["policy_run_id"] == run and s["policy_version"] == version
