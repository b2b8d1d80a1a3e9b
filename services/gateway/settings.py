"""The gateway's settings: where it listens, its limits (every one a 4xx with the reason when
passed), API-key checking and the per-key rate limit."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from shared.config import ServiceSettings


class GatewaySettings(ServiceSettings):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_tasks_per_request: int = Field(10000, ge=1)
    max_rollouts_per_request: int = Field(
        4096, ge=1, description="POST /v1/tasks: sum of group_size over the request's tasks (413 above)"
    )
    max_rollouts_per_run: int = Field(
        1_000_000, ge=1, description="POST /v1/runs: rows x epochs x group_size a run may request (413 above)"
    )
    max_dataset_rows: int = Field(100_000, ge=1, description="rows of a dataset, stored or inline in a run (413 above)")
    max_dataset_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="JSON size of a stored dataset's rows (413 above; max_body_bytes also applies)"
    )
    max_run_config_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="JSON size of a run config, inline rows included (413 above)"
    )
    key_cache_s: float = Field(
        30.0, ge=0, description="how long a verified API key is trusted without asking the store: a revoked key "
        "stops working within this long on every gateway (at once on the one that revoked it)",
    )
    key_cache_size: int = Field(10000, ge=1, description="verified keys cached at most (least recently used dropped)")
    rate_per_s: float = Field(200.0, gt=0, description="requests per second each API key may make on average")
    rate_burst: int = Field(2000, ge=1, description="requests an API key may make at once above its rate (429 after)")
    bootstrap_key_file: Path | None = Field(
        None, description="a file holding an admin API key of the default project, installed in the store at "
        "start (hashed) if absent: how `relayrl up` makes its first key without any HTTP caller being able to",
    )
    bootstrap_key: SecretStr | None = Field(
        None, description="the same as bootstrap_key_file, the key itself (RELAYRL_BOOTSTRAP_KEY; compose and "
        "Kubernetes pass it from a secret). `relayrl keys generate` makes one",
    )
    store_timeout_s: float = Field(10.0, gt=0, description="timeout of each query to the store")
    agents_cache_s: float = Field(2.0, ge=0, description="how long the list of registered agents is cached")
    pace_runs: bool = Field(True, description="publish training runs' rollout requests (one gateway per run holds a lease)")
    pace_interval_s: float = Field(0.25, gt=0, description="how often pacing re-reads trainer progress")
    replay_timeout_s: float = Field(600.0, gt=0, description="how long POST /v1/runs/{id}/replay waits for the store")
    pace_max_backoff_s: float = Field(10.0, gt=0, description="longest wait between pacing attempts while they fail")
    pace_unready_after_s: float = Field(
        60.0, gt=0, description="/readyz reports not ready once pacing has failed for this long (or its task died)"
    )
