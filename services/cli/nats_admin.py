"""The NATS admin step and the embedded stack's NATS credentials.

`init_topology` is `relayrl init`: it logs in (as the admin user where the server has users)
and creates every stream, consumer-free bucket and the object store relayrl uses. Services
only bind to what it made (`Bus.bind_topology`); it is idempotent, so it is also what brings
the topology back after a server lost its store dir.

`load_or_create_credentials` keeps one random password per NATS user (shared/nats_auth.py)
in `<state_dir>/nats-users.json`, mode 0600, reused across restarts of the stack.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from shared import nats_auth
from shared.bus import Bus
from shared.config import ServiceSettings
from shared.faults import is_transient

CREDENTIALS_FILE = "nats-users.json"


def credentials_path(state_dir: Path) -> Path:
    return state_dir / CREDENTIALS_FILE


def load_or_create_credentials(state_dir: Path) -> dict[str, str]:
    """user -> password for every NATS user; generated (and written 0600) where the file lacks any."""
    path = credentials_path(state_dir)
    current: dict[str, str] = {}
    if path.exists():
        try:
            current = {k: str(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, AttributeError):
            current = {}  # unreadable: replaced below (the server config is rewritten with it)
    if all(current.get(u) for u in nats_auth.USERS):
        return current
    fresh = nats_auth.generate_passwords()
    creds = {u: current.get(u) or fresh[u] for u in nats_auth.USERS}
    write_private(path, json.dumps(creds, indent=2))
    return creds


def read_credentials(state_dir: Path) -> dict[str, str] | None:
    path = credentials_path(state_dir)
    if not path.exists():
        return None
    return {k: str(v) for k, v in json.loads(path.read_text()).items()}


def write_private(path: Path, text: str) -> None:
    """Write `text` readable by the owner only, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


async def init_topology(settings: ServiceSettings, timeout_s: float = 60.0) -> list[str]:
    """Create relayrl's streams and buckets (idempotent); returns the names that were missing.

    `settings` carries the URL and the admin credentials (RELAYRL_NATS_USER/PASSWORD). A
    server just (re)started may answer JetStream 503s for a moment: retried until `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    bus = await asyncio.wait_for(Bus.connect(settings, "relayrl-init"), timeout_s)
    try:
        while True:
            try:
                missing = await bus.missing_topology()
                await bus.ensure_topology()
                return missing
            except Exception as exc:
                if not is_transient(exc) or loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await bus.close()
