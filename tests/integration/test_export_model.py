"""A run's weights out of the gateway (`GET /v1/runs/{id}/weights`) and into a Hugging Face
checkpoint directory (`export_model`), with a real nats-server, store and gateway.

No trainer runs here: the test plays it by publishing weights with `publish_weights`, into
the real object store and policy KV a trainer writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import AsyncIterator

import httpx
import pytest
import torch

from services.cli.client import GatewayClient, GatewayError
from services.cli.export_model import PROVENANCE_FILE, ExportError, export_model
from services.cli.nats_server import NatsServer
from shared import subjects
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.messages import AgentInfo
from shared.models import load_causal_lm, load_tokenizer, resolve_model
from shared.weights import publish_weights, read_weights
from tests.support.gateway import gateway, run_body, served
from tests.support.store import RunningStore
from tests.support.waiting import wait_until
from tests.support.secrets import WEIGHTS_KEY


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where `resolve_model("tiny")` builds the tiny model: once per module."""
    cache = tmp_path_factory.mktemp("models")
    resolve_model("tiny", cache)
    return cache


@pytest.fixture
async def client(settings: ServiceSettings, bus: Bus, sqlite_store: RunningStore) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway in-process with run `r1` (model "tiny") created."""
    kv = await bus.kv(subjects.KV_AGENTS)
    await kv.put("copy", AgentInfo(name="copy", worker_id="test").encode())
    async with gateway(settings) as c:
        assert (await c.post("/v1/runs", json=run_body("r1"))).status_code == 201
        yield c


def trained(models: Path, seed: int) -> dict[str, torch.Tensor]:
    """The tiny model's weights moved away from the base, as a trainer's state dict: tied
    tensors (embeddings and lm_head) stay one tensor under two names."""
    model = load_causal_lm(resolve_model("tiny", models))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.state_dict()


async def test_the_latest_and_a_named_version_come_back_byte_for_byte_with_their_headers(
    client: httpx.AsyncClient, bus: Bus, models: Path
) -> None:
    v1 = await publish_weights(bus, "r1", 1, 3, trained(models, 1), signing_key=WEIGHTS_KEY)
    v2 = await publish_weights(bus, "r1", 2, 7, trained(models, 2), signing_key=WEIGHTS_KEY)

    for query, pv, step in (({}, v2, 7), ({"version": 2}, v2, 7), ({"version": 1}, v1, 3)):
        r = await client.get("/v1/runs/r1/weights", params=query)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.content == await read_weights(bus, pv)  # exactly the published bytes
        assert hashlib.sha256(r.content).hexdigest() == pv.sha256 == r.headers["x-policy-sha256"]
        assert r.headers["x-policy-version"] == str(pv.version)
        assert r.headers["x-policy-step"] == str(step)  # an older version's step comes from its header
        assert f'filename="r1-v{pv.version}.safetensors"' in r.headers["content-disposition"]


async def test_an_unknown_run_or_a_version_not_stored_is_404_with_the_reason(
    client: httpx.AsyncClient, bus: Bus, models: Path
) -> None:
    r = await client.get("/v1/runs/nobody/weights")
    assert r.status_code == 404 and "nobody" in r.json()["detail"], r.text
    r = await client.get("/v1/runs/r1/weights")
    assert r.status_code == 404 and "no published weights" in r.json()["detail"], r.text

    state = trained(models, 1)
    for version in (1, 2, 3):  # keep=2: version 1 is pruned once 3 is out
        await publish_weights(bus, "r1", version, version, state, keep=2, signing_key=WEIGHTS_KEY)
    for version in (1, 9):
        r = await client.get("/v1/runs/r1/weights", params={"version": version})
        assert r.status_code == 404, r.text
        detail = r.json()["detail"]
        assert f"no weights version {version}" in detail and "pruned" in detail and "stored: 2, 3" in detail
    assert (await client.get("/v1/runs/r1/weights", params={"version": 2})).status_code == 200
    assert (await client.get("/v1/runs/r1/weights", params={"version": -1})).status_code == 422


async def test_nats_unavailable_is_503_with_retry_after(
    client: httpx.AsyncClient, bus: Bus, nats_server: NatsServer
) -> None:
    nats_server.stop()
    try:
        r = await client.get("/v1/runs/r1/weights")
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
    finally:  # back up, so every connection closes cleanly
        nats_server.start()
        await wait_until(lambda: bus.nc.is_connected, timeout_s=30)
    assert (await client.get("/v1/runs/r1/weights")).status_code == 404  # up again: no weights yet


@pytest.fixture
async def cli(client: httpx.AsyncClient, settings: ServiceSettings) -> AsyncIterator[GatewayClient]:
    """The CLI's gateway client, against a second gateway (the same NATS and store) over HTTP."""
    async with served(settings) as (_, url):
        c = GatewayClient(url, api_key=client.api_key)  # type: ignore[attr-defined]
        yield c
        c.close()


