"""What the trainer tells the rest of the system: weights, per-step metrics, progress, run state."""

from __future__ import annotations

import hashlib

from shared import subjects
from shared.bus import Bus
from shared.messages import GetById, ListRuns, Message, Reply, RunState, RunView, SetRunState, StepMetrics, TrainerProgress


class StoreError(RuntimeError):
    pass


async def store_call(bus: Bus, method: str, msg: Message, timeout_s: float) -> Reply:
    reply = await bus.request(subjects.store_rpc(method), msg, timeout=timeout_s)
    if not reply.ok:
        raise StoreError(f"store {method}: {reply.code} {reply.error}")
    return reply


async def get_run(bus: Bus, run_id: str, timeout_s: float) -> RunView:
    reply = await store_call(bus, "get_run", GetById(id=run_id), timeout_s)
    assert reply.run is not None
    return reply.run


async def runs_to_train(bus: Bus, timeout_s: float) -> list[RunView]:
    """Live training and replay runs, oldest first (the first claimable one is trained first)."""
    reply = await store_call(bus, "list_runs", ListRuns(states=["running", "paused"], limit=1000), timeout_s)
    runs = [r for r in reply.runs or [] if r.config.mode in ("train", "replay")]
    return sorted(runs, key=lambda r: r.created_at)


async def set_state(bus: Bus, run_id: str, state: RunState, timeout_s: float, error: str | None = None) -> None:
    await store_call(
        bus, "set_run_state", SetRunState(run_id=run_id, state=state, error=error, from_states=["running", "paused"]), timeout_s
    )


async def put_progress(bus: Bus, progress: TrainerProgress) -> None:
    kv = await bus.kv(subjects.KV_POLICY)
    await kv.put(subjects.progress_key(progress.run_id), progress.encode())


async def publish_metrics(bus: Bus, metrics: StepMetrics) -> None:
    # The id names the step and its groups: a step re-trained after a crash (other groups) is
    # a new message, an exact re-send of the same step is deduplicated.
    digest = hashlib.sha256("\n".join(metrics.group_ids).encode()).hexdigest()[:16]
    await bus.publish(subjects.metrics(metrics.run_id), metrics, f"metrics:{metrics.run_id}:{metrics.step}:{digest}")
