"""FastAPI dependencies: the bus, the settings, the store client and the agent catalogue, all
living on app.state (created in the lifespan)."""

from __future__ import annotations

from fastapi import Request

from shared.bus import Bus
from shared.store_api import StoreClient
from services.gateway.agents import AgentCatalog
from services.gateway.settings import GatewaySettings


def get_bus(request: Request) -> Bus:
    return request.app.state.bus


def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


def get_agents(request: Request) -> AgentCatalog:
    return request.app.state.agents


def get_store(request: Request) -> StoreClient:
    return request.app.state.store
