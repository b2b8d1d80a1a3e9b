"""FastAPI dependencies: the bus, the store client and the agent catalogue live on app.state."""

from __future__ import annotations

import time

import nats.js.errors
from fastapi import HTTPException, Request

from shared import subjects
from shared.bus import Bus
from shared.messages import AgentInfo, Message, Reply
from services.gateway.settings import GatewaySettings


def get_bus(request: Request) -> Bus:
    return request.app.state.bus


def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


def get_agents(request: Request) -> AgentCatalog:
    return request.app.state.agents


class StoreClient:
    """The gateway never opens the database: every read and write goes to the store over NATS."""

    def __init__(self, bus: Bus, timeout_s: float) -> None:
        self.bus = bus
        self.timeout_s = timeout_s

    async def call(self, method: str, msg: Message, timeout_s: float | None = None) -> Reply:
        try:
            reply = await self.bus.request(subjects.store_rpc(method), msg, timeout=timeout_s or self.timeout_s)
        except TimeoutError as exc:
            raise HTTPException(503, f"store unavailable: {exc}") from None
        if not reply.ok:
            raise HTTPException(reply.code if 400 <= reply.code < 600 else 502, reply.error or "store error")
        return reply


def get_store(request: Request) -> StoreClient:
    return request.app.state.store


class AgentCatalog:
    """Agent names registered by rollout workers (KV `relayrl-agents`), cached briefly."""

    def __init__(self, bus: Bus, cache_s: float) -> None:
        self.bus = bus
        self.cache_s = cache_s
        self._names: dict[str, AgentInfo] = {}
        self._read_at = float("-inf")

    async def names(self) -> dict[str, AgentInfo]:
        if time.monotonic() - self._read_at > self.cache_s:
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
        known = await self.names()
        unknown = sorted(names - known.keys())
        if unknown:
            raise HTTPException(
                400,
                f"unknown agent(s) {unknown}; registered agents: {sorted(known) or 'none (no rollout worker has registered yet)'}",
            )
