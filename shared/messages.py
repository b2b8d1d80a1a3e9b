"""Typed wire messages and their MessagePack encoding.

Every message is a pydantic model with a `schema_version`. `encode()` packs it with
MessagePack; `decode()` unpacks and validates, raising `DecodeError` with a reason a
consumer can put in the dead-letter queue. Token ids, logprobs and per-token policy
versions travel as packed little-endian arrays (`bytes`), never as Python lists: packing
a numpy buffer is ~50x cheaper than a list of ints.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal, Self, Sequence, get_args

import msgpack
import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1


class DecodeError(ValueError):
    """A payload that is not a valid message of the expected type; the text is the reason."""


# --- packed arrays ---------------------------------------------------------------------

_I32 = np.dtype("<i4")
_F32 = np.dtype("<f4")


def _check_packed(value: bytes) -> bytes:
    if len(value) % 4:
        raise ValueError(f"packed array length {len(value)} is not a multiple of 4 bytes")
    return value


Packed = Annotated[bytes, AfterValidator(_check_packed)]


def _check_finite_f32(value: bytes) -> bytes:
    _check_packed(value)
    if value and not np.isfinite(np.frombuffer(value, dtype=_F32)).all():
        raise ValueError("packed float32 array holds NaN or infinity")
    return value


# Logprobs: a NaN or infinite one would poison the trainer's ratio; refused at decode.
FinitePacked = Annotated[bytes, AfterValidator(_check_finite_f32)]


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL: refused here, a dead letter with this reason, rather
    # than a database error that fails the whole batch it arrived in.
    if "\x00" in value:
        raise ValueError("text must not contain NUL characters")
    return value


def _bounded(max_length: int, min_length: int = 0) -> Any:
    """A string column of the store: at most `max_length` characters (its SQL length), no NUL."""
    return Annotated[str, Field(min_length=min_length, max_length=max_length), AfterValidator(_no_nul)]


def _check_json_data(value: dict[str, Any]) -> dict[str, Any]:
    """Event data must read back from a JSON column as it was given: text keys, finite numbers."""

    def walk(x: Any, path: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if not isinstance(k, str):
                    raise ValueError(f"{path or 'data'} has a non-text key {k!r} (JSON keys are text)")
                walk(v, f"{path}.{k}" if path else k)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif isinstance(x, float) and not np.isfinite(x):
            raise ValueError(f"{path or 'data'} is {x!r}: JSON has no NaN or infinity")

    walk(value, "")
    return value


Finite = Annotated[float, Field(allow_inf_nan=False)]
INT32_MAX = 2**31 - 1  # the store's INTEGER columns (PostgreSQL int4)
RolloutIdText = _bounded(160, 1)
RunIdText = _bounded(64, 1)
IdText = _bounded(128, 1)
Text128 = _bounded(128)
Text64 = _bounded(64)
Text32 = _bounded(32)


def pack_i32(values: Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(values, dtype=_I32).tobytes()


def pack_f32(values: Sequence[float] | np.ndarray) -> bytes:
    return np.asarray(values, dtype=_F32).tobytes()


def unpack_i32(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=_I32)


def unpack_f32(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=_F32)


# --- base ------------------------------------------------------------------------------


class Message(BaseModel):
    """Base of every wire message: versioned, strict about unknown fields."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION

    @model_validator(mode="after")
    def _known_schema(self) -> Self:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version} is not supported (this build speaks {SCHEMA_VERSION})"
            )
        return self

    def encode(self) -> bytes:
        return msgpack.packb(self.model_dump(), use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return _validate(cls, _unpack_map(data, cls.__name__))


def _unpack_map(data: bytes, what: str) -> dict[str, Any]:
    """The MessagePack map in `data`; DecodeError (the dead-letter reason) if it is none."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"not MessagePack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"expected a map for {what}, got {type(obj).__name__}")
    return obj


def _validate(model: type[Any], obj: dict[str, Any]) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise DecodeError(f"invalid {model.__name__}: {_short(exc)}") from None


def _short(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


# --- tasks and rollouts ----------------------------------------------------------------


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(32, ge=1, le=32768)
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int | None = None


class TaskSpec(BaseModel):
    """One agent input: `group_size` rollouts of it form a GRPO group."""

    model_config = ConfigDict(extra="forbid")
    task_id: str = Field(min_length=1, max_length=128)
    run_id: str
    agent: str = Field(min_length=1, max_length=128)
    input: dict[str, Any]
    group_size: int = Field(1, ge=1, le=1024)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    timeout_s: float = Field(60.0, gt=0, le=86400)
    created_at: float = Field(default_factory=time.time)
    # Evaluation, not training: its rollouts are stored and aggregated per policy version
    # (GET /v1/runs/{id}/evals) but never sent to a trainer.
    eval: bool = False

    def group_id(self) -> str:
        return self.task_id

    def rollout_id(self, sample_index: int) -> str:
        return f"{self.task_id}.{sample_index}"


class RolloutKeys(Message):
    """What identifies one rollout and its group; carried by the request and its trajectory."""

    # Bounded as the store's columns are (services/store/tables.py), so a too-long id is a
    # dead letter at decode, not a database error.
    rollout_id: RolloutIdText
    run_id: RunIdText
    task_id: IdText
    group_id: IdText
    sample_index: int = Field(ge=0, le=INT32_MAX)
    group_size: int = Field(ge=1, le=INT32_MAX)
    agent: Text128
    eval: bool = False  # an evaluation rollout: stored and aggregated, never trained
    eval_version: int | None = None  # the policy version an evaluation rollout was asked to run on

    def keys(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RolloutKeys.model_fields if name != "schema_version"}


class RolloutRequest(RolloutKeys):
    """One task x sample index; published to TASKS."""

    input: dict[str, Any]
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    timeout_s: float = Field(60.0, gt=0)
    created_at: float = Field(default_factory=time.time)
    # The trainer's version when pacing admitted this request: inference waits (bounded) until
    # it serves at least this version, so a swap still in flight does not make samples stale.
    min_version: int = Field(0, ge=0)

    @classmethod
    def for_task(cls, task: TaskSpec, sample_index: int, min_version: int = 0) -> RolloutRequest:
        return cls(
            rollout_id=task.rollout_id(sample_index),
            run_id=task.run_id,
            task_id=task.task_id,
            group_id=task.group_id(),
            sample_index=sample_index,
            group_size=task.group_size,
            agent=task.agent,
            input=task.input,
            sampling=task.sampling,
            timeout_s=task.timeout_s,
            min_version=min_version,
            eval=task.eval,
            eval_version=min_version if task.eval else None,
        )


class Transition(BaseModel):
    """One LLM call: what the policy saw and what it sampled, token for token."""

    model_config = ConfigDict(extra="forbid")
    role: Text64 = "assistant"
    prompt_ids: Packed = b""  # int32
    response_ids: Packed = b""  # int32
    response_logprobs: FinitePacked = b""  # float32, one per response token
    response_versions: Packed = b""  # int32, policy version that produced each response token
    finish_reason: Text32 = "stop"
    latency_s: Finite = 0.0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids) // 4  # packed int32: len() of the field counts bytes

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids) // 4

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        n = len(self.response_ids)
        if len(self.response_logprobs) != n or len(self.response_versions) != n:
            raise ValueError(
                "response_ids, response_logprobs and response_versions must have equal length "
                f"(bytes: {n}, {len(self.response_logprobs)}, {len(self.response_versions)})"
            )
        return self


class Reward(BaseModel):
    """An intermediate reward the agent gave (`ctx.reward`), tied to one LLM call.

    `transition` is the index of that call in the trajectory (None: the last call). `source`
    says where it came from ("tool", "format", ...): shown in queries, never used in math.
    """

    model_config = ConfigDict(extra="forbid")
    value: float = Field(allow_inf_nan=False)
    transition: int | None = None
    source: Text128 | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_event(cls, data: Any) -> Any:
        # Trajectories published before `source` replaced `event` (still in a stream during an
        # upgrade) keep decoding: the old event name becomes the source label.
        if isinstance(data, dict) and "event" in data:
            data = dict(data)
            event = data.pop("event")
            if event is not None and data.get("source") is None:
                data["source"] = event
        return data


class Event(BaseModel):
    """Something that happened during a rollout (`ctx.event`): a tool call and its outcome, an
    environment step. With AIR on, a run's `air_rules` turn named events into rewards."""

    model_config = ConfigDict(extra="forbid")
    name: IdText
    transition: int | None = None  # the LLM call it follows (None: the last call)
    data: Annotated[dict[str, Any], AfterValidator(_check_json_data)] = Field(default_factory=dict)
    at: Finite = Field(default_factory=time.time)


TrajectoryStatus = Literal["ok", "error", "timeout"]


class Trajectory(RolloutKeys):
    """What one rollout produced; published to TRAJECTORIES, stored by the store."""

    status: TrajectoryStatus
    error: str | None = None
    # Non-finite values are refused at decode: SQLite stores NaN as NULL (a NOT NULL failure
    # for the whole batch) and a NaN reward would poison the group's advantages.
    reward: Finite
    rewards: list[Reward] = Field(default_factory=list)
    events: list[Event] = Field(default_factory=list)
    transitions: list[Transition] = Field(default_factory=list)
    started_at: Finite
    finished_at: Finite
    worker_id: Text128
    attempt: int = Field(1, ge=1, le=INT32_MAX)
    trace_id: Text32 | None = None

    @field_validator("error")
    @classmethod
    def _error_text(cls, value: str | None) -> str | None:
        # An error message is free text (often an exception's): a NUL in it is replaced, not
        # refused, so a failed rollout is never lost over how its error was worded.
        return value.replace("\x00", "\ufffd") if value else value

    def msg_id(self) -> str:
        return f"{self.rollout_id}:{self.attempt}"


class Group(Message):
    """All `group_size` members of a task, ok or failed; published to GROUPS."""

    run_id: str
    group_id: str
    task_id: str
    trajectories: list[Trajectory]
    completed_at: float = Field(default_factory=time.time)


class GroupRef(Message):
    """A complete group too large for one NATS message, published to GROUPS in its place: the
    trainer fetches its `size` members from the store in pages (`GetGroupMembers`), each page
    under max_payload. Same subject and Nats-Msg-Id as the whole group would have had."""

    run_id: str
    group_id: str
    task_id: str
    size: int = Field(ge=1, description="members the group has (the trainer checks it got them all)")
    nbytes: int = Field(0, ge=0, description="packed size of the whole group (why it went by reference)")
    completed_at: float = Field(default_factory=time.time)


def decode_group(data: bytes) -> Group | GroupRef:
    """A message from GROUPS: a whole `Group`, or a `GroupRef` to fetch it by. DecodeError if neither."""
    obj = _unpack_map(data, "a group")
    return _validate(Group if "trajectories" in obj else GroupRef, obj)


class GetGroupMembers(Message):
    """Trainer -> store (`relayrl.rpc.store.get_group_members`): members of a stored group with
    sample_index > `after_index`, as many as fit one message."""

    group_id: str
    after_index: int = -1


class GroupMembers(Message):
    """Store -> trainer: one page of a group's members in sample order; `more` while members remain."""

    trajectories: list[Trajectory]
    more: bool = False


class DeadLetter(Message):
    """A message a consumer gave up on, with the reason; published to DLQ."""

    stream: str
    subject: str
    consumer: str
    reason: str
    data: bytes
    headers: dict[str, str] = Field(default_factory=dict)
    delivered: int = 1
    stream_seq: int | None = None
    at: float = Field(default_factory=time.time)


class AgentInfo(Message):
    """A registered agent as advertised by a rollout worker (KV `relayrl-agents`)."""

    name: str
    description: str = ""
    worker_id: str
    registered_at: float = Field(default_factory=time.time)


# --- store request/reply ---------------------------------------------------------------


class PutTasks(Message):
    tasks: list[TaskSpec]
    # Set by the gateway for a user's request: the tasks' runs must belong to this project (or
    # be new ad-hoc buckets, made in it). None: an internal caller (run pacing), unchecked.
    project: str | None = None


class GetById(Message):
    id: str
    # Set for a user's request: an object of another project is answered as not found.
    project: str | None = None


class Ping(Message):
    pass


class RolloutSummary(BaseModel):
    rollout_id: str
    sample_index: int
    status: TrajectoryStatus
    reward: float
    attempt: int
    worker_id: str
    finished_at: float


class TaskView(BaseModel):
    task_id: str
    run_id: str
    agent: str
    input: dict[str, Any]
    group_size: int
    created_at: float
    status: Literal["pending", "running", "done"]
    group_published: bool = Field(description="complete and handed on: to its trainer on GROUPS when the run trains (ad-hoc and ended runs: kept in SQL only)")
    rollouts: list[RolloutSummary]
    eval: bool = False


class EvalSummary(BaseModel):
    """Evaluation rollouts of a run asked to run on one policy version."""

    version: int
    rollouts: int
    ok: int
    off_version: int = Field(
        description="rollouts with a token from another version (inference had moved on, or had "
        "not reached it within version_wait_s): their results are not this version's alone"
    )
    reward_mean: float
    accuracy: float = Field(description="share of rollouts with reward >= accuracy_threshold")
    accuracy_threshold: float
    first_at: float
    last_at: float
    calls_mean: float = Field(0.0, description="LLM calls per rollout")
    response_tokens_mean: float = Field(0.0, description="generated tokens per LLM call")
    events: dict[str, int] = Field(default_factory=dict, description="events recorded (ctx.event), by name")
    rollouts_with: dict[str, int] = Field(default_factory=dict, description="rollouts with at least one such event")


# --- training runs ---------------------------------------------------------------------

# Each training option's values are listed once, here, as a Literal: RunConfig validation (so
# the gateway's 422), the trainer's checks and the tests all derive from it (typing.get_args).
# Kept here so the gateway validates without importing torch or verl; tests/unit/test_options.py
# runs every value through verl 0.9.1's own function, so a value verl refuses fails there.
#
# Policy losses: names in verl's POLICY_LOSS_REGISTRY (core_algos.get_policy_loss_fn) that the
# trainer runs as they are. verl also registers dppo_tv, dppo_kl, bypass_mode and dro; they are
# not offered (dro needs a policy_loss.dro_beta the config has no field for).
PolicyLoss = Literal["vanilla", "gspo", "cispo", "gpg", "clip_cov", "kl_cov", "geo_mean", "sapo"]
POLICY_LOSSES: tuple[PolicyLoss, ...] = get_args(PolicyLoss)
# Every mode of verl's core_algos.agg_loss (and ActorConfig's valid_loss_agg_modes).
LossAggMode = Literal[
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
]
# Estimators of verl's core_algos.kl_penalty; k1/k2/k3 are aliases of kl/mse/low_var_kl, and a
# trailing "+" takes k2's gradient with the named estimator's value (straight-through). Not
# "full": verl raises NotImplementedError for it.
KlPenalty = Literal[
    "kl", "abs", "mse", "low_var_kl", "k1", "k2", "k3", "kl+", "abs+", "mse+", "low_var_kl+", "k1+", "k2+", "k3+"
]
# Credit assignment over a trajectory's calls; see services/trainer/credit.py.
CreditMode = Literal["equal", "last", "discounted"]
# What a run's trainer learns from:
# - grpo: groups of rollouts the gateway's pacer asks for and the workers run;
# - sft: conversations (dataset rows `{"messages": [...], "tools": [...]}`, loss on assistant
#   tokens) or, with `sft.from_run`, a past run's stored trajectories (exact token ids); no
#   rollouts are asked for, except evaluations.
Algorithm = Literal["grpo", "sft"]
ALGORITHMS: tuple[Algorithm, ...] = get_args(Algorithm)
# Conversation roles an SFT row may hold (OpenAI chat); only "assistant" turns are trained.
CHAT_ROLES = ("system", "user", "assistant", "tool")


class TrainingConfig(BaseModel):
    """GRPO settings (the `training:` block users already write)."""

    model_config = ConfigDict(extra="forbid")
    learning_rate: float = Field(1e-3, gt=0, le=1.0)
    batch_size: int = Field(8, ge=1, le=4096, description="groups per optimizer step")
    group_size: int = Field(8, ge=1, le=1024, description="rollouts per task")
    epochs: int = Field(1, ge=1, le=10000)
    kl_coef: float = Field(0.0, ge=0)
    kl_penalty: KlPenalty = "low_var_kl"
    entropy_coeff: float = Field(
        0.0, ge=0, le=1, description="entropy bonus subtracted from the loss (verl's entropy_coeff): keeps a policy from collapsing onto one answer"
    )
    policy_loss: PolicyLoss = "vanilla"
    loss_agg_mode: LossAggMode = "token-mean"
    clip_ratio_low: float = Field(0.2, ge=0, le=1)
    clip_ratio_high: float = Field(0.28, ge=0, le=10)
    clip_ratio_c: float = Field(3.0, gt=1)
    norm_adv_by_std: bool = True
    drop_zero_variance: bool = True
    max_grad_norm: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.99)
    micro_batch_tokens: int = Field(8192, ge=16, description="token budget of one forward/backward")
    sync_every: int = Field(1, ge=1, description="publish weights every N steps")
    checkpoint_every: int = Field(1, ge=1)
    keep_versions: int = Field(4, ge=1, description="weight versions kept in the object store while training")
    keep_versions_after: int = Field(
        1, ge=0, description="weight versions kept once the run ended (0: none, and its policy entry goes too)"
    )
    max_steps: int | None = Field(None, ge=1, description="stop after N steps; default: the dataset's epochs")
    credit: CreditMode = Field(
        "equal",
        description="how a trajectory's advantage is spread over its calls: equal (every call), last (the last"
        " trained call only), discounted (plus the discounted intermediate rewards that follow each call)",
    )
    discount: float = Field(1.0, gt=0, le=1, description="gamma of `credit: discounted`")

    @field_validator("kl_penalty", "policy_loss", "loss_agg_mode", "credit", mode="before")
    @classmethod
    def _known_option(cls, value: Any, info: ValidationInfo) -> Any:
        # One message for every option, listing the field's own Literal (pydantic's default
        # "Input should be ..." would not name the option in the text a user sees).
        choices = get_args(cls.model_fields[str(info.field_name)].annotation)
        if value not in choices:
            raise ValueError(f"unknown {info.field_name} {value!r}; choose one of {list(choices)}")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.group_size < 2 and self.norm_adv_by_std:
            raise ValueError("group_size 1 has no group baseline: GRPO with std normalisation needs group_size >= 2")
        return self


