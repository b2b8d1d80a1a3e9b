"""Leases in the KV bucket `relayrl-leases`: at most one holder per key while it keeps renewing.

The bucket has a TTL (`subjects.LEASE_TTL_S`), so a holder that dies stops renewing and its
entry expires; another process can then take the key. Every write is a compare-and-set on
the entry's revision, so two processes can never both believe they hold a key.

Fencing: a holder that cannot renew (NATS down, the process paused) cannot know whether its
entry expired and someone else took it. `check()` therefore trusts the lease only for
`TTL - margin` after the last renewal the server confirmed (timed from before the request was
sent, so the local clock never runs ahead of the server's TTL), and a holder calls it before
every write that only the holder may make.
"""

from __future__ import annotations

import time

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from shared import subjects
from shared.bus import Bus
from shared.faults import LeaseLost

# Writes stop this long before the lease could have expired on the server.
FENCE_MARGIN_S = 2.0


class Lease:
    def __init__(self, kv: KeyValue, key: str, holder: str, ttl_s: float = subjects.LEASE_TTL_S) -> None:
        self.kv = kv
        self.key = key
        self.holder = holder
        self.revision: int | None = None
        self.renewed_at: float | None = None  # monotonic, taken before the confirmed write
        self.ttl_s = ttl_s  # the bucket's TTL: how long the server keeps an unrenewed entry

    @classmethod
    async def open(cls, bus: Bus, role: str, run_id: str, holder: str) -> Lease:
        kv = await bus.kv(subjects.KV_LEASES, ttl_s=subjects.LEASE_TTL_S)
        return cls(kv, subjects.lease_key(role, run_id), holder)

    @property
    def held(self) -> bool:
        return self.revision is not None

    def valid(self, margin_s: float = FENCE_MARGIN_S) -> bool:
        """Held, and renewed recently enough that nobody else can have taken it."""
        return (
            self.revision is not None
            and self.renewed_at is not None
            and time.monotonic() - self.renewed_at < self.ttl_s - margin_s
        )

    def check(self) -> None:
        """Raise `LeaseLost` unless `valid()`: call before a write only the holder may make."""
        if not self.valid():
            age = "never renewed" if self.renewed_at is None else f"last renewed {time.monotonic() - self.renewed_at:.1f}s ago"
            raise LeaseLost(f"lease {self.key!r} of {self.holder!r} cannot be proven ({age}, ttl {self.ttl_s}s)")

    async def acquire(self) -> bool:
        """Take the key if nobody holds it (or we held it before a restart with the same id)."""
        sent_at = time.monotonic()
        try:
            self.revision = await self.kv.create(self.key, self.holder.encode())
            self.renewed_at = sent_at
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        try:
            entry = await self.kv.get(self.key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return False  # expired between our two calls: the next attempt will create it
        if entry.value == self.holder.encode() and entry.revision is not None:
            self.revision = entry.revision
            return await self.renew()
        self.revision = None
        return False

    async def renew(self) -> bool:
        """Extend the lease; False (and no longer held) if it expired and someone else took it."""
        if self.revision is None:
            return await self.acquire()
        sent_at = time.monotonic()
        try:
            self.revision = await self.kv.update(self.key, self.holder.encode(), last=self.revision)
            self.renewed_at = sent_at
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            self.revision = None
            self.renewed_at = None
            return await self.acquire()

    async def release(self) -> None:
        if self.revision is None:
            return
        revision, self.revision, self.renewed_at = self.revision, None, None
        try:
            await self.kv.delete(self.key, last=revision)
        except (nats.js.errors.Error, nats.errors.Error, TimeoutError):
            pass  # it expires on its own
