"""Message factories: trajectories with packed arrays, alone or as members of a group."""

from __future__ import annotations

from shared.messages import Event, Reward, Trajectory, Transition, pack_f32, pack_i32


def make_trajectory(rollout_id: str = "t1.0", attempt: int = 1, n_tokens: int = 5) -> Trajectory:
    return Trajectory(
        rollout_id=rollout_id,
        run_id="r",
        task_id=rollout_id.split(".")[0],
        group_id=rollout_id.split(".")[0],
        sample_index=int(rollout_id.split(".")[1]),
        group_size=2,
        agent="copy",
        status="ok",
        reward=0.5,
        transitions=[
            Transition(
                prompt_ids=pack_i32([1, 2, 3]),
                response_ids=pack_i32(range(n_tokens)),
                response_logprobs=pack_f32([-0.25] * n_tokens),
                response_versions=pack_i32([7] * n_tokens),
            )
        ],
        started_at=1.0,
        finished_at=2.0,
        worker_id="w",
        attempt=attempt,
    )


def trajectory(task: str, index: int, group_size: int, attempt: int = 1, n_tokens: int = 5):
    t = make_trajectory(f"{task}.{index}", attempt=attempt, n_tokens=n_tokens)
    # Rewards and events ride along so the round trip through SQL covers them.
    rewards = [Reward(value=0.1 * index, transition=0, source="tool"), Reward(value=-0.5)]
    events = [Event(name="tool_success", transition=0, data={"tool": "sql", "rows": [1, 2]}, at=12.5)]
    return t.model_copy(update={"group_size": group_size, "rewards": rewards, "events": events})
