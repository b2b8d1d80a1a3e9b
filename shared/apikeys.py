"""API keys of the gateway: their scopes, their projects (tenants) and their text format.

A key reads `rrl_<key_id>_<secret>`. `key_id` is public (it names the key in listings and
in `relayrl keys revoke`); `secret` is 256 random bits that only the key's holder ever sees.
The store keeps `secret_hash` (sha256 of the secret): a leaked database does not leak keys, and
the secret never leaves the gateway (the gateway hashes it before asking the store).

Used by the gateway (verifying keys, making new ones), the store (the `Scope` it stores) and
the CLI (`relayrl up` makes the first admin key; the client sends it).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Literal, get_args

# The one definition of what a key may do; every check derives from it. Ordered weakest
# first: a key holds its own scope and every weaker one.
Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)

# The project of runs made before tenancy existed, and of the key `relayrl up` makes. Its
# admin keys are the operator's: they may create keys for other projects (how a tenant starts).
DEFAULT_PROJECT = "default"
PROJECT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
# Names a key in listings; it is not a secret.
KEY_ID_PATTERN = r"^[0-9a-f]{12}$"

_PREFIX = "rrl"
_KEY = re.compile(rf"^{_PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{32,128}})$")


class MalformedKey(ValueError):
    """The text is not a relayrl API key (wrong shape); says so without echoing it."""


def allows(held: Scope, needed: Scope) -> bool:
    """Whether a key of scope `held` may do what needs `needed` (read < write < admin)."""
    return SCOPES.index(held) >= SCOPES.index(needed)


def new_key() -> tuple[str, str, str]:
    """A fresh key: (key_id, secret, the text the holder uses)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{_PREFIX}_{key_id}_{secret}"


def parse_key(text: str) -> tuple[str, str]:
    """(key_id, secret) of a key's text; MalformedKey otherwise (the text is never repeated)."""
    match = _KEY.match(text.strip())
    if match is None:
        raise MalformedKey(f"not a relayrl API key (expected {_PREFIX}_<12 hex>_<secret>)")
    return match.group(1), match.group(2)


def secret_hash(secret: str) -> str:
    """What the store keeps of a key's secret (hex sha256). A plain hash suffices: the secret is
    256 random bits, so it cannot be guessed from its hash the way a password could."""
    return hashlib.sha256(secret.encode()).hexdigest()


def redacted(key_id: str) -> str:
    """How a key appears in logs and errors: its public id only."""
    return f"{_PREFIX}_{key_id}_***"
