"""SQL for the gateway's API keys: create, verify, list, revoke. Only secret hashes are stored
(shared/apikeys.py); nothing here ever sees a key's secret."""

from __future__ import annotations

import hmac
import time

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.store_api import CreateKey, KeyInfo
from services.store.db import insert_ignore, sessions
from services.store.runs import Refused
from services.store.tables import ApiKeyRow

# One reason for an unknown id and a wrong secret: a caller cannot tell which key ids exist.
_INVALID = "invalid API key"


class KeyRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = sessions(engine)

    async def create(self, req: CreateKey) -> KeyInfo:
        """Store the key; the same id and hash again returns the stored key unchanged (a revoked
        bootstrap key stays revoked); the same id with another hash is refused (409)."""
        row = {
            "key_id": req.key_id,
            "secret_hash": req.secret_hash,
            "project": req.project,
            "scope": req.scope,
            "name": req.name,
            "created_at": time.time(),
            "revoked_at": None,
        }
        async with self.sessions.begin() as s:
            await s.execute(insert_ignore(self.engine, ApiKeyRow).values(row))
            stored = await s.get(ApiKeyRow, req.key_id)
        assert stored is not None
        if not hmac.compare_digest(stored.secret_hash, req.secret_hash):
            raise Refused(409, f"key id {req.key_id} is taken")
        return _info(stored)

    async def verify(self, key_id: str, secret_hash: str) -> KeyInfo:
        """The live key with this id and secret hash; Refused(401) with the reason otherwise."""
        async with self.sessions() as s:
            row = await s.get(ApiKeyRow, key_id)
        # compare_digest: how long the comparison takes says nothing about the stored hash.
        if row is None or not hmac.compare_digest(row.secret_hash, secret_hash):
            raise Refused(401, _INVALID)
        if row.revoked_at is not None:
            raise Refused(401, f"API key {key_id} was revoked")
        return _info(row)

    async def list(self, project: str) -> list[KeyInfo]:
        q = select(ApiKeyRow).where(ApiKeyRow.project == project).order_by(ApiKeyRow.created_at, ApiKeyRow.key_id)
        async with self.sessions() as s:
            return [_info(r) for r in (await s.execute(q)).scalars().all()]

    async def revoke(self, key_id: str, project: str | None) -> KeyInfo:
        """Set revoked_at once (revoking again keeps the first time); 404 for an unknown key or
        one of another project than `project`."""
        async with self.sessions.begin() as s:
            row = await s.get(ApiKeyRow, key_id)
            if row is None or (project is not None and row.project != project):
                raise Refused(404, f"API key {key_id!r} not found")
            if row.revoked_at is None:
                await s.execute(
                    update(ApiKeyRow)
                    .where(ApiKeyRow.key_id == key_id, ApiKeyRow.revoked_at.is_(None))
                    .values(revoked_at=time.time())
                    .execution_options(synchronize_session=False)
                )
        async with self.sessions() as s:
            row = await s.get(ApiKeyRow, key_id)
        assert row is not None
        return _info(row)


def _info(row: ApiKeyRow) -> KeyInfo:
    return KeyInfo(
        key_id=row.key_id,
        project=row.project,
        scope=row.scope,  # type: ignore[arg-type]
        name=row.name,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )
