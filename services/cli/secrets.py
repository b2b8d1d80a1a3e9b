"""The embedded stack's service secrets: the workers' inference token and the weights signing key.

Generated once into `<state_dir>/service-secrets.json` (mode 0600, created that way: never
readable by others, not even for a moment) and reused on every later start, so weights a
trainer signed before a restart still verify after it. Each service process gets only the
secrets its role uses, through its environment: inference both, rollout workers the token,
trainers the key; the gateway and the store neither.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shared.config import MIN_SECRET_CHARS, new_secret

FILE_NAME = "service-secrets.json"
# Setting name -> the environment variable the services read it from (shared.config: RELAYRL_<NAME>).
ENV = {"inference_token": "RELAYRL_INFERENCE_TOKEN", "weights_key": "RELAYRL_WEIGHTS_KEY"}
# Which secrets each service module is given (least privilege).
NEEDS = {
    "services.inference": ("inference_token", "weights_key"),
    "services.rollout": ("inference_token",),
    "services.trainer": ("weights_key",),
}


def ensure_secrets(state_dir: Path) -> dict[str, str]:
    """The stack's secrets, generated into `state_dir` on first use (mode 0600); a missing or
    unusable one is generated again, the others kept."""
    path = state_dir / FILE_NAME
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        found = {}
    except ValueError:  # a half-written or hand-broken file: start over rather than refuse to start
        found = {}
    if not isinstance(found, dict):
        found = {}
    out = {name: found[name] for name in ENV if isinstance(found.get(name), str) and len(found[name]) >= MIN_SECRET_CHARS}
    if len(out) == len(ENV) and path.stat().st_mode & 0o077 == 0:
        return out
    for name in ENV:
        out.setdefault(name, new_secret())
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode only applies to a new file
        json.dump(out, f)
    os.replace(tmp, path)
    return out


def service_env(module: str, secrets: dict[str, str]) -> dict[str, str]:
    """The environment variables carrying the secrets `module` needs."""
    return {ENV[name]: secrets[name] for name in NEEDS.get(module, ())}
