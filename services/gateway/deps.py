"""FastAPI dependencies: the bus, the settings, the store client and the agent catalogue, all
living on app.state (created in the lifespan), and the caller's API key.

`CurrentKey` is the verified caller (`Authorization: Bearer <key>`; 401 without a valid key,
429 over its rate limit, or for an address that keeps sending wrong keys). `authorize` is the scope check every /v1 router carries: a GET needs
`read`, anything else `write`; `require("admin")` is key management's."""

from __future__ import annotations

from typing import Annotated, Awaitable, Callable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared.apikeys import Scope, allows
from shared.bus import Bus
from shared.store_api import StoreClient
from services.gateway.agents import AgentCatalog
from services.gateway.auth import Forbidden, KeyVerifier, Principal, Unauthenticated
from services.gateway.ratelimit import RateLimiter
from services.gateway.settings import GatewaySettings

# Methods that only read; every other method changes something and needs `write`.
_READS = frozenset({"GET", "HEAD", "OPTIONS"})

# auto_error off: a missing header is our 401 with a reason, not FastAPI's bare 403.
_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer rrl_<id>_<secret>`")


def get_bus(request: Request) -> Bus:
    return request.app.state.bus


def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


def get_agents(request: Request) -> AgentCatalog:
    return request.app.state.agents


def get_store(request: Request) -> StoreClient:
    return request.app.state.store


async def current_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """The caller's verified key, after spending one token of its rate limit."""
    if credentials is None:
        raise Unauthenticated("missing API key: send `Authorization: Bearer <key>` (`relayrl keys create` makes one)")
    verifier: KeyVerifier = request.app.state.keys
    limiter: RateLimiter = request.app.state.rate_limiter
    try:
        principal = await verifier.verify(credentials.credentials)
    except Unauthenticated:
        # Each wrong key costs the store a query: a client that keeps sending them is limited
        # by its address like a key is, and then told 429.
        limiter.take(f"addr:{request.client.host if request.client else '-'}")
        raise
    limiter.take(principal.key_id)
    return principal


CurrentKey = Annotated[Principal, Depends(current_key)]


def needed_scope(method: str) -> Scope:
    """The scope a request of `method` needs on a data route."""
    return "read" if method.upper() in _READS else "write"


def require(scope: Scope | None = None) -> Callable[[Request, Principal], Awaitable[Principal]]:
    """A dependency refusing (403) a key weaker than `scope` (default: by the request's method)."""

    async def check(request: Request, key: CurrentKey) -> Principal:
        needed = scope or needed_scope(request.method)
        if not allows(key.scope, needed):
            raise Forbidden(f"API key {key.key_id} has scope {key.scope!r}; {request.method} {request.url.path} "
                            f"needs {needed!r}")
        return key

    return check


authorize = require()
