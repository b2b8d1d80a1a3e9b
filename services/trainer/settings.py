"""Settings of the trainer service (`RELAYRL_*` env vars or `--kebab-case` flags)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field

from shared.config import ServiceSettings
from shared.models import default_model_dir


class TrainerSettings(ServiceSettings):
    run_id: str | None = Field(None, description="train this run; default: claim any running run that has no trainer")
    trainer_id: str = Field(default_factory=lambda: f"trainer-{socket.gethostname()}-{os.getpid()}")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's (all cores)")
    model_dir: Path = Field(default_factory=default_model_dir, description="where 'tiny' models are created and cached")
    checkpoint_dir: Path = Field(Path(".relayrl/checkpoints"), description="one sub-directory per run")
    keep_checkpoints: int = Field(2, ge=1)
    ack_wait_s: float = Field(10.0, gt=0, description="a held group comes back this long after a trainer died")
    fetch_batch: int = Field(64, ge=1)
    poll_s: float = Field(1.0, gt=0, description="how often an idle trainer looks for runs and run state")
    exit_when_done: bool = Field(False, description="exit after the run (with --run-id) finishes instead of waiting")
    store_timeout_s: float = Field(10.0, gt=0)
    retry_initial_s: float = Field(0.5, gt=0, description="first wait after a transient fault (doubles)")
    retry_max_s: float = Field(5.0, gt=0, description="longest wait between attempts while a fault lasts")
    max_unexpected_failures: int = Field(3, ge=1, description="the same unexpected error this often at one step fails the run")
    max_nonfinite_steps: int = Field(3, ge=1, description="NaN/inf updates in a row (not applied) before the run fails")
