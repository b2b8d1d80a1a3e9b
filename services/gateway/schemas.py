"""HTTP request and response bodies (the wire messages in shared.messages are reused where they fit)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from shared import subjects
from shared.messages import Event, Reward, SamplingParams, Trajectory, unpack_f32, unpack_i32


class TaskIn(BaseModel):
    """One task: `group_size` rollouts of `agent` on `input`."""

    model_config = ConfigDict(extra="forbid")
    agent: str = Field(min_length=1, max_length=128)
    input: dict[str, Any]
    group_size: int = Field(1, ge=1, le=1024)
    task_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_:-]+$")
    run_id: str | None = Field(
        None, description="default: the key's project's ad-hoc bucket (`default`; `default-<project>` for another project)"
    )
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    timeout_s: float = Field(60.0, gt=0, le=86400)

    @field_validator("run_id")
    @classmethod
    def _run_token(cls, v: str | None) -> str | None:
        return None if v is None else subjects.check_token(v)


class TaskBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[TaskIn] = Field(min_length=1)


def _shape(v: Any) -> str:
    return "batch" if isinstance(v, dict) and "tasks" in v else "single"


TasksBody = Annotated[Annotated[TaskBatch, Tag("batch")] | Annotated[TaskIn, Tag("single")], Discriminator(_shape)]


class TaskAccepted(BaseModel):
    task_id: str
    run_id: str
    group_size: int
    rollout_ids: list[str]


class TasksAccepted(BaseModel):
    tasks: list[TaskAccepted]


class TransitionOut(BaseModel):
    role: str
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    response_versions: list[int]
    finish_reason: str
    latency_s: float
    # Whether the run trains this call's role (its `trained_roles`); None: no run config (ad-hoc tasks).
    trained: bool | None = None


class RolloutOut(BaseModel):
    rollout_id: str
    run_id: str
    task_id: str
    group_id: str
    sample_index: int
    group_size: int
    agent: str
    eval: bool
    eval_version: int | None
    status: str
    error: str | None
    reward: float
    rewards: list[Reward]
    events: list[Event]
    transitions: list[TransitionOut]
    started_at: float
    finished_at: float
    worker_id: str
    attempt: int
    trace_id: str | None

    @classmethod
    def from_trajectory(cls, t: Trajectory, trained_roles: re.Pattern[str] | None = None) -> RolloutOut:
        data = t.model_dump(exclude={"schema_version", "transitions"})
        data["transitions"] = [
            TransitionOut(
                role=x.role,
                prompt_ids=unpack_i32(x.prompt_ids).tolist(),
                response_ids=unpack_i32(x.response_ids).tolist(),
                response_logprobs=unpack_f32(x.response_logprobs).tolist(),
                response_versions=unpack_i32(x.response_versions).tolist(),
                finish_reason=x.finish_reason,
                latency_s=x.latency_s,
                trained=None if trained_roles is None else trained_roles.fullmatch(x.role) is not None,
            )
            for x in t.transitions
        ]
        return cls(**data)


class ErrorOut(BaseModel):
    detail: Any


# What any /v1 route may answer before it runs: no valid key, a key without the scope, the
# key's rate limit.
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 429: {"model": ErrorOut},
}  # fmt: skip
