"""Settings of the inference service (`RELAYRL_*` env vars or `--kebab-case` flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from shared.config import ServiceSettings
from shared.models import default_model_dir
from shared.subjects import check_token


class Settings(ServiceSettings):
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=0, le=65535)
    model: str = Field("tiny", description="'tiny' (built on first use) or a local Hugging Face checkpoint directory")
    model_dir: Path = Field(default_factory=default_model_dir, description="where 'tiny' is created and cached")
    served_model_name: str | None = Field(None, description="name reported by /v1/models; default: --model")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    engine: Literal["torch", "vllm"] = "torch"
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_queued_requests: int = Field(
        1024, ge=1, le=1_000_000,
        description="sequences (one per choice) that may wait for a place in the running batch; one more is "
        "refused at once with 503 queue_full and Retry-After (transient overload: callers retry). A waiting one "
        "holds little more than its prompt; 1024 covers 16 rollout workers at their default concurrency (64)",
    )
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="how long an idle engine waits to batch peers")
    max_model_len: int | None = Field(None, ge=2, description="context limit; default: the model's")
    initial_version: int = Field(0, ge=0, description="policy version of the weights loaded at start")
    watch_policy: bool = Field(
        True,
        description="follow the trainer's weights through NATS (KV relayrl-policy + object store); "
        "off: serve the loaded weights and never connect to NATS",
    )
    version_wait_s: float = Field(
        10.0, ge=0, description="how long a request naming min_policy_version waits for that version to be live"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's (all cores)")
    run_id: str | None = Field(
        None,
        description="pin the replica to this run (requests of other runs get 409 wrong_run); unset: serve every "
        "run with its own weights, and requests naming no run with the run that published last",
    )
    max_runs: int = Field(
        4, ge=1, le=64,
        description="following replicas: how many runs' weights to hold at once (each one more copy of the "
        "weights in memory); a pinned replica (--run-id) holds one",
    )
    graceful_timeout_s: float = Field(30.0, gt=0, description="how long SIGTERM waits for in-flight requests")
    inference_token: SecretStr | None = Field(
        None,
        description="bearer token every /v1 request must carry (Authorization: Bearer <token>); the rollout "
        "workers' RELAYRL_INFERENCE_TOKEN. Required: the replica refuses to start without it",
    )

    @field_validator("run_id", mode="before")
    @classmethod
    def _run_or_follow(cls, value: object) -> object:
        # An empty RELAYRL_RUN_ID means "follow", like leaving it unset.
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return check_token(str(value).strip())
