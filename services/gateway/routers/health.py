"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request

from shared.bus import Bus
from shared.store_api import StoreClient
from services.gateway.deps import get_bus, get_settings, get_store
from services.gateway.settings import GatewaySettings

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(
    request: Request,
    bus: Bus = Depends(get_bus),
    store: StoreClient = Depends(get_store),
    settings: GatewaySettings = Depends(get_settings),
) -> dict[str, str]:
    """NATS is connected, the store answers (its database included), the bootstrap key (when
    configured) is installed, and run pacing (where this gateway paces) is alive and has not been failing for longer than `pace_unready_after_s`."""
    if not bus.nc.is_connected:
        raise HTTPException(503, "not connected to NATS")
    await store.ping()  # StoreUnavailable -> 503 (app.fault_response)
    installing = request.app.state.bootstrap
    if installing is not None and not installing.done():
        raise HTTPException(503, "installing the bootstrap API key (bootstrap_key / bootstrap_key_file)")
    if installing is not None and (installing.cancelled() or installing.exception() is not None):
        raise HTTPException(503, f"the bootstrap API key was not installed: {_ended(installing)}")
    pacing = request.app.state.pacing
    if pacing is not None:
        pacer = request.app.state.pacer
        if pacing.done():
            raise HTTPException(503, f"run pacing has stopped: {_ended(pacing)}")
        if pacer.failing_for() > settings.pace_unready_after_s:
            raise HTTPException(503, f"run pacing has failed for {pacer.failing_for():.0f}s: {pacer.last_error}")
    return {"status": "ready"}


def _ended(task) -> str:  # type: ignore[no-untyped-def]
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return f"{type(exc).__name__}: {exc}" if exc else "returned"
