"""The SQL schema: runs, datasets, step metrics, tasks, rollouts (trajectories), transitions,
rewards, groups, dead letters, API keys.

Token arrays are stored as the same packed little-endian blobs that travel on the wire.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import false


class Base(DeclarativeBase):
    pass


class RunRow(Base):
    """A run. `state` NULL marks an ad-hoc bucket of tasks made by `put_tasks` (no config, no
    lifecycle): run queries skip it, and `put_run` for its id turns it into a real run.

    Columns added after the first schema are nullable or server-defaulted, so `create_schema`
    can add them to a database an older version created.
    """

    __tablename__ = "runs"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # RunConfig dump
    state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    updated_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    cursor: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # PaceCursor dump
    # cursor.groups_published again, as a column: lets save_cursor compare-and-set in one UPDATE.
    groups_published: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rows: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # dataset size
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Set once the run ended and its bus objects were removed (services/store/cleanup.py);
    # `groups_consumed` keeps what the deleted progress entry said, for the run's view.
    cleaned_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    groups_consumed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The tenant whose API keys see this run (and its tasks, rollouts, metrics, evaluations).
    # Runs stored before tenancy existed belong to the default project.
    project: Mapped[str] = mapped_column(String(32), default="default", server_default="default")

    __table_args__ = (Index("ix_runs_project_created", "project", "created_at"),)


class DatasetRow(Base):
    """Named dataset rows, immutable once stored (runs refer to them by name)."""

    __tablename__ = "datasets"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    rows: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    # Names are global (the primary key): a name another project holds is refused, never shared.
    project: Mapped[str] = mapped_column(String(32), default="default", server_default="default")


class MetricRow(Base):
    """One optimizer step of a run (StepMetrics); a re-trained step replaces its row."""

    __tablename__ = "metrics"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    staleness: Mapped[dict[str, int]] = mapped_column(JSON)
    dropped: Mapped[dict[str, str]] = mapped_column(JSON)
    group_ids: Mapped[list[str]] = mapped_column(JSON)  # in the order the trainer consumed them
    trainer_id: Mapped[str] = mapped_column(String(128))
    at: Mapped[float] = mapped_column(Float)
    # METRICS stream sequence of the stored message: a redelivered older message never
    # overwrites a newer one (wall clocks of restarted trainers are not comparable).
    seq: Mapped[int] = mapped_column(BigInteger)


class TaskRow(Base):
    __tablename__ = "tasks"
    task_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    agent: Mapped[str] = mapped_column(String(128))
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    group_size: Mapped[int] = mapped_column(Integer)
    sampling: Mapped[dict[str, Any]] = mapped_column(JSON)
    timeout_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    eval: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class RolloutRow(Base):
    """One stored trajectory; the first attempt to arrive wins, later duplicates are ignored."""

    __tablename__ = "rollouts"
    rollout_id: Mapped[str] = mapped_column(String(160), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64))
    task_id: Mapped[str] = mapped_column(String(128), index=True)
    group_id: Mapped[str] = mapped_column(String(128), index=True)
    sample_index: Mapped[int] = mapped_column(Integer)
    group_size: Mapped[int] = mapped_column(Integer)
    agent: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    reward: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float] = mapped_column(Float)
    worker_id: Mapped[str] = mapped_column(String(128))
    attempt: Mapped[int] = mapped_column(Integer)
    trace_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    num_transitions: Mapped[int] = mapped_column(Integer)
    eval: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    eval_version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the version it was asked for
    # The oldest policy version that produced one of its tokens (None: no token generated).
    policy_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    newest_version: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (
        Index("ix_rollouts_run_finished", "run_id", "finished_at"),
        Index("ix_rollouts_run_eval_version", "run_id", "eval", "eval_version"),
    )


class TransitionRow(Base):
    __tablename__ = "transitions"
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.rollout_id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    role: Mapped[str] = mapped_column(String(64))
    prompt_ids: Mapped[bytes] = mapped_column(LargeBinary)
    response_ids: Mapped[bytes] = mapped_column(LargeBinary)
    response_logprobs: Mapped[bytes] = mapped_column(LargeBinary)
    response_versions: Mapped[bytes] = mapped_column(LargeBinary)
    finish_reason: Mapped[str] = mapped_column(String(32))
    latency_s: Mapped[float] = mapped_column(Float)


class RewardRow(Base):
    __tablename__ = "rewards"
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.rollout_id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    transition: Mapped[int | None] = mapped_column(Integer, nullable=True)
    source: Mapped[str | None] = mapped_column(String(128), nullable=True)


class EventRow(Base):
    """What `ctx.event` recorded: tool calls and outcomes (AIR rules turn them into rewards)."""

    __tablename__ = "events"
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.rollout_id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    transition: Mapped[int | None] = mapped_column(Integer, nullable=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    at: Mapped[float] = mapped_column(Float)


class GroupRow(Base):
    """A group that was published to GROUPS (so it is not published again)."""

    __tablename__ = "groups"
    group_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    task_id: Mapped[str] = mapped_column(String(128))
    size: Mapped[int] = mapped_column(Integer)
    published_at: Mapped[float] = mapped_column(Float)


class DeadLetterRow(Base):
    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    stream: Mapped[str] = mapped_column(String(32))
    stream_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)
    subject: Mapped[str] = mapped_column(String(256))
    consumer: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    delivered: Mapped[int] = mapped_column(Integer)
    at: Mapped[float] = mapped_column(Float)

    __table_args__ = (UniqueConstraint("stream", "stream_seq", name="uq_dead_letters_stream_seq"),)


class ReplayJobRow(Base):
    """A durable replay: which groups go to run `into`, in order, and how many are out.

    Made once per `into` by the replay RPC; the store publishes from `cursor` on and advances
    it after each acked chunk, so a store restarted mid-replay resumes where it stopped, and a
    repeated request (even after the stream's duplicate window) republishes nothing."""

    __tablename__ = "replay_jobs"
    into: Mapped[str] = mapped_column(String(64), primary_key=True)
    source: Mapped[str] = mapped_column(String(64))
    group_ids: Mapped[list[str]] = mapped_column(JSON)
    cursor: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="running")  # running | done
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class ApiKeyRow(Base):
    """A gateway API key (shared/apikeys.py): only the sha256 of its secret is kept. Revoked
    keys stay (revoked_at set) so a listing shows what existed and a key id is never reused."""

    __tablename__ = "api_keys"
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    project: Mapped[str] = mapped_column(String(32), index=True)
    scope: Mapped[str] = mapped_column(String(8))
    name: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
