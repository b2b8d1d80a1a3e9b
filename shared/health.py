"""A liveness heartbeat for services with no HTTP endpoint (store, trainer).

While the service's event loop runs, `heartbeat` rewrites a small file every few seconds;
`deploy/healthcheck.py heartbeat FILE MAX_AGE` (a compose health check or a Kubernetes exec
probe) calls the service dead when the file is older than MAX_AGE. A stuck event loop, a
deadlock or a process frozen by SIGSTOP stop the writes; long work that runs in threads (a
training step) does not. Enabled by `RELAYRL_HEARTBEAT_FILE`.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import structlog

log = structlog.get_logger("health")

HEARTBEAT_EVERY_S = 5.0


def beat(path: Path) -> None:
    """Write the current time to `path` atomically (a probe never reads half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{time.time():.3f}\n")
    os.replace(tmp, path)


async def heartbeat(path: Path, stop: asyncio.Event, every_s: float = HEARTBEAT_EVERY_S) -> None:
    """Beat every `every_s` until `stop`; the file is removed on a clean stop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        while not stop.is_set():
            try:
                beat(path)
            except OSError as exc:  # a full or read-only disk: the probe will say so
                log.warning("cannot write the heartbeat", path=str(path), error=str(exc))
            try:
                await asyncio.wait_for(stop.wait(), timeout=every_s)
            except asyncio.TimeoutError:
                pass
    finally:
        path.unlink(missing_ok=True)
