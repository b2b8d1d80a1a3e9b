"""Trainer checkpoints: atomic, self-contained directories, the last N kept.

    <dir>/LATEST                  the name of the current checkpoint directory
    <dir>/step-00000012-<nonce>/
        model.safetensors         policy weights
        state.pt                  optimizer, RNG states, step (torch.save)
        extra.json                the service's own state (e.g. consumed group ids)

A checkpoint is written into a hidden temp directory, flushed, and renamed to a name no
other save uses; then `LATEST` is replaced (a file rename over the old one: atomic on POSIX)
to point at it, and only then are older directories deleted. A crash at any point leaves
`LATEST` naming either the previous checkpoint or the complete new one, never a missing or
half-written one, also when the same step is saved again after a resume.
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

# step-00000012 (layout before the LATEST pointer) or step-00000012-<nonce>
_NAME = re.compile(r"^step-(\d+)(?:-[0-9a-f]+)?$")
LATEST = "LATEST"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
EXTRA_FILE = "extra.json"


def save_checkpoint(
    directory: str | Path, step: int, learner_state: dict[str, Any], extra: dict[str, Any], keep: int = 3
) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`; returns its path."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}-{uuid.uuid4().hex[:12]}"
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()
    try:
        save_file(learner_state["model"], str(tmp / MODEL_FILE))
        rest = {k: v for k, v in learner_state.items() if k != "model"}
        torch.save(rest, tmp / STATE_FILE)
        (tmp / EXTRA_FILE).write_text(json.dumps(extra, sort_keys=True))
        _fsync_dir_files(tmp)
        os.rename(tmp, final)
        _point_latest(root, final.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(root, keep, current=final.name)
    return final


def latest_checkpoint(directory: str | Path) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(step, learner_state, extra) of the checkpoint `LATEST` names (else the newest complete one), or None."""
    path = _current(Path(directory))
    if path is None:
        return None
    step = int(_NAME.match(path.name).group(1))  # type: ignore[union-attr]
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    state["model"] = load_file(str(path / MODEL_FILE))
    extra = json.loads((path / EXTRA_FILE).read_text())
    return step, state, extra


def _current(root: Path) -> Path | None:
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        name = ""
    if name and _NAME.match(name) and (root / name).is_dir():
        return root / name
    # No pointer (a directory from before it existed): the newest complete one; a directory
    # only appears complete, by rename, so any one found is whole.
    steps = _steps(root)
    return steps[-1][1] if steps else None


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync(root)


def _steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found, key=lambda sp: (sp[0], sp[1].stat().st_mtime))


def _prune(root: Path, keep: int, current: str) -> None:
    """Keep the current checkpoint and the newest `keep - 1` others of lower steps."""
    steps = [(s, p) for s, p in _steps(root) if p.name != current]
    cur_step = int(_NAME.match(current).group(1))  # type: ignore[union-attr]
    # Anything at or above the current step belongs to an abandoned timeline (a save of the
    # same step, or later steps before a resume from here).
    older = [p for s, p in steps if s < cur_step]
    doomed = [p for s, p in steps if s >= cur_step] + older[: max(len(older) - (max(keep, 1) - 1), 0)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    # Temp dirs left by a crash mid-save are garbage; ours is already renamed or removed.
    # Only old ones go, so a concurrent save in progress is never touched.
    for p in [*root.glob(".tmp-step-*"), *root.glob(f".{LATEST}.*")]:
        if _age_s(p) > 3600:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


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
