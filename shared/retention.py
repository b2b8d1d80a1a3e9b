"""What the bus keeps, for how long, and how much: SQL is the record, the streams are the pipe.

Every relayrl stream has exactly one consumer per subject (a shared durable, or the trainer's
durable for its run), so each is a **work queue**: a message leaves the stream when its
consumer acks it, and every consumer acks only after the effect is durable (the store after
its commit, the trainer after the checkpoint that covers the group). What the streams hold is
therefore what is in flight, not the history of the run.

Each stream is also bounded in bytes (`max_bytes`) with `discard: new`: a full stream refuses
the publish with a JetStream 503 ("maximum bytes exceeded"), which `shared.faults.is_transient`
calls transient, so every publisher waits and retries (the rollout worker, the store's group
publisher and reconciler, the dead-letter path, the gateway's pacer). A bound is a backstop
for a consumer that is down, never a way to drop data: `discard: old` would delete messages
nobody has consumed.

Duplicate windows are derived from the retry paths that can publish the same `Nats-Msg-Id`
twice (below). Correctness never depends on them: every effect is an idempotent upsert on the
message's id (SQL) or checked against the trainer's checkpoint, so a copy that arrives after
its window costs work, not a duplicate trajectory. A window only has to cover the common
re-sends and no more, because the server keeps every id of the window in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import api as js_api

from shared import subjects

MIB = 1024 * 1024

# --- the retry bounds the windows derive from (the services' settings default to these) ---

# Timeout of every NATS publish (ServiceSettings.request_timeout_s): a publish whose ack was
# lost is sent again with the same id once it has run out.
REQUEST_TIMEOUT_S = 10.0
# Rollout worker: a finished trajectory's publish is retried this long through an outage.
PUBLISH_PATIENCE_S = 60.0
# Store: un-acked trajectories of a dead store come back to its successor after this.
STORE_ACK_WAIT_S = 10.0
# Store: complete groups never published are swept this often (and once at start).
RECONCILE_EVERY_S = 30.0
# Supervisor (`relayrl up`, compose `restart:`): the longest wait before a restart.
SUPERVISOR_BACKOFF_MAX_S = 10.0
# A restarted service: connect, open its database or model, take its lease, first fetch.
STARTUP_S = 30.0


@dataclass(frozen=True)
class StreamSpec:
    """One relayrl stream: its retention, its backstop bound and its duplicate window."""

    name: str
    max_bytes: int
    duplicate_window_s: float
    retention: js_api.RetentionPolicy = js_api.RetentionPolicy.WORK_QUEUE
    # Work queues empty as they are consumed; the age limit only reclaims what a consumer that
    # never comes back left behind (a run nobody trains any more).
    max_age_s: float = 30 * 86400.0
    discard: js_api.DiscardPolicy = js_api.DiscardPolicy.NEW

    @property
    def subjects(self) -> list[str]:
        return [subjects.STREAM_SUBJECTS[self.name]]


STREAMS: tuple[StreamSpec, ...] = (
    # Re-sent with the same id (the rollout id) when a gateway dies between publishing a
    # batch and storing its pacing cursor: its successor takes the pace lease after the lease
    # TTL, once restarted and started, and publishes the uncommitted tail again.
    StreamSpec(
        subjects.STREAM_TASKS,
        max_bytes=512 * MIB,
        duplicate_window_s=subjects.LEASE_TTL_S + SUPERVISOR_BACKOFF_MAX_S + STARTUP_S + REQUEST_TIMEOUT_S,
    ),
    # Re-sent (id: rollout:attempt) by the worker's publish retry, for at most its patience
    # plus the last attempt's timeout. A rerun after a worker died is a new attempt: new id.
    StreamSpec(
        subjects.STREAM_TRAJECTORIES,
        max_bytes=1024 * MIB,
        duplicate_window_s=PUBLISH_PATIENCE_S + REQUEST_TIMEOUT_S,
    ),
    # Re-sent (id: group) by the store when it stored a group's publish but not its mark:
    # the batch comes back after ack_wait, or the successor of a dead store sweeps at start,
    # or the periodic sweep finds it.
    StreamSpec(
        subjects.STREAM_GROUPS,
        max_bytes=1024 * MIB,
        duplicate_window_s=max(STORE_ACK_WAIT_S, SUPERVISOR_BACKOFF_MAX_S + STARTUP_S) + RECONCILE_EVERY_S,
    ),
    # Re-sent only by a publish retry; a trainer that resumes re-sends its steps under new ids
    # (their content differs) and the store replaces the stored step.
    StreamSpec(subjects.STREAM_METRICS, max_bytes=128 * MIB, duplicate_window_s=2 * REQUEST_TIMEOUT_S),
    # Re-sent (id: stream:seq) when a consumer restarted before acking what it dead-lettered:
    # the message comes back after its ack_wait to the restarted consumer.
    StreamSpec(
        subjects.STREAM_DLQ,
        max_bytes=256 * MIB,
        duplicate_window_s=STORE_ACK_WAIT_S + SUPERVISOR_BACKOFF_MAX_S + STARTUP_S,
    ),
)


def spec(name: str) -> StreamSpec | None:
    """The spec of relayrl's stream `name`; None for a stream that is not relayrl's."""
    return next((s for s in STREAMS if s.name == name), None)


def stream_config(s: StreamSpec, replicas: int, max_bytes: int | None = None) -> js_api.StreamConfig:
    """The JetStream config of `s`; `max_bytes` (the `stream_max_bytes` setting) caps its bound."""
    return js_api.StreamConfig(
        name=s.name,
        subjects=s.subjects,
        retention=s.retention,
        storage=js_api.StorageType.FILE,
        max_age=s.max_age_s,
        max_bytes=min(s.max_bytes, max_bytes) if max_bytes else s.max_bytes,
        discard=s.discard,
        duplicate_window=s.duplicate_window_s,
        num_replicas=replicas,
    )