class AirRule(BaseModel):
    """An AIR (automatic intermediate reward) rule: each event named `on` (`ctx.event(on)`) earns `reward`
    on the LLM call it follows."""

    model_config = ConfigDict(extra="forbid")
    on: str = Field(min_length=1, max_length=128, description="event name, as in ctx.event(\"tool_success\")")
    reward: float = Field(allow_inf_nan=False)
    where: dict[str, Any] = Field(
        default_factory=dict, description="the event's data must hold these values, e.g. {hit: true}"
    )

    def matches(self, event: Event) -> bool:
        return event.name == self.on and all(
            key in event.data and event.data[key] == value for key, value in self.where.items()
        )

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        # YAML 1.1 (PyYAML's safe_load) reads a bare `on:` key as the boolean True, which
        # becomes the key "true" once the config is sent as JSON (`relayrl train`).
        if isinstance(data, dict) and "on" not in data:
            for key in (True, "true"):
                if key in data:
                    data = {("on" if k == key and type(k) is type(key) else k): v for k, v in data.items()}
                    break
        return data


class RuntimeConfig(BaseModel):
    """The `runtime:` block; unknown keys are kept so users' configs load unchanged."""

    model_config = ConfigDict(extra="allow")
    nworkers: int = Field(1, ge=1)
    air_enabled: bool = False
    air_rules: list[AirRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _every_rule_can_match(self) -> Self:
        seen: list[tuple[str, str]] = []
        catch_all: set[str] = set()
        for rule in self.air_rules:
            key = (rule.on, json.dumps(rule.where, sort_keys=True, default=str))
            what = f"event {rule.on!r}" + (f" where {rule.where}" if rule.where else "")
            if key in seen:
                raise ValueError(f"air_rules has two rules for {what}")
            if rule.on in catch_all:  # the first matching rule counts: this one never would
                raise ValueError(f"air_rules: the rule for {what} comes after a rule for every {rule.on!r} event")
            seen.append(key)
            if not rule.where:
                catch_all.add(rule.on)
        return self

    def air_values(self) -> list[AirRule] | None:
        """The AIR rules (the first that matches an event rewards it), or None when AIR is off
        (events then earn nothing)."""
        return list(self.air_rules) if self.air_enabled else None


class SftSource(BaseModel):
    """Where an `algorithm: sft` run's examples come from when they are not its dataset rows:
    the stored trajectories of a past run (rejection-sampling fine-tuning). Training uses the
    token ids exactly as recorded, with their loss masks (`trained_roles` of this run)."""

    model_config = ConfigDict(extra="forbid")
    from_run: str | None = Field(
        None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="the run whose trajectories to train on"
    )
    min_reward: float | None = Field(None, allow_inf_nan=False, description="only trajectories with at least this reward")


def check_conversation(row: Any) -> str | None:
    """Why `row` is not an SFT conversation (`{"messages": [...], "tools": [...]}`), or None.

    Checks the shape the chat template needs; whether it renders is the trainer's check (it
    holds the tokenizer)."""
    if not isinstance(row, dict):
        return f"a conversation is an object with `messages`, got {type(row).__name__}"
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list of chat messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            return f"messages[{i}] needs a `role` in {list(CHAT_ROLES)}"
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            return f"messages[{i}].content must be a string, a list of parts or null"
        if m["role"] == "assistant" and not content and not m.get("tool_calls"):
            return f"messages[{i}] is an assistant turn with neither content nor tool_calls"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message: nothing to train on"
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return "`tools` must be a list of tool schemas"
    return None


class RunConfig(BaseModel):
    """A training (or evaluation) run: what `POST /v1/runs` and `relayrl train` accept."""

    model_config = ConfigDict(extra="forbid")
    run_id: str = Field(
        default_factory=lambda: f"run-{uuid.uuid4().hex[:8]}", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$"
    )
    model: str = "tiny"
    agent: str = Field(min_length=1, max_length=128)
    algorithm: Algorithm = "grpo"
    init_from: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="start from the latest weights of this run (same `model`), e.g. an SFT warm start",
    )
    sft: SftSource = Field(default_factory=SftSource, description="algorithm sft: train on a past run's trajectories")
    dataset: list[dict[str, Any]] = Field(default_factory=list, description="rows inline")
    dataset_name: str | None = Field(None, description="a dataset stored with POST /v1/datasets")
    eval_dataset: list[dict[str, Any]] = Field(
        default_factory=list, description="rows evaluated greedily (temperature 0) per policy version"
    )
    eval_every: int = Field(
        0, ge=0, description="evaluate eval_dataset at version 0 and every N versions (0: only on request)"
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    max_staleness: int = Field(1, ge=0, le=1000, description="eta: how many versions a trained sample may lag")
    seed: int = 0
    shuffle: bool = Field(True, description="shuffle rows each epoch (seeded); false keeps the dataset order")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    timeout_s: float = Field(60.0, gt=0, le=86400)
    trained_roles: str = Field(
        ".*", description="regex (full match) of agent roles whose calls are trained; alias: trained_agents"
    )
    # "replay": trained only from groups the store re-publishes; the gateway publishes no tasks.
    mode: Literal["train", "eval", "replay"] = "train"

    @model_validator(mode="before")
    @classmethod
    def _trained_agents_alias(cls, data: Any) -> Any:
        # `trained_agents: "write|rewrite"` is what users write; it is stored as trained_roles.
        if isinstance(data, dict) and "trained_agents" in data:
            data = dict(data)
            agents = data.pop("trained_agents")
            if "trained_roles" in data and data["trained_roles"] != agents:
                raise ValueError("trained_agents and trained_roles are the same setting: give one of them")
            data["trained_roles"] = agents
        return data

    @field_validator("trained_roles")
    @classmethod
    def _regex_compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"trained_roles is not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _has_data(self) -> Self:
        if self.algorithm == "sft" and self.mode != "train":
            raise ValueError(f"an sft run trains on its own data: mode {self.mode!r} does not apply")
        if self.algorithm == "sft" and self.training.kl_coef > 0:
            raise ValueError("kl_coef is a GRPO setting: an sft run has no KL term")
        if self.sft.min_reward is not None and self.sft.from_run is None:
            raise ValueError("sft.min_reward filters sft.from_run's trajectories: give sft.from_run")
        if self.init_from is not None and self.init_from == self.run_id:
            raise ValueError("init_from must name another run")
        if self.sft.from_run is not None:
            if self.algorithm != "sft":
                raise ValueError("sft.from_run is an `algorithm: sft` setting")
            if self.dataset or self.dataset_name:
                raise ValueError("an sft run trains on dataset rows or on sft.from_run's trajectories, not both")
            if self.sft.from_run == self.run_id:
                raise ValueError("sft.from_run must name another run")
            return self
        if not self.dataset and not self.dataset_name:
            raise ValueError("a run needs dataset rows inline (`dataset`) or a stored dataset (`dataset_name`)")
        if self.algorithm == "sft":
            for i, row in enumerate(self.dataset):
                reason = check_conversation(row)
                if reason is not None:
                    raise ValueError(f"dataset[{i}] is not an sft conversation: {reason}")
        return self

    @property
    def asks_rollouts(self) -> bool:
        """Whether the gateway's pacer asks for training rollouts (evaluations are asked for any run)."""
        return self.mode == "train" and self.algorithm == "grpo"

    @property
    def data_epochs(self) -> int:
        """Passes over `rows`: a replay run's rows are the replayed groups, each consumed once."""
        return 1 if self.mode == "replay" else self.training.epochs

    def total_steps(self, rows: int) -> int:
        """Optimizer steps the run takes: every group of every epoch, in batches (last one partial dropped)."""
        steps = max(1, (rows * self.data_epochs) // self.training.batch_size)
        return min(steps, self.training.max_steps) if self.training.max_steps else steps


RunState = Literal["running", "paused", "cancelled", "finished", "failed"]
# A run in one of these states never runs again: its bus objects are cleaned up after it.
RUN_ENDED: tuple[RunState, ...] = ("cancelled", "finished", "failed")
# A run whose trainer consumes its groups.
RUN_ACTIVE: tuple[RunState, ...] = tuple(s for s in get_args(RunState) if s not in RUN_ENDED)


class PaceCursor(BaseModel):
    """How far the gateway got publishing a run's rollout requests (stored so a restart resumes)."""

    model_config = ConfigDict(extra="forbid")
    epoch: int = 0
    row: int = 0
    groups_published: int = 0
    done: bool = False
    next_eval: int = 0  # with eval_every: the next policy version to evaluate
    last_eval: int = -1  # the last version a periodic evaluation was published for


class RunView(BaseModel):
    """A run as the store knows it, plus the trainer's progress where the caller merged it in."""

    run_id: str
    project: str = "default"  # shared.apikeys.DEFAULT_PROJECT: the tenant whose keys see the run
    config: RunConfig
    state: RunState
    created_at: float
    updated_at: float
    cursor: PaceCursor
    rows: int
    total_steps: int
    step: int = 0
    version: int = 0
    groups_consumed: int = 0
    reward_mean: float | None = None
    error: str | None = None


class PolicyVersion(Message):
    """The latest weights of a run (KV `relayrl-policy`, key `<run>`): trainer -> inference."""

    run_id: str
    version: int = Field(ge=0)
    object: str
    sha256: str
    size: int = Field(ge=0)
    format: Literal["safetensors"] = "safetensors"
    step: int = Field(ge=0)
    created_at: float = Field(default_factory=time.time)
    # shared.weights.sign_weights: HMAC over (run_id, version, sha256) with the trainers' and
    # replicas' key. Optional so entries written before signing still decode; replicas refuse
    # them as unsigned. Rolling upgrade: inference replicas before trainers.
    signature: str | None = Field(None, max_length=128)


class TrainerProgress(Message):
    """The trainer's progress (KV `relayrl-policy`, key `<run>.progress`): read by gateway pacing."""

    run_id: str
    step: int = Field(ge=0)
    version: int = Field(ge=0)
    groups_consumed: int = Field(0, ge=0, description="groups taken off GROUPS: trained + dropped")
    groups_trained: int = Field(0, ge=0)
    groups_dropped: int = Field(0, ge=0)
    total_steps: int | None = None
    finished: bool = False
    trainer_id: str = ""
    at: float = Field(default_factory=time.time)


class StepMetrics(Message):
    """One optimizer step (METRICS `relayrl.metrics.<run>`): trainer -> store, gateway."""

    run_id: str
    step: int = Field(ge=1)
    version: int = Field(ge=0, description="policy version after this step")
    group_ids: list[str] = Field(description="groups trained by this step, in the order consumed")
    dropped: dict[str, str] = Field(default_factory=dict, description="group id -> why it was dropped")
    values: dict[str, float] = Field(default_factory=dict)
    staleness: dict[int, int] = Field(default_factory=dict, description="versions behind -> trained samples")
    trainer_id: str = ""
    at: float = Field(default_factory=time.time)

    @field_serializer("staleness")
    def _text_keys(self, staleness: dict[int, int]) -> dict[str, int]:
        # decode() accepts only text map keys (msgpack strict_map_key); validation makes them ints again.
        return {str(k): v for k, v in staleness.items()}


# --- store request/reply: runs ---------------------------------------------------------


class PutRun(Message):
    config: RunConfig
    rows: int
    project: str = "default"  # shared.apikeys.DEFAULT_PROJECT


class SetRunState(Message):
    run_id: str
    state: RunState
    error: str | None = None
    # Only a state change from one of these applies (e.g. resume only a paused run).
    from_states: list[RunState] = Field(default_factory=list)


class SaveCursor(Message):
    run_id: str
    cursor: PaceCursor


class ListRuns(Message):
    states: list[RunState] = Field(default_factory=list)
    limit: int = Field(100, ge=1, le=10000)
    # Keyset page: only runs listed after this (created_at, run_id), from the previous page's `next`.
    after: tuple[float, str] | None = None
    project: str | None = None  # only this project's runs (None: every run, for internal callers)


class GetMetrics(Message):
    run_id: str
    after_step: int = 0
    limit: int = Field(10000, ge=1, le=100000)


class ReplayRequest(Message):
    """Re-publish a stored run's trained groups, in the order its trainer consumed them."""

    run_id: str
    into: str | None = Field(None, description="target run (default: the same run)")
    versions: tuple[int, int] | None = Field(None, description="only steps whose version is in [A, B]")
    min_reward: float | None = Field(None, description="only groups whose mean reward is at least this")


class GetEvals(Message):
    run_id: str
    accuracy_threshold: float = 1.0


class PutDataset(Message):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    rows: list[dict[str, Any]] = Field(min_length=1)
    project: str = "default"  # shared.apikeys.DEFAULT_PROJECT


# --- request/reply failures ------------------------------------------------------------


class Failure(Message):
    """What a request/reply server answers instead of its reply type when it could not do what
    was asked (sent with the `Relayrl-Failure` header, see `Bus.serve`).

    `code` is HTTP-like: 4xx the request is wrong and will stay wrong (bad data, missing object,
    conflicting state); 503 with `transient` the server or its database is unavailable right
    now and the same request may succeed later; 500 a server bug."""

    code: int
    error: str
    transient: bool = False
