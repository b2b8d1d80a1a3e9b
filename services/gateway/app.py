"""The FastAPI application: routers, error handlers, body limit, and the bus in the lifespan."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from shared.bus import Bus
from services.gateway.deps import AgentCatalog, StoreClient
from services.gateway.limits import BodySizeLimit
from services.gateway.pacing import Pacer
from services.gateway.routers import health, rollouts, runs, tasks
from services.gateway.settings import GatewaySettings


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bus = await Bus.connect(settings, "gateway")
        await bus.ensure_topology()
        app.state.bus = bus
        app.state.store = StoreClient(bus, settings.store_timeout_s)
        app.state.agents = AgentCatalog(bus, settings.agents_cache_s)
        app.state.pacer = Pacer(bus, app.state.store, interval_s=settings.pace_interval_s)
        stop = asyncio.Event()
        pacing = asyncio.create_task(app.state.pacer.run(stop)) if settings.pace_runs else None
        try:
            yield
        finally:
            stop.set()
            app.state.pacer.wake.set()
            if pacing is not None:
                await pacing
            await bus.close()

    app = FastAPI(title="relayrl gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    for router in (health.router, tasks.router, rollouts.router, runs.router):
        app.include_router(router)
    return app


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed JSON is 400; well-formed JSON with wrong fields or types is 422. Both say why."""
    errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
    code = 400 if any(e["type"] == "json_invalid" for e in errors) else 422
    return JSONResponse(status_code=code, content={"detail": errors})
