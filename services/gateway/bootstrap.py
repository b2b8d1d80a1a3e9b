"""The first admin key: read from a file at start and installed in the store, hashed.

Why a file: nothing an HTTP caller can reach creates a key without an admin key. Whoever can
write the gateway's `bootstrap_key_file` (RELAYRL_BOOTSTRAP_KEY_FILE) already controls the
gateway. `relayrl up` writes the file (mode 0600) on its first start and points the gateway at
it. The key belongs to the default project with scope admin; installing it again is a no-op,
and a revoked bootstrap key stays revoked (write a new file to get a new one).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from shared.apikeys import DEFAULT_PROJECT, MalformedKey, parse_key, redacted, secret_hash
from shared.faults import is_transient
from shared.store_api import StoreClient

log = structlog.get_logger("gateway.bootstrap")

BOOTSTRAP_NAME = "bootstrap"


class BootstrapError(RuntimeError):
    """Permanent: the bootstrap key file is unreadable or holds no key (the reason says which)."""


def read_key_file(path: Path) -> tuple[str, str]:
    """(key_id, secret) from the file; BootstrapError without echoing its content."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise BootstrapError(f"cannot read the bootstrap key file {path}: {exc.strerror}") from None
    try:
        return parse_key(text)
    except MalformedKey as exc:
        raise BootstrapError(f"bootstrap key file {path}: {exc}") from None


async def install(store: StoreClient, path: Path, max_backoff_s: float = 5.0) -> str:
    """Install the file's key, waiting out store outages with bounded backoff; its key id."""
    key_id, secret = read_key_file(path)
    delay = 0.2
    while True:
        try:
            await store.create_key(key_id, secret_hash(secret), DEFAULT_PROJECT, "admin", BOOTSTRAP_NAME)
            log.info("bootstrap key installed", key=redacted(key_id))
            return key_id
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.info("store not answering yet; bootstrap key install retried", retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_backoff_s)
