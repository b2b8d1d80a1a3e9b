"""Trainer checkpoints: atomic, self-contained directories, the last N kept.

    <dir>/step-00000012/
        model.safetensors   policy weights
        state.pt            optimizer, RNG states, step (torch.save)
        extra.json          the service's own state (e.g. consumed group ids)

A checkpoint is written into a hidden temp directory and renamed into place, so a crash
leaves either the previous checkpoint or the complete new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^step-(\d+)$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
EXTRA_FILE = "extra.json"


def save_checkpoint(
    directory: str | Path, step: int, learner_state: dict[str, Any], extra: dict[str, Any], keep: int = 3
) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`; returns its path."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        save_file(learner_state["model"], str(tmp / MODEL_FILE))
        rest = {k: v for k, v in learner_state.items() if k != "model"}
        torch.save(rest, tmp / STATE_FILE)
        (tmp / EXTRA_FILE).write_text(json.dumps(extra, sort_keys=True))
        _fsync_dir_files(tmp)
        if final.exists():  # the same step saved again (a retry after a crash): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(root, keep)
    return final


def latest_checkpoint(directory: str | Path) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(step, learner_state, extra) of the newest complete checkpoint, or None."""
    steps = _steps(Path(directory))
    if not steps:
        return None
    step, path = steps[-1]
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    state["model"] = load_file(str(path / MODEL_FILE))
    extra = json.loads((path / EXTRA_FILE).read_text())
    return step, state, extra


def _steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    for _, path in _steps(root)[: -max(keep, 1)]:
        shutil.rmtree(path, ignore_errors=True)
    # Temp dirs left by a crash mid-save are garbage; ours is already renamed or removed.
    # Only old ones go, so a concurrent save in progress is never touched.
    for p in root.glob(".tmp-step-*"):
        if _age_s(p) > 3600:
            shutil.rmtree(p, ignore_errors=True)


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_files(path: Path) -> None:
    """Flush the files and the directory entry before the rename publishes them."""
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    _fsync(path)
