"""The agent catalogue: names registered by rollout workers (KV `relayrl-agents`), cached briefly,
so the gateway refuses work for an agent no worker can run."""

from __future__ import annotations

import time

import nats.js.errors

from shared import subjects
from shared.bus import Bus
from shared.faults import Rejected
from shared.messages import AgentInfo


class UnknownAgents(Rejected):
    """Permanent: the request names agents no rollout worker has registered (400)."""


class AgentCatalog:
    def __init__(self, bus: Bus, cache_s: float) -> None:
        self.bus = bus
        self.cache_s = cache_s
        self._names: dict[str, AgentInfo] = {}
        self._read_at = float("-inf")

    async def names(self, fresh: bool = False) -> dict[str, AgentInfo]:
        if fresh or time.monotonic() - self._read_at > self.cache_s:
            kv = await self.bus.kv(subjects.KV_AGENTS)
            try:
                keys = await kv.keys()
            except nats.js.errors.NoKeysError:
                keys = []
            found = {}
            for key in keys:
                entry = await kv.get(key)
                if entry.value:
                    found[key] = AgentInfo.decode(entry.value)
            self._names = found
            self._read_at = time.monotonic()
        return self._names

    async def require(self, names: set[str]) -> None:
        """Raises UnknownAgents unless every name is registered."""
        known = await self.names()
        if names - known.keys():  # a miss is never served from the cache: a worker may have just registered
            known = await self.names(fresh=True)
        unknown = sorted(names - known.keys())
        if unknown:
            registered = sorted(known) or "none (no rollout worker has registered yet)"
            raise UnknownAgents(f"unknown agent(s) {unknown}; registered agents: {registered}", 400)
