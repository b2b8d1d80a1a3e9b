"""Settings of a rollout worker (`RELAYRL_*` env vars or `--kebab-case` flags)."""

from __future__ import annotations

import os
import socket

from pydantic import Field, SecretStr

from shared import retention
from shared.config import ServiceSettings


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RolloutSettings(ServiceSettings):
    inference_urls: str = Field(
        "http://127.0.0.1:8001", description="comma-separated base URLs of inference replicas"
    )
    worker_id: str = Field(default_factory=_default_worker_id)
    concurrency: int = Field(64, ge=1, le=4096, description="agent runs in flight per worker")
    ack_wait_s: float = Field(30.0, gt=0, description="a dead worker's task comes back after this")
    max_attempts: int = Field(3, ge=1, description="deliveries before a task is recorded as failed")
    inference_timeout_s: float = Field(120.0, gt=0)
    inference_retries: int = Field(
        4, ge=0, description="retries toward inference on 429, 5xx and connection errors (then 502/503)"
    )
    inference_backoff_s: float = Field(0.25, ge=0, description="first retry delay; doubles per retry")
    inference_backoff_max_s: float = Field(4.0, ge=0, description="cap on one retry delay (and on Retry-After)")
    inference_token: SecretStr | None = Field(
        None,
        description="bearer token sent on every call to inference (its RELAYRL_INFERENCE_TOKEN); required "
        "when inference_urls is set",
    )
    proxy_host: str = Field("127.0.0.1", description="capture proxy bind address (agents' OpenAI base_url)")
    proxy_port: int = Field(0, ge=0, le=65535, description="capture proxy port; 0 = a free port")
    http_connections: int = Field(16, ge=1, description="HTTP connections to inference, shared by all agent runs")
    failure_reward: float = Field(0.0, description="reward given to failed/timed-out rollouts")
    publish_patience_s: float = Field(
        retention.PUBLISH_PATIENCE_S, gt=0, description="how long a finished trajectory's publish is retried through a NATS outage"
    )
    sync_agent_threads: int = Field(32, ge=1, description="threads that run sync (def, not async def) agents")
    agent_modules: str = Field(
        "", description="comma-separated modules to import that register more agents (besides entry points)"
    )

    def inference_url_list(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.inference_urls.split(",") if u.strip()]
