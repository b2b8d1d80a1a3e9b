from __future__ import annotations

from pydantic import AliasChoices, Field

from shared import retention
from shared.config import ServiceSettings


class StoreSettings(ServiceSettings):
    database_url: str = Field(
        "sqlite+aiosqlite:///.relayrl/relayrl.db",
        validation_alias=AliasChoices("RELAYRL_DATABASE_URL", "DATABASE_URL", "database_url"),
        description="SQLAlchemy async URL: sqlite+aiosqlite:///path or postgresql+asyncpg://...",
    )
    batch_size: int = Field(256, ge=1, le=4096, description="trajectories written per SQL transaction")
    # Short: trajectories a killed store had fetched come back to its successor after this.
    # A live store never hits it: it keeps what it holds alive with in_progress() (ack_wait/3).
    ack_wait_s: float = Field(retention.STORE_ACK_WAIT_S, gt=0, description="un-acked trajectories of a dead store come back after this")
    reconcile_every_s: float = Field(
        retention.RECONCILE_EVERY_S, gt=0, description="how often the store sweeps for complete groups never published (and once at start)"
    )
    # Longer than the leases (a trainer or pacer that has not noticed the end yet lets go
    # within LEASE_TTL_S) and than a finished run's final evaluation takes to be published.
    cleanup_after_s: float = Field(
        60.0, ge=0, description="an ended run's durables, progress, leases and old weights are removed this long after it ended"
    )
