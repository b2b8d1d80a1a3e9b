"""The embedded stack's first API key: an admin key of the default project, made on the first
`relayrl up` of a state dir into `<state_dir>/api_key` (mode 0600, created that way).

The gateway installs it in the store at start (its `bootstrap_key_file` setting: only the hash
is stored); the CLI's client sends it when given no other key (services/cli/client.py).
Delete the file to have the next start make a new one (revoke the old one with
`relayrl keys revoke` first).
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.apikeys import MalformedKey, new_key, parse_key

API_KEY_FILE = "api_key"


def ensure_api_key(state_dir: Path) -> tuple[str, bool]:
    """(the key, whether it was made now). A file holding no valid key is refused rather than
    replaced: it may be a key the operator put there."""
    path = state_dir / API_KEY_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        pass
    else:
        try:
            parse_key(text)
        except MalformedKey as exc:
            raise RuntimeError(f"{path}: {exc}; delete the file to have a new key made") from None
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)  # readable by others: tighten it, it is the admin's key
        return text, False
    state_dir.mkdir(parents=True, exist_ok=True)
    _, _, text = new_key()
    # O_EXCL: two stacks starting at once on one state dir cannot both write a key.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return text, True
