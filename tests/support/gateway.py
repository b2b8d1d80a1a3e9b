"""The gateway app in-process (lifespan entered, served over ASGI), and a training run's body."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx

from shared.config import ServiceSettings
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings


@asynccontextmanager
async def gateway(settings: ServiceSettings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewaySettings(nats_url=settings.nats_url, store_timeout_s=5.0, pace_interval_s=0.05))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as c:
            yield c


def run_body(run_id: str = "r1", rows: int = 12, **training: Any) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "model": "tiny",
        "agent": "copy",
        "algorithm": "grpo",
        "dataset": [{"text": f"w{i}"} for i in range(rows)],
        "training": {"learning_rate": 1e-3, "batch_size": 2, "group_size": 3, "epochs": 1, **training},
        "runtime": {"nworkers": 2},
        "max_staleness": 1,
    }
