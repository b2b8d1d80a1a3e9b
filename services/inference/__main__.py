"""`python -m services.inference [--flags]`: serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import sys

import structlog
import uvicorn

from services.inference.api import create_app
from services.inference.engine import check_engine_kind
from services.inference.settings import Settings
from shared.config import load
from shared.telemetry import setup


def main(argv: list[str] | None = None) -> int:
    settings = load(Settings, sys.argv[1:] if argv is None else argv)
    log = setup("inference", settings)
    # Context vars reach every logger, including the engine's worker thread (it copies them).
    structlog.contextvars.bind_contextvars(service="inference", run_id=settings.run_id)
    try:
        check_engine_kind(settings.engine)
    except (RuntimeError, ValueError) as exc:
        log.error("cannot start", error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("starting", host=settings.host, port=settings.port, model=settings.model, engine=settings.engine)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the logging that telemetry.setup configured
        timeout_graceful_shutdown=int(settings.graceful_timeout_s),
        access_log=False,
    )
    # uvicorn handles SIGTERM/SIGINT: stop accepting, finish in-flight requests, run shutdown.
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
