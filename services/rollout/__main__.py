"""`python -m services.rollout`: a rollout worker (start as many as you like; they compete)."""

from __future__ import annotations

import asyncio
import sys

import httpx

from shared import telemetry
from shared.bus import Bus, install_signal_handlers
from shared.config import ConfigError, load, require_secret, run_service
from services.rollout import proxy, registry
from services.rollout.settings import RolloutSettings
from services.rollout.worker import Worker


async def main(settings: RolloutSettings) -> None:
    log = telemetry.setup("rollout", settings)
    if settings.inference_url_list():
        try:  # before connecting anywhere: a worker without inference's token could capture nothing
            require_secret(settings.inference_token, "inference_token", "the token inference expects")
        except ConfigError as exc:
            log.error("cannot start", error=str(exc))
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    stop = asyncio.Event()
    install_signal_handlers(stop)
    agents = registry.load_builtin_and(settings.agent_modules)
    bus = await Bus.connect(settings, f"rollout-{settings.worker_id}")
    await bus.bind_topology()
    # Fewer connections than agents: httpcore scans its whole pool on every request (measured:
    # a third of the worker's CPU at 64 connections), and a few keep-alive connections carry the load.
    conns = min(settings.concurrency, settings.http_connections)
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    async with httpx.AsyncClient(timeout=settings.inference_timeout_s, limits=limits) as http:
        worker = Worker(bus, settings, http)
        try:
            if worker.client is not None:
                try:
                    await worker.client.check_token()
                except ConfigError as exc:
                    log.error("cannot start", error=str(exc))
                    print(f"error: {exc}", file=sys.stderr)
                    raise SystemExit(2) from None
            # Agents' OpenAI base URLs (ctx.base_url) point here; calls are captured as transitions.
            async with proxy.serve(worker.proxy, settings.proxy_host, settings.proxy_port) as proxy_url:
                # Registered before "ready": whoever waits for ready can submit work for these agents.
                await worker.register_agents()
                log.info("rollout worker ready", worker_id=settings.worker_id, agents=sorted(agents), proxy=proxy_url)
                await worker.run(stop)
        finally:
            await bus.close()
            log.info("rollout worker stopped", worker_id=settings.worker_id, completed=worker.completed)


if __name__ == "__main__":
    run_service(main(load(RolloutSettings, sys.argv[1:])))
