"""`python -m services.store`: SQL persistence, group assembly and the query API."""

from __future__ import annotations

import asyncio
import sys

from shared import telemetry
from shared.bus import Bus, install_signal_handlers, wait_for_stop
from shared.config import load, run_service
from shared.health import heartbeat
from services.store.db import create_engine, create_schema
from services.store.service import Store
from services.store.settings import StoreSettings


async def main(settings: StoreSettings) -> None:
    log = telemetry.setup("store", settings)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    engine = create_engine(settings.database_url)
    await create_schema(engine)
    bus = await Bus.connect(settings, "store")
    await bus.bind_topology()
    log.info("store ready", database=engine.url.render_as_string(hide_password=True))
    try:
        beats = [heartbeat(settings.heartbeat_file, stop)] if settings.heartbeat_file else []
        await wait_for_stop(stop, Store(bus, engine, settings).run(stop), *beats)
    finally:
        await bus.close()
        await engine.dispose()
        log.info("store stopped")


if __name__ == "__main__":
    run_service(main(load(StoreSettings, sys.argv[1:])))
