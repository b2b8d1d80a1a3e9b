"""Inference replicas in-process against a real nats-server (policy sync on), and the tiny
model's reference side: weights moved as a trainer step would, greedy decoding, `/v1/stats`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import torch

from services.inference.api import create_app
from services.inference.engine import TorchEngine
from services.inference.settings import Settings
from shared.models import load_causal_lm
from tests.support.secrets import AUTH

PROMPT = [5, 17, 42, 99, 7]


def trained(model_path: Path, seed: int) -> Any:
    """The tiny model with its weights moved, as a trainer step would (tied embeddings stay tied)."""
    model = load_causal_lm(model_path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def replica_settings(model_path: Path, nats_url: str, run_id: str | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        model=str(model_path), device="cpu", dtype="float32", batch_wait_ms=5.0, log_format="console",
        nats_url=nats_url, run_id=run_id, request_timeout_s=5.0, nats_connect_attempts=3,
    )  # fmt: skip
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def replica(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, TorchEngine, list[dict[str, Any]]]]:
    """A replica app with its lifespan running; yields once /readyz is 200, with every
    non-200 /readyz body seen before that (to check what the replica said while syncing)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://inference", timeout=60, headers=AUTH) as client:
            waiting: list[dict[str, Any]] = []
            deadline = time.monotonic() + 30
            while (r := await client.get("/readyz")).status_code != 200:
                waiting.append(r.json())
                assert r.json()["status"] in ("loading", "syncing"), r.json()
                assert time.monotonic() < deadline, f"never ready: {r.json()}"
                await asyncio.sleep(0.01)
            waiting.append(r.json())
            yield client, app.state.runtime.engine, waiting


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/v1/stats")
    assert r.status_code == 200, r.text
    return r.json()
