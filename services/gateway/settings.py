from __future__ import annotations

from pydantic import Field

from shared.config import ServiceSettings


class GatewaySettings(ServiceSettings):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_tasks_per_request: int = Field(10000, ge=1)
    store_timeout_s: float = Field(10.0, gt=0, description="timeout of each query to the store")
    agents_cache_s: float = Field(2.0, ge=0, description="how long the list of registered agents is cached")
    pace_runs: bool = Field(True, description="publish training runs' rollout requests (one gateway per run holds a lease)")
    pace_interval_s: float = Field(0.25, gt=0, description="how often pacing re-reads trainer progress")
    replay_timeout_s: float = Field(600.0, gt=0, description="how long POST /v1/runs/{id}/replay waits for the store")
    pace_max_backoff_s: float = Field(10.0, gt=0, description="longest wait between pacing attempts while they fail")
    pace_unready_after_s: float = Field(
        60.0, gt=0, description="/readyz reports not ready once pacing has failed for this long (or its task died)"
    )
