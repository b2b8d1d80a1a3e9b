"""Conversion between wire messages and table rows, and the failed member a dead letter
stands for (`failed_member`)."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
from pydantic import ValidationError

from shared import subjects
from shared.messages import (
    DeadLetter,
    Event,
    PaceCursor,
    Reward,
    RolloutKeys,
    RunConfig,
    RunView,
    StepMetrics,
    TaskSpec,
    Trajectory,
    Transition,
    unpack_i32,
)
from services.store.tables import EventRow, MetricRow, RewardRow, RolloutRow, RunRow, TaskRow, TransitionRow


def task_row(task: TaskSpec) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "run_id": task.run_id,
        "agent": task.agent,
        "input": task.input,
        "group_size": task.group_size,
        "sampling": task.sampling.model_dump(),
        "timeout_s": task.timeout_s,
        "created_at": task.created_at,
        "eval": task.eval,
    }


def rollout_row(t: Trajectory) -> dict[str, Any]:
    versions = version_range(t)
    return {
        "rollout_id": t.rollout_id,
        "run_id": t.run_id,
        "task_id": t.task_id,
        "group_id": t.group_id,
        "sample_index": t.sample_index,
        "group_size": t.group_size,
        "agent": t.agent,
        "status": t.status,
        "error": t.error,
        "reward": t.reward,
        "started_at": t.started_at,
        "finished_at": t.finished_at,
        "worker_id": t.worker_id,
        "attempt": t.attempt,
        "trace_id": t.trace_id,
        "num_transitions": len(t.transitions),
        "eval": t.eval,
        "eval_version": t.eval_version,
        "policy_version": versions[0] if versions else None,
        "newest_version": versions[1] if versions else None,
    }


def version_range(t: Trajectory) -> tuple[int, int] | None:
    """The oldest and newest policy versions among the trajectory's generated tokens (None: no tokens)."""
    ranges = [unpack_i32(x.response_versions) for x in t.transitions if x.response_versions]
    if not ranges:
        return None
    return min(int(r.min()) for r in ranges), max(int(r.max()) for r in ranges)


def transition_rows(t: Trajectory) -> list[dict[str, Any]]:
    return [
        {
            "rollout_id": t.rollout_id,
            "idx": i,
            "role": tr.role,
            "prompt_ids": tr.prompt_ids,
            "response_ids": tr.response_ids,
            "response_logprobs": tr.response_logprobs,
            "response_versions": tr.response_versions,
            "finish_reason": tr.finish_reason,
            "latency_s": tr.latency_s,
        }
        for i, tr in enumerate(t.transitions)
    ]


def reward_rows(t: Trajectory) -> list[dict[str, Any]]:
    return [
        {"rollout_id": t.rollout_id, "idx": i, "value": r.value, "transition": r.transition, "source": r.source}
        for i, r in enumerate(t.rewards)
    ]


def event_rows(t: Trajectory) -> list[dict[str, Any]]:
    return [
        {"rollout_id": t.rollout_id, "idx": i, "name": e.name, "transition": e.transition, "data": e.data, "at": e.at}
        for i, e in enumerate(t.events)
    ]


def trajectory_from_rows(
    r: RolloutRow, transitions: list[TransitionRow], rewards: list[RewardRow], events: list[EventRow]
) -> Trajectory:
    return Trajectory(
        rollout_id=r.rollout_id,
        run_id=r.run_id,
        task_id=r.task_id,
        group_id=r.group_id,
        sample_index=r.sample_index,
        group_size=r.group_size,
        agent=r.agent,
        eval=bool(r.eval),
        eval_version=r.eval_version,
        status=r.status,  # type: ignore[arg-type]
        error=r.error,
        reward=r.reward,
        rewards=[
            Reward(value=w.value, transition=w.transition, source=w.source) for w in sorted(rewards, key=lambda w: w.idx)
        ],
        events=[
            Event(name=e.name, transition=e.transition, data=e.data, at=e.at) for e in sorted(events, key=lambda e: e.idx)
        ],
        transitions=[
            Transition(
                role=x.role,
                prompt_ids=x.prompt_ids,
                response_ids=x.response_ids,
                response_logprobs=x.response_logprobs,
                response_versions=x.response_versions,
                finish_reason=x.finish_reason,
                latency_s=x.latency_s,
            )
            for x in sorted(transitions, key=lambda x: x.idx)
        ],
        started_at=r.started_at,
        finished_at=r.finished_at,
        worker_id=r.worker_id,
        attempt=r.attempt,
        trace_id=r.trace_id,
    )


# Streams whose messages are group members: a rollout request (TASKS) or its trajectory.
_MEMBER_STREAMS = (subjects.STREAM_TASKS, subjects.STREAM_TRAJECTORIES)
# Who stored a member made from a dead letter (shown as the rollout's worker).
DEAD_LETTER_WORKER = "store:dead-letter"


