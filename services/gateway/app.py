"""The FastAPI application: routers, error handlers, body limit, and the bus in the lifespan.

Every /v1 route needs an API key (services/gateway/deps.py); `/healthz` and `/readyz` do not."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

import nats.errors
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from shared.bus import Bus
from shared.faults import NotFound, Rejected, StoreError, StoreUnavailable, is_transient
from shared.redact import redact_text
from shared.store_api import StoreClient
from services.gateway import bootstrap
from services.gateway.agents import AgentCatalog
from services.gateway.auth import KeyVerifier
from services.gateway.limits import BodySizeLimit
from services.gateway.pacing import Pacer
from services.gateway.ratelimit import RateLimiter
from services.gateway.routers import health, keys, rollouts, runs, tasks
from services.gateway.settings import GatewaySettings

# What a client is told to wait before retrying a 503 (the store or NATS restarting).
RETRY_AFTER_S = 2


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bus = await Bus.connect(settings, "gateway")
        await bus.bind_topology()
        app.state.bus = bus
        app.state.store = StoreClient(bus, settings.store_timeout_s)
        app.state.agents = AgentCatalog(bus, settings.agents_cache_s)
        app.state.keys = KeyVerifier(app.state.store, settings.key_cache_s, settings.key_cache_size)
        if bootstrap.configured(settings):  # /readyz waits for it
            app.state.bootstrap = asyncio.create_task(bootstrap.install(app.state.store, settings))
        app.state.pacer = Pacer(bus, app.state.store, interval_s=settings.pace_interval_s, max_backoff_s=settings.pace_max_backoff_s)
        stop = asyncio.Event()
        app.state.pacing = asyncio.create_task(app.state.pacer.run(stop)) if settings.pace_runs else None
        try:
            yield
        finally:
            stop.set()
            app.state.pacer.wake.set()
            if app.state.pacing is not None:
                await asyncio.gather(app.state.pacing, return_exceptions=True)
            if app.state.bootstrap is not None:
                app.state.bootstrap.cancel()
                await asyncio.gather(app.state.bootstrap, return_exceptions=True)
            await bus.close()

    app = FastAPI(title="relayrl gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.pacing = None
    app.state.bootstrap = None
    app.state.rate_limiter = RateLimiter(settings.rate_per_s, settings.rate_burst)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    for fault in (StoreError, TimeoutError, ConnectionError, nats.errors.Error):
        app.add_exception_handler(fault, fault_response)  # type: ignore[arg-type]
    for router in (health.router, tasks.router, rollouts.router, runs.router, keys.router):
        app.include_router(router)
    return app


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed JSON is 400; well-formed JSON with wrong fields or types is 422. Both say why."""
    errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
    code = 400 if any(e["type"] == "json_invalid" for e in errors) else 422
    return JSONResponse(status_code=code, content={"detail": errors})


async def fault_response(_: Request, exc: Exception) -> JSONResponse:
    """The one place errors from below the routes become HTTP: transient faults (the store, its
    database or NATS unavailable) are 503 with Retry-After, a missing object 404, a refused
    request its own 4xx; anything else the store failed with is 502."""
    # Texts from below (a driver's, a client's) may quote a URL with its credentials: redacted.
    if isinstance(exc, StoreUnavailable) or (not isinstance(exc, StoreError) and is_transient(exc)):
        detail = str(exc) if isinstance(exc, StoreUnavailable) else f"unavailable, retry later: {exc}"
        return JSONResponse(
            status_code=503, content={"detail": redact_text(detail)}, headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    if isinstance(exc, NotFound):
        return JSONResponse(status_code=404, content={"detail": redact_text(str(exc))})
    if isinstance(exc, Rejected):
        code = exc.code if 400 <= exc.code < 500 else 400
        # 401 carries WWW-Authenticate, 429 Retry-After (services/gateway/auth.py, ratelimit.py).
        return JSONResponse(status_code=code, content={"detail": exc.reason}, headers=getattr(exc, "headers", None))
    return JSONResponse(status_code=502, content={"detail": redact_text(f"store failed: {exc}")})
