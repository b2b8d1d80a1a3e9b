"""Leases in the KV bucket `relayrl-leases`: at most one holder per key while it keeps renewing.

The bucket has a TTL (`subjects.LEASE_TTL_S`), so a holder that dies stops renewing and its
entry expires; another process can then take the key. Every write is a compare-and-set on
the entry's revision, so two processes can never both believe they hold a key.
"""

from __future__ import annotations

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from shared import subjects
from shared.bus import Bus


class Lease:
    def __init__(self, kv: KeyValue, key: str, holder: str) -> None:
        self.kv = kv
        self.key = key
        self.holder = holder
        self.revision: int | None = None

    @classmethod
    async def open(cls, bus: Bus, role: str, run_id: str, holder: str) -> Lease:
        kv = await bus.kv(subjects.KV_LEASES, ttl_s=subjects.LEASE_TTL_S)
        return cls(kv, subjects.lease_key(role, run_id), holder)

    @property
    def held(self) -> bool:
        return self.revision is not None

    async def acquire(self) -> bool:
        """Take the key if nobody holds it (or we held it before a restart with the same id)."""
        try:
            self.revision = await self.kv.create(self.key, self.holder.encode())
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
        try:
            self.revision = await self.kv.update(self.key, self.holder.encode(), last=self.revision)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            self.revision = None
            return await self.acquire()

    async def release(self) -> None:
        if self.revision is None:
            return
        try:
            await self.kv.delete(self.key, last=self.revision)
        except (nats.js.errors.Error, nats.errors.Error):
            pass  # it expires on its own
        self.revision = None
