"""API-key authentication: who a bearer key is (`Principal`), verified through the store and
cached briefly, and the errors a request is refused with (401, 403), each with its reason.

The key's secret never leaves this process: the store is asked with the key id and the
secret's sha256 (shared/apikeys.py), and the cache is keyed by a hash of the whole key.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

from shared.apikeys import MalformedKey, Scope, parse_key, secret_hash
from shared.faults import Rejected
from shared.store_api import StoreClient


@dataclass(frozen=True)
class Principal:
    """The verified caller: its key's public id, project (tenant) and scope."""

    key_id: str
    project: str
    scope: Scope
    name: str = ""


class Unauthenticated(Rejected):
    """No valid key: missing, malformed, unknown, wrong or revoked (401)."""

    headers = {"WWW-Authenticate": "Bearer"}

    def __init__(self, reason: str) -> None:
        super().__init__(reason, 401)


class Forbidden(Rejected):
    """A valid key whose scope is not enough for the request (403)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, 403)


class KeyVerifier:
    """Verifies keys with the store and remembers verified ones for `ttl_s` (at most `size`,
    least recently used dropped), so a busy client costs the store one query per `ttl_s`.
    Failures are never cached: a key created a moment ago works at once."""

    def __init__(self, store: StoreClient, ttl_s: float, size: int) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.size = size
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    async def verify(self, token: str) -> Principal:
        """The key's principal, or Unauthenticated with the reason. Store faults propagate by
        type (StoreUnavailable -> 503): an outage is not the caller's bad key."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            self._cache.move_to_end(digest)
            return hit[0]
        try:
            key_id, secret = parse_key(token)
        except MalformedKey as exc:
            raise Unauthenticated(str(exc)) from None
        try:
            info = await self.store.verify_key(key_id, secret_hash(secret))
        except Rejected as exc:
            if exc.code == 401:
                raise Unauthenticated(exc.reason) from None
            raise
        principal = Principal(key_id=info.key_id, project=info.project, scope=info.scope, name=info.name)
        if self.ttl_s > 0:
            self._cache[digest] = (principal, now + self.ttl_s)
            self._cache.move_to_end(digest)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return principal

    def forget(self, key_id: str) -> None:
        """Drop a key from the cache (it was revoked here: it stops working at once)."""
        for digest in [d for d, (p, _) in self._cache.items() if p.key_id == key_id]:
            del self._cache[digest]
