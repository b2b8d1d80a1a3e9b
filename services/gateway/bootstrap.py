"""The first admin key: given to the gateway's process at start and installed in the store, hashed.

Why this way: nothing an HTTP caller can reach creates a key without an admin key. Whoever can
set the gateway's `bootstrap_key_file` (RELAYRL_BOOTSTRAP_KEY_FILE) or `bootstrap_key`
(RELAYRL_BOOTSTRAP_KEY) already controls the gateway. `relayrl up` writes the file (mode 0600)
on its first start and points the gateway at it; compose and Kubernetes pass the key from a
secret. The key belongs to the default project with scope admin; installing it again is a
no-op, and a revoked bootstrap key stays revoked (configure a new one to get a new one).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from shared.apikeys import DEFAULT_PROJECT, MalformedKey, parse_key, redacted, secret_hash
from shared.faults import is_transient
from shared.store_api import StoreClient
from services.gateway.settings import GatewaySettings

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


def configured(settings: GatewaySettings) -> bool:
    return settings.bootstrap_key_file is not None or settings.bootstrap_key is not None


def configured_key(settings: GatewaySettings) -> tuple[str, str]:
    """(key_id, secret) of the configured bootstrap key (the setting wins over the file)."""
    if settings.bootstrap_key is not None:
        try:
            return parse_key(settings.bootstrap_key.get_secret_value())
        except MalformedKey as exc:
            raise BootstrapError(f"RELAYRL_BOOTSTRAP_KEY: {exc}") from None
    assert settings.bootstrap_key_file is not None
    return read_key_file(settings.bootstrap_key_file)


async def install(store: StoreClient, settings: GatewaySettings, max_backoff_s: float = 5.0) -> str:
    """Install the configured key, waiting out store outages with bounded backoff; its key id."""
    key_id, secret = configured_key(settings)
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
