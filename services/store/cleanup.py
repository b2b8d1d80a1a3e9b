"""Removing what an ended run left on the bus; SQL keeps the record.

A run that finished, was cancelled or failed never runs again, so its trainer's durable on
GROUPS, groups nobody will train, queued training requests, its progress entry, its lease
keys and its weight versions beyond `training.keep_versions_after` are only cost. The store
removes them, because it owns the run's state and already sweeps periodically
(`Store.reconcile`): a run is cleaned once it has been ended for `cleanup_after_s` (its
trainer and pacer have let go by then: both leases expire within `LEASE_TTL_S`), and the
cleanup is recorded in SQL (`runs.cleaned_at`) so it happens once.

Every step is idempotent, so a store killed half-way redoes the whole of it next sweep.
Nothing recreates what was removed: trainers and pacers take only running runs, and the
store publishes no more groups for an ended run (`Store.publish_groups`).
"""

from __future__ import annotations

import nats.js.errors
import structlog

from shared import subjects
from shared.bus import Bus
from shared.messages import DecodeError, RunView, TrainerProgress
from shared.weights import prune_weights

log = structlog.get_logger("store.cleanup")


async def clean_up_run(bus: Bus, run: RunView) -> int | None:
    """Remove `run`'s bus objects; returns the groups its trainer had consumed (from its
    progress entry, before deleting it), or None when it left none."""
    run_id = run.run_id
    for durable in (subjects.trainer_durable(run_id), subjects.trainer_durable(run_id, replay=True)):
        try:
            await bus.js.delete_consumer(subjects.STREAM_GROUPS, durable)
        except nats.js.errors.NotFoundError:
            pass
    # Groups never trained (a cancelled run) and training requests never run. Evaluation
    # requests stay: a finished run's final evaluation may still be queued, and they are
    # consumed like any request.
    for stream, subject in (
        (subjects.STREAM_GROUPS, subjects.groups(run_id)),
        (subjects.STREAM_GROUPS, subjects.groups(run_id, replay=True)),
        (subjects.STREAM_TASKS, subjects.tasks(run_id)),
    ):
        await bus.js.purge_stream(stream, subject=subject)
    consumed = await _progress(bus, run_id)
    keys = [(subjects.KV_POLICY, subjects.progress_key(run_id))]
    keys += [(subjects.KV_LEASES, subjects.lease_key(role, run_id)) for role in ("pace", "train")]
    keep = run.config.training.keep_versions_after
    if keep == 0:
        keys.append((subjects.KV_POLICY, subjects.policy_key(run_id)))
    for bucket, key in keys:
        await bus.kv_purge(bucket, key)
    deleted = await prune_weights(bus, run_id, keep=keep)
    log.info("ended run cleaned up", run_id=run_id, state=run.state, weights_deleted=len(deleted), kept_versions=keep)
    return consumed


async def _progress(bus: Bus, run_id: str) -> int | None:
    value = await bus.kv_value(subjects.KV_POLICY, subjects.progress_key(run_id))
    if value is None:
        return None
    try:
        return TrainerProgress.decode(value).groups_consumed
    except DecodeError:
        return None
