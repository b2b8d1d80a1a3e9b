from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, HTTPException

from shared.bus import Bus
from shared.messages import Ping
from services.gateway.deps import StoreClient, get_bus, get_store

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(bus: Bus = Depends(get_bus), store: StoreClient = Depends(get_store)) -> dict[str, str]:
    """NATS is connected and the store answers (its database included)."""
    if not bus.nc.is_connected:
        raise HTTPException(503, "not connected to NATS")
    try:
        await asyncio.wait_for(store.call("ping", Ping()), timeout=store.timeout_s)
    except asyncio.TimeoutError:
        raise HTTPException(503, "store did not answer") from None
    return {"status": "ready"}
