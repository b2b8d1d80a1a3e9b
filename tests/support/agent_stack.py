"""Running example agents end to end on the session's shared stack (the `agent_stack` fixture in
tests/conftest.py: nats-server, store, inference with the tiny model, a rollout worker, gateway;
no trainer): helpers that submit tasks over HTTP and read back the stored trajectories and
their training samples.

The tiny model is random: these tests check what was captured (transitions, roles, masks,
rewards, events), never the model's quality.
"""

from __future__ import annotations

import re
from typing import Any

from services.cli.client import GatewayClient
from services.cli.stack import Stack
from services.trainer.samples import Sample, build_samples
from shared.messages import Group, Trajectory, Transition, pack_f32, pack_i32


def trajectory_from_view(view: dict[str, Any]) -> Trajectory:
    """A stored rollout as the gateway shows it (`GET /v1/rollouts/{id}`), back as a Trajectory."""
    data = dict(view)
    data["transitions"] = [
        Transition(
            role=x["role"],
            prompt_ids=pack_i32(x["prompt_ids"]),
            response_ids=pack_i32(x["response_ids"]),
            response_logprobs=pack_f32(x["response_logprobs"]),
            response_versions=pack_i32(x["response_versions"]),
            finish_reason=x["finish_reason"],
            latency_s=x["latency_s"],
        )
        for x in view["transitions"]
    ]
    return Trajectory.model_validate(data)


def run_tasks(
    stack: Stack,
    agent: str,
    inputs: list[dict[str, Any]],
    group_size: int = 2,
    sampling: dict[str, Any] | None = None,
    timeout_s: float = 60.0,
    wait_s: float = 240.0,
) -> list[Trajectory]:
    """Submit one task per input (each `group_size` rollouts), wait, return every trajectory."""
    client = GatewayClient(stack.gateway_url, api_key=stack.api_key)
    try:
        tasks = [
            {"agent": agent, "input": row, "group_size": group_size, "timeout_s": timeout_s,
             "sampling": {"seed": i, **(sampling or {})}}
            for i, row in enumerate(inputs)
        ]  # fmt: skip
        accepted = client.submit(tasks)
        views = client.wait([t["task_id"] for t in accepted], timeout_s=wait_s)
        ids = [r["rollout_id"] for t in accepted for r in views[t["task_id"]]["rollouts"]]
        return [trajectory_from_view(client.rollout(rid)) for rid in ids]
    finally:
        client.close()


def samples_of(traj: Trajectory, trained_roles: str = ".*") -> list[Sample]:
    """The training samples the trainer would build from `traj` (advantage 1 on every call)."""
    group = Group(run_id=traj.run_id, group_id=traj.group_id, task_id=traj.task_id, trajectories=[traj])
    return build_samples(group, re.compile(trained_roles), {traj.rollout_id: 1.0})


def assert_captured(traj: Trajectory) -> None:
    """Every call has prompt and response ids with one logprob and one version per token."""
    for t in traj.transitions:
        assert len(t.prompt_ids) > 0 and len(t.response_ids) > 0, t.role
        assert len(t.response_logprobs) == len(t.response_ids) == len(t.response_versions)
