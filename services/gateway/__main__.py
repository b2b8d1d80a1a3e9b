"""`python -m services.gateway`: the HTTP API."""

from __future__ import annotations

import sys

import uvicorn

from shared import telemetry
from shared.config import load
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings


def main() -> None:
    settings = load(GatewaySettings, sys.argv[1:])
    telemetry.setup("gateway", settings)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