async def test_an_exported_run_is_a_checkpoint_with_its_weights_and_the_base_tokenizer(
    cli: GatewayClient, bus: Bus, models: Path, tmp_path: Path
) -> None:
    await publish_weights(bus, "r1", 1, 3, trained(models, 1), signing_key=WEIGHTS_KEY)
    published = trained(models, 2)
    pv = await publish_weights(bus, "r1", 2, 7, published, signing_key=WEIGHTS_KEY)
    out = tmp_path / "exports" / "latest"

    result = await asyncio.to_thread(export_model, cli, "r1", out, None, models)
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert result == {**provenance, "path": str(out)}
    assert {k: provenance[k] for k in ("run_id", "version", "step", "sha256", "base_model")} == {
        "run_id": "r1", "version": 2, "step": 7, "sha256": pv.sha256, "base_model": "tiny",
    }  # fmt: skip
    assert [p.name for p in out.parent.iterdir()] == ["latest"], "no temporary directory left"

    # An ordinary model directory: what `model:` of a run resolves and loads.
    path = resolve_model(str(out))
    model, base = load_causal_lm(path), load_causal_lm(resolve_model("tiny", models))
    weights = model.state_dict()
    assert weights.keys() == published.keys()
    assert all(torch.equal(weights[k], published[k]) for k in published)
    tokenizer, base_tokenizer = load_tokenizer(path), load_tokenizer(resolve_model("tiny", models))
    assert tokenizer.chat_template == base_tokenizer.chat_template
    messages = [{"role": "user", "content": "add 2 and 3"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    base_ids = base_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids["input_ids"] == base_ids["input_ids"]
    base.load_state_dict(published)
    input_ids = torch.tensor([ids["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, base(input_ids=input_ids).logits)

    # A named version: the older one, still kept.
    older = await asyncio.to_thread(export_model, cli, "r1", tmp_path / "v1", 1, models)
    assert older["version"] == 1 and older["step"] == 3


async def test_an_export_over_a_non_empty_directory_is_refused_unless_forced(
    cli: GatewayClient, bus: Bus, models: Path, tmp_path: Path
) -> None:
    await publish_weights(bus, "r1", 1, 1, trained(models, 1), signing_key=WEIGHTS_KEY)
    out = tmp_path / "exports" / "taken"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")

    with pytest.raises(ExportError, match="not empty"):
        await asyncio.to_thread(export_model, cli, "r1", out, None, models)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"

    await asyncio.to_thread(export_model, cli, "r1", out, None, models, True)
    assert (out / "config.json").exists() and not (out / "notes.txt").exists()
    assert [p.name for p in out.parent.iterdir()] == ["taken"], "the replaced directory is gone"


async def test_weights_that_do_not_fit_the_base_model_are_refused_naming_the_keys(
    cli: GatewayClient, bus: Bus, models: Path, tmp_path: Path
) -> None:
    state = trained(models, 1)
    state["model.norm.scale"] = state.pop("model.norm.weight")
    await publish_weights(bus, "r1", 1, 1, state, signing_key=WEIGHTS_KEY)
    with pytest.raises(ExportError, match=r"missing model\.norm\.weight; unexpected model\.norm\.scale"):
        await asyncio.to_thread(export_model, cli, "r1", tmp_path / "bad", None, models)
    assert not (tmp_path / "bad").exists()

    with pytest.raises(GatewayError, match="404"):
        await asyncio.to_thread(export_model, cli, "r1", tmp_path / "gone", 5, models)
    with pytest.raises(GatewayError, match="404"):
        await asyncio.to_thread(export_model, cli, "nobody", tmp_path / "nobody", None, models)
