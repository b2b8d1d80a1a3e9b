"""`python -m services.inference [--flags]`: serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import sys

import structlog
import uvicorn

from services.inference.api import create_app
from services.inference.engine import check_engine_kind
from services.inference.settings import Settings
from shared.config import ConfigError, load
from shared.telemetry import setup


def main(argv: list[str] | None = None) -> int:
    settings = load(Settings, sys.argv[1:] if argv is None else argv)
    log = setup("inference", settings)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    # Context vars reach every logger, including the engine's worker thread (it copies them).
    structlog.contextvars.bind_contextvars(service="inference")
    if settings.run_id:  # following the latest run: no one run id; weight-load lines name theirs
        structlog.contextvars.bind_contextvars(run_id=settings.run_id)
    try:
        check_engine_kind(settings.engine)
        app = create_app(settings)  # refuses (ConfigError) without its token or weights key
    except (RuntimeError, ConfigError, ValueError) as exc:
        log.error("cannot start", error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info(
        "starting",
        host=settings.host,
        port=settings.port,
        model=settings.model,
        engine=settings.engine,
        watch_policy=settings.watch_policy,
        follows=(settings.run_id or "latest run") if settings.watch_policy else None,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the logging that telemetry.setup configured
        timeout_graceful_shutdown=int(settings.graceful_timeout_s),
        access_log=False,
    )
    # uvicorn handles SIGTERM/SIGINT: stop accepting, finish in-flight requests, run shutdown.
    # A failed startup (NATS unreachable while watch_policy is on) exits with status 3.
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
