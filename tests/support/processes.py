"""What a running process was given: its environment, read from /proc (Linux)."""

from __future__ import annotations

from pathlib import Path


def process_environ(pid: int) -> dict[str, str]:
    """The environment process `pid` was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
