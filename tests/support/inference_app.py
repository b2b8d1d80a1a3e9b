"""The inference app in-process, for tests: started, ready, and stopped again."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx
from fastapi import FastAPI

from services.inference.api import create_app
from services.inference.settings import Settings


def settings(model_path: Any, **overrides: Any) -> Settings:
    # No NATS in these tests: tests/integration/test_weight_sync.py covers the policy watcher.
    values: dict[str, Any] = dict(model=str(model_path), device="cpu", dtype="float32", batch_wait_ms=5.0,
                                  log_format="console", watch_policy=False)  # fmt: skip
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running(config: Settings, base_url: str = "http://inference") -> AsyncIterator[FastAPI]:
    """The app with its lifespan entered, once `/readyz` answers 200."""
    app = create_app(config)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as c:
            for _ in range(1500):
                if (await c.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"inference never ready: {(await c.get('/readyz')).json()}")
        yield app
