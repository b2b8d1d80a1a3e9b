"""A nats-server with relayrl's users and permissions (shared/nats_auth.py), for permission tests.

`AuthNats` starts one on a free port with fresh passwords, runs the admin step (`relayrl
init`) and connects as any user: `bus(user)` through `Bus.connect` (what services do),
`raw(user)` as a plain nats-py client whose errors (permission violations) are recorded.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from services.cli.nats_admin import init_topology
from services.cli.nats_server import NatsServer
from shared import nats_auth
from shared.bus import Bus
from shared.config import ServiceSettings

# Short: a denied JetStream request gets no answer and ends at this timeout.
DENIED_TIMEOUT_S = 1.0


@dataclass
class RawClient:
    """A plain connection plus the errors the server sent it (e.g. `permissions violation`)."""

    nc: NATS
    errors: list[str] = field(default_factory=list)

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e]


@dataclass
class AuthNats:
    store_dir: Path
    passwords: dict[str, str] = field(default_factory=nats_auth.generate_passwords)
    server: NatsServer | None = None
    _buses: list[Bus] = field(default_factory=list)
    _raw: list[RawClient] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    async def start(self, init: bool = True) -> AuthNats:
        """Start the server; `init`: run the admin step too (else the server has no topology)."""
        self.server = NatsServer(store_dir=self.store_dir, authorization=nats_auth.authorization_block(self.passwords))
        self.server.start(log_file=self.store_dir.parent / "nats-auth.log")
        if init:
            await init_topology(self.settings(nats_auth.ADMIN))
        return self

    def restart_empty(self) -> None:
        """Restart on the same port with its JetStream store wiped: a server that lost its disk."""
        assert self.server is not None
        self.server.stop()
        shutil.rmtree(self.store_dir / "jetstream", ignore_errors=True)
        self.server.start()

    def settings(self, user: str, timeout_s: float = DENIED_TIMEOUT_S) -> ServiceSettings:
        return ServiceSettings(
            nats_url=self.url, nats_user=user, nats_password=self.passwords[user], request_timeout_s=timeout_s,
            nats_connect_attempts=3, log_format="console",
        )  # fmt: skip

    async def bus(self, user: str, timeout_s: float = DENIED_TIMEOUT_S) -> Bus:
        b = await Bus.connect(self.settings(user, timeout_s), f"test-{user}")
        self._buses.append(b)
        return b

    async def raw(self, user: str) -> RawClient:
        client = RawClient(nc=None)  # type: ignore[arg-type]

        async def on_error(exc: Exception) -> None:
            client.errors.append(str(exc).lower())

        client.nc = await nats.connect(
            self.url, user=user, password=self.passwords[user], error_cb=on_error, connect_timeout=5,
            allow_reconnect=False,
        )  # fmt: skip
        self._raw.append(client)
        return client

    async def stop(self) -> None:
        try:
            for b in self._buses:
                await b.close()
            for r in self._raw:
                await r.nc.close()
        finally:  # the server goes even when a connection fails to close
            if self.server is not None:
                self.server.stop()
