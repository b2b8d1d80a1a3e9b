"""The FastAPI application: routers, error handlers, body limit, and the bus in the lifespan."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from shared.bus import Bus
from services.gateway.deps import AgentCatalog, StoreClient
from services.gateway.limits import BodySizeLimit
from services.gateway.routers import health, rollouts, tasks
from services.gateway.settings import GatewaySettings


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bus = await Bus.connect(settings, "gateway")
        await bus.ensure_topology()
        app.state.bus = bus
        app.state.store = StoreClient(bus, settings.store_timeout_s)
        app.state.agents = AgentCatalog(bus, settings.agents_cache_s)
        try:
            yield
        finally:
            await bus.close()

    app = FastAPI(title="relayrl gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    for router in (health.router, tasks.router, rollouts.router):
        app.include_router(router)
    return app


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed JSON is 400; well-formed JSON with wrong fields or types is 422. Both say why."""
    errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
    code = 400 if any(e["type"] == "json_invalid" for e in errors) else 422
    return JSONResponse(status_code=code, content={"detail": errors})
