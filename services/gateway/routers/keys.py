"""API keys: create (the secret is in the reply, once), list, revoke. Admin scope only.

An admin key manages its own project's keys. An admin key of the default project is the
operator's: it may also name another project, which is how a new tenant gets its first key.
"""

from __future__ import annotations

import structlog
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field

from shared.apikeys import DEFAULT_PROJECT, PROJECT_PATTERN, Scope, new_key, redacted, secret_hash
from shared.store_api import KeyInfo, StoreClient
from services.gateway.auth import KeyVerifier, Principal
from services.gateway.deps import CurrentKey, get_store, require
from services.gateway.schemas import ErrorOut

log = structlog.get_logger("gateway.keys")

router = APIRouter(prefix="/v1", tags=["keys"], dependencies=[Depends(require("admin"))])
ERRORS = {401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut}, 429: {"model": ErrorOut},
          503: {"model": ErrorOut}}  # fmt: skip


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("", max_length=128, description="what the key is for (shown in listings)")
    scope: Scope = "write"
    project: str | None = Field(
        None, pattern=PROJECT_PATTERN, description="default: the caller's; another only for the default project's admins"
    )


class KeyCreated(KeyInfo):
    key: str = Field(description="the key itself: shown this once, never stored (only its hash is)")


@router.post("/keys", status_code=status.HTTP_201_CREATED, responses=ERRORS)
async def create_key(body: KeyIn, caller: CurrentKey, store: StoreClient = Depends(get_store)) -> KeyCreated:
    """A new key of `scope` in `project`. Its text is in this reply only: keep it."""
    project = _project(caller, body.project)
    key_id, secret, text = new_key()
    info = await store.create_key(key_id, secret_hash(secret), project, body.scope, body.name)
    log.info("API key created", key=redacted(key_id), project=project, scope=body.scope, by=caller.key_id)
    return KeyCreated(**info.model_dump(), key=text)


@router.get("/keys", responses=ERRORS)
async def list_keys(
    caller: CurrentKey,
    project: str | None = Query(None, pattern=PROJECT_PATTERN, description="default: the caller's"),
    store: StoreClient = Depends(get_store),
) -> list[KeyInfo]:
    """The project's keys, revoked ones included (never their secrets)."""
    return await store.list_keys(_project(caller, project))


@router.delete("/keys/{key_id}", responses=ERRORS)
async def revoke_key(key_id: str, request: Request, caller: CurrentKey, store: StoreClient = Depends(get_store)) -> KeyInfo:
    """Revoke a key: at once on this gateway, within `key_cache_s` on the others."""
    scope_project = None if caller.project == DEFAULT_PROJECT else caller.project
    info = await store.revoke_key(key_id, scope_project)
    verifier: KeyVerifier = request.app.state.keys
    verifier.forget(key_id)
    log.info("API key revoked", key=redacted(key_id), project=info.project, by=caller.key_id)
    return info


def _project(caller: Principal, asked: str | None) -> str:
    """The project a key-management request is about: the caller's own unless an operator asks."""
    if asked is None or asked == caller.project:
        return caller.project
    if caller.project != DEFAULT_PROJECT:
        raise HTTPException(403, f"an admin key of project {caller.project!r} manages only that project's keys")
    return asked
