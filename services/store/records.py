"""Conversion between wire messages and table rows."""

from __future__ import annotations

from typing import Any

from shared.messages import Reward, TaskSpec, Trajectory, Transition
from services.store.tables import RewardRow, RolloutRow, TaskRow, TransitionRow


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
    }


def rollout_row(t: Trajectory) -> dict[str, Any]:
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
    }


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
        {"rollout_id": t.rollout_id, "idx": i, "value": r.value, "transition": r.transition, "event": r.event}
        for i, r in enumerate(t.rewards)
    ]


def trajectory_from_rows(r: RolloutRow, transitions: list[TransitionRow], rewards: list[RewardRow]) -> Trajectory:
    return Trajectory(
        rollout_id=r.rollout_id,
        run_id=r.run_id,
        task_id=r.task_id,
        group_id=r.group_id,
        sample_index=r.sample_index,
        group_size=r.group_size,
        agent=r.agent,
        status=r.status,  # type: ignore[arg-type]
        error=r.error,
        reward=r.reward,
        rewards=[Reward(value=w.value, transition=w.transition, event=w.event) for w in sorted(rewards, key=lambda w: w.idx)],
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
    )
