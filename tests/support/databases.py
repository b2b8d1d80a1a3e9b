"""The test PostgreSQL server: its URL (RELAYRL_TEST_POSTGRES_URL) and whether it is reachable."""

from __future__ import annotations

import os
import socket

POSTGRES_URL = os.environ.get("RELAYRL_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


def postgres_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            return True
    except OSError:
        return False
