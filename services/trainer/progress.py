"""What the trainer tells the rest of the system: weights, per-step metrics, progress, run state.

Store calls go through the typed client (`shared.store_api.StoreClient`): a store that is
down or restarting raises `StoreUnavailable`, a missing run `NotFound`, a refused state
change `Rejected`; all are `StoreError`s, re-exported here for the service loop.
"""

from __future__ import annotations

import hashlib

from shared import subjects
from shared.bus import Bus
from shared.faults import StoreError, StoreUnavailable
from shared.messages import RUN_ACTIVE, RunState, RunView, StepMetrics, TrainerProgress
from shared.store_api import StoreClient

__all__ = ["StoreError", "StoreUnavailable", "get_run", "runs_to_train", "set_state", "put_progress", "publish_metrics"]

# ListRuns' largest page size: the client pages on until every live run is listed.
_ALL_RUNS = 10000


async def get_run(bus: Bus, run_id: str, timeout_s: float) -> RunView:
    return await StoreClient(bus, timeout_s).get_run(run_id)


async def runs_to_train(bus: Bus, timeout_s: float) -> list[RunView]:
    """Live training and replay runs, oldest first (the first claimable one is trained first).

    Listed without their inline rows (the trainer trains on groups, never on dataset rows)."""
    runs = await StoreClient(bus, timeout_s).list_runs(states=list(RUN_ACTIVE), limit=_ALL_RUNS)
    return sorted((r for r in runs if r.config.mode in ("train", "replay")), key=lambda r: r.created_at)


async def set_state(bus: Bus, run_id: str, state: RunState, timeout_s: float, error: str | None = None) -> None:
    await StoreClient(bus, timeout_s).set_run_state(run_id, state, from_states=list(RUN_ACTIVE), error=error)


async def put_progress(bus: Bus, progress: TrainerProgress) -> None:
    kv = await bus.kv(subjects.KV_POLICY)
    await kv.put(subjects.progress_key(progress.run_id), progress.encode())


async def publish_metrics(bus: Bus, metrics: StepMetrics) -> None:
    # The id names the step and its groups: a step re-trained after a crash (other groups) is
    # a new message, an exact re-send of the same step is deduplicated.
    digest = hashlib.sha256("\n".join(metrics.group_ids).encode()).hexdigest()[:16]
    await bus.publish(subjects.metrics(metrics.run_id), metrics, f"metrics:{metrics.run_id}:{metrics.step}:{digest}")