def failed_member(letter: DeadLetter) -> Trajectory | None:
    """The failed trajectory a dead-lettered rollout request or trajectory stands for, so its
    group can still complete (status error, reward 0, error = the dead letter's reason).

    Decoded leniently (int map keys allowed, unknown fields ignored): the letter is there
    because strict decoding refused it, but its rollout keys usually survive. None when they
    do not (not MessagePack, keys missing or invalid) or the letter is not a group member.
    """
    if letter.stream not in _MEMBER_STREAMS:
        return None
    try:
        obj = msgpack.unpackb(letter.data, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - msgpack raises several unrelated types
        return None
    if not isinstance(obj, dict):
        return None
    keys = {k: obj[k] for k in RolloutKeys.model_fields if k != "schema_version" and k in obj}
    attempt = obj.get("attempt")
    try:
        return Trajectory(
            **keys,
            status="error",
            error=f"dead-lettered from {letter.stream}: {letter.reason}"[:4000],
            reward=0.0,
            started_at=letter.at,
            finished_at=letter.at,
            worker_id=DEAD_LETTER_WORKER,
            attempt=attempt if isinstance(attempt, int) and attempt >= 1 else 1,
        )
    except (ValidationError, TypeError):
        return None


def task_spec_from_row(row: TaskRow) -> TaskSpec:
    return TaskSpec(
        task_id=row.task_id,
        run_id=row.run_id,
        agent=row.agent,
        input=row.input,
        group_size=row.group_size,
        sampling=row.sampling,
        timeout_s=row.timeout_s,
        created_at=row.created_at,
        eval=bool(row.eval),
    )


# --- runs, datasets, metrics -------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """`value` as it reads back from a JSON column; ValueError when JSON cannot hold it.

    NaN and infinities are refused: SQLite would store them but PostgreSQL rejects the document.
    Comparing what was stored with what is asked for goes through this, so tuples and lists
    (and int vs float keys) compare the way they will read back.
    """
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not storable as JSON: {exc}") from None


def run_row(config: RunConfig, rows: int, now: float, project: str = "default") -> dict[str, Any]:
    cursor = PaceCursor()
    return {
        "run_id": config.run_id,
        "project": project,
        "created_at": now,
        "updated_at": now,
        "config": json_safe(config.model_dump(mode="json")),
        "state": "running",
        "cursor": cursor.model_dump(),
        "groups_published": cursor.groups_published,
        "rows": rows,
        "error": None,
    }


def run_view(row: RunRow, latest: MetricRow | None) -> RunView:
    """A stored run plus what its latest stored step says (groups_consumed is the caller's)."""
    config = RunConfig.model_validate(row.config)
    reward = latest.values.get("reward_mean") if latest else None
    return RunView(
        run_id=row.run_id,
        project=row.project or "default",
        config=config,
        state=row.state,  # type: ignore[arg-type]
        created_at=row.created_at,
        updated_at=row.updated_at or row.created_at,
        cursor=PaceCursor.model_validate(row.cursor or {}),
        rows=row.rows,
        total_steps=config.total_steps(row.rows),
        step=latest.step if latest else 0,
        version=latest.version if latest else 0,
        groups_consumed=row.groups_consumed or 0,
        reward_mean=_finite_or_none(reward),
        error=row.error,
    )


def _finite_or_none(x: float | str | None) -> float | None:
    value = float(x) if x is not None else None
    return value if value is not None and math.isfinite(value) else None


def _finite_or_text(x: float) -> float | str:
    # A NaN loss is worth keeping (training diverged) but JSON has no NaN: store its text;
    # pydantic parses "nan"/"inf" back into floats.
    return x if math.isfinite(x) else str(x)


def metric_row(m: StepMetrics, seq: int) -> dict[str, Any]:
    return {
        "run_id": m.run_id,
        "step": m.step,
        "version": m.version,
        "values": {k: _finite_or_text(v) for k, v in m.values.items()},
        "staleness": {str(k): v for k, v in m.staleness.items()},
        "dropped": m.dropped,
        "group_ids": m.group_ids,
        "trainer_id": m.trainer_id,
        "at": m.at,
        "seq": seq,
    }


def step_metrics(row: MetricRow) -> StepMetrics:
    return StepMetrics(
        run_id=row.run_id,
        step=row.step,
        version=row.version,
        group_ids=row.group_ids,
        dropped=row.dropped,
        values=row.values,  # type: ignore[arg-type]  # "nan" text parses back to float
        staleness=row.staleness,  # type: ignore[arg-type]  # JSON keys are text; pydantic makes them ints
        trainer_id=row.trainer_id,
        at=row.at,
    )
