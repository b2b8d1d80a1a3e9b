"""The store's request/reply API, typed: every RPC names its request and reply model, one
registry (`RPCS`) lists them, and one client (`StoreClient`) calls them.

Wire: core NATS request/reply on `relayrl.rpc.store.<method>` (queue group `store`, so store
replicas share the load), MessagePack bodies. The store answers with the RPC's reply model,
or with a `shared.messages.Failure` marked by a header (see `Bus.serve`). Producer of every
request: the gateway (HTTP routes, run pacing) and the trainer; consumer: the store
(`services/store/service.py`, which registers one handler per entry of `RPCS`).

Errors reach callers by type (`shared.faults`): `StoreUnavailable` when no store answers in
time or its database is unavailable (transient: wait and retry, change nothing durable),
`NotFound` for a missing object, `Rejected(reason, code)` for a request that will stay wrong
(bad data, a conflicting state). Every reply fits one NATS message: lists that could outgrow
it (runs, dataset rows, metrics) come in pages, and the client follows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Iterable, Self, Sequence, TypeVar

import msgpack
import nats.errors
from pydantic import BaseModel, Field, model_validator

from shared import subjects
from shared.apikeys import DEFAULT_PROJECT, KEY_ID_PATTERN, PROJECT_PATTERN, Scope
from shared.bus import Bus
from shared.faults import NotFound, Rejected, StoreError, StoreUnavailable
from shared.messages import (
    DecodeError,
    EvalSummary,
    Failure,
    GetById,
    GetEvals,
    GetGroupMembers,
    GetMetrics,
    GroupMembers,
    ListRuns,
    Message,
    PaceCursor,
    Ping,
    PutDataset,
    PutRun,
    PutTasks,
    ReplayRequest,
    RunConfig,
    RunState,
    RunView,
    SaveCursor,
    SetRunState,
    StepMetrics,
    TaskSpec,
    TaskView,
    Trajectory,
)

# Room left in a message for everything but its list (field names, envelope, headers).
PAYLOAD_HEADROOM = 64 * 1024


# --- requests not shared with other wire traffic ----------------------------------------


class GetDataset(Message):
    """Gateway pacer / routes -> store: rows of a named dataset from `offset` on (one page)."""

    name: str
    offset: int = Field(0, ge=0)
    project: str | None = None  # set for a user's request: another project's dataset is not found


class GetRunTrajectories(Message):
    """Trainer (sft from a past run), gateway (its size) -> store: a run's ok training
    trajectories (evaluations left out) with reward >= `min_reward`, in rollout-id order after
    `after`, as many as fit one reply and at most `limit` (0: only the count). The count comes
    with the first page only (`after` None)."""

    run_id: str
    min_reward: float | None = None
    finished_before: float | None = Field(None, description="only trajectories finished before this time")
    after: str | None = None
    limit: int = Field(1000, ge=0)


class CreateKey(Message):
    """Gateway -> store: keep a new API key. The gateway made the secret and sends only its
    hash (`shared.apikeys`). The same key id with the same hash again returns the stored key
    (how the bootstrap key is installed at every gateway start); another hash is 409."""

    key_id: str = Field(pattern=KEY_ID_PATTERN)
    secret_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    project: str = Field(pattern=PROJECT_PATTERN)
    scope: Scope
    name: str = Field("", max_length=128)


class VerifyKey(Message):
    """Gateway -> store: the key with this id and secret hash, if it exists and is not revoked
    (else 401 with the reason)."""

    key_id: str
    secret_hash: str


class ListKeys(Message):
    """Gateway -> store: the keys of a project, revoked ones included, oldest first."""

    project: str


class RevokeKey(Message):
    """Gateway -> store: revoke a key (idempotent); with `project`, only a key of that project
    (another project's key is not found)."""

    key_id: str
    project: str | None = None


# --- replies -----------------------------------------------------------------------------


class Stored(Message):
    """Store -> writer: how many items the write applied. Writes are idempotent upserts, so a
    repeated request stores 0 (put_tasks), and save_cursor stores 0 when a further cursor was
    already there (a cursor never moves back)."""

    stored: int = Field(ge=0)


class Pong(Message):
    """Store -> readiness check: the store process and its database both answered."""


class TaskFound(Message):
    """Store -> gateway: a task with its progress and a summary of each rollout."""

    task: TaskView


class RolloutFound(Message):
    """Store -> gateway: one stored trajectory, transitions included."""

    trajectory: Trajectory


class RunFound(Message):
    """Store -> gateway, trainer: one run with its whole config (inline dataset rows included:
    they came in one PutRun message, so they fit in one reply)."""

    run: RunView


class ListedConfig(RunConfig):
    """A RunConfig as `list_runs` carries it: inline `dataset` and `eval_dataset` rows are left
    out so a listing of many runs stays small; `get_run` has them (`rows_omitted`)."""

    rows_omitted: bool = True

    @model_validator(mode="after")
    def _has_data(self) -> Self:  # overrides RunConfig's check: the rows were left out on purpose
        return self


class ListedRun(RunView):
    """A run as listed: the view without inline rows (`config.rows_omitted`)."""

    config: ListedConfig

    @classmethod
    def of(cls, run: RunView) -> ListedRun:
        config = ListedConfig.model_validate({**run.config.model_dump(), "dataset": [], "eval_dataset": []})
        return cls.model_validate({**run.model_dump(exclude={"config"}), "config": config})


class RunPage(Message):
    """Store -> gateway, trainer: runs newest first. `next` is set when the page was cut to fit
    one message before `limit`: ask again with `after=next` for the rest."""

    runs: list[ListedRun]
    next: tuple[float, str] | None = None


class DatasetPage(Message):
    """Store -> gateway: dataset rows `offset`.. in stored order; `next_offset` is set while rows remain."""

    rows: list[dict[str, Any]]
    total: int = Field(ge=0)
    next_offset: int | None = None


class MetricsPage(Message):
    """Store -> gateway: steps after `after_step`, oldest first; `more` when the page was cut to
    fit one message (ask again from the last step returned)."""

    metrics: list[StepMetrics]
    more: bool = False


class TrajectoryPage(Message):
    """Store -> caller of get_run_trajectories: one page, `total` matching in all, `next` (the
    `after` of the next page) while more remain."""

    trajectories: list[Trajectory]
    total: int | None = Field(None, ge=0, description="set on the first page")
    next: str | None = None


class Evals(Message):
    """Store -> gateway: a run's evaluation rollouts aggregated per policy version."""

    evals: list[EvalSummary]


class KeyInfo(BaseModel):
    """An API key as the store and the gateway show it: never its secret nor its hash."""

    key_id: str
    project: str
    scope: Scope
    name: str
    created_at: float
    revoked_at: float | None = None


class KeyFound(Message):
    """Store -> gateway: one key."""

    key: KeyInfo


class KeyList(Message):
    """Store -> gateway: a project's keys."""

    keys: list[KeyInfo]


# --- the registry ------------------------------------------------------------------------

Req = TypeVar("Req", bound=Message)
Rep = TypeVar("Rep", bound=Message)


@dataclass(frozen=True)
class Rpc(Generic[Req, Rep]):
    """One store method: its request model and its reply model."""

    method: str
    request: type[Req]
    reply: type[Rep]

    @property
    def subject(self) -> str:
        return subjects.store_rpc(self.method)


PUT_TASKS = Rpc("put_tasks", PutTasks, Stored)
GET_TASK = Rpc("get_task", GetById, TaskFound)
GET_ROLLOUT = Rpc("get_rollout", GetById, RolloutFound)
PING = Rpc("ping", Ping, Pong)
PUT_RUN = Rpc("put_run", PutRun, RunFound)
GET_RUN = Rpc("get_run", GetById, RunFound)
LIST_RUNS = Rpc("list_runs", ListRuns, RunPage)
SET_RUN_STATE = Rpc("set_run_state", SetRunState, RunFound)
SAVE_CURSOR = Rpc("save_cursor", SaveCursor, Stored)
PUT_DATASET = Rpc("put_dataset", PutDataset, Stored)
GET_DATASET = Rpc("get_dataset", GetDataset, DatasetPage)
GET_METRICS = Rpc("get_metrics", GetMetrics, MetricsPage)
GET_EVALS = Rpc("get_evals", GetEvals, Evals)
REPLAY = Rpc("replay", ReplayRequest, Stored)
GET_GROUP_MEMBERS = Rpc("get_group_members", GetGroupMembers, GroupMembers)
GET_RUN_TRAJECTORIES = Rpc("get_run_trajectories", GetRunTrajectories, TrajectoryPage)
CREATE_KEY = Rpc("create_key", CreateKey, KeyFound)
VERIFY_KEY = Rpc("verify_key", VerifyKey, KeyFound)
LIST_KEYS = Rpc("list_keys", ListKeys, KeyList)
REVOKE_KEY = Rpc("revoke_key", RevokeKey, KeyFound)

# Every store RPC; the store serves exactly these (a handler `rpc_<method>` each).
RPCS: tuple[Rpc[Any, Any], ...] = (
    PUT_TASKS, GET_TASK, GET_ROLLOUT, PING, PUT_RUN, GET_RUN, LIST_RUNS, SET_RUN_STATE,
    SAVE_CURSOR, PUT_DATASET, GET_DATASET, GET_METRICS, GET_EVALS, REPLAY, GET_GROUP_MEMBERS,
    GET_RUN_TRAJECTORIES, CREATE_KEY, VERIFY_KEY, LIST_KEYS, REVOKE_KEY,
)  # fmt: skip


def packed_size(item: Any) -> int:
    """Bytes `item` (a model or plain data) takes in a MessagePack message."""
    data = item.model_dump() if hasattr(item, "model_dump") else item
    return len(msgpack.packb(data, use_bin_type=True))


def fault(method: str, failure: Failure) -> StoreError:
    """The typed error for a Failure the store answered."""
    reason = f"store {method}: {failure.error}"
    if failure.transient or failure.code in (502, 503, 504):
        return StoreUnavailable(reason)
    if failure.code == 404:
        return NotFound(failure.error)
    if 400 <= failure.code < 500:
        return Rejected(failure.error, failure.code)
    return StoreError(reason)


# --- the client --------------------------------------------------------------------------


class StoreClient:
    """Every read and write another service makes to the store's SQL goes through here."""

    def __init__(self, bus: Bus, timeout_s: float) -> None:
        self.bus = bus
        self.timeout_s = timeout_s

    async def call(self, rpc: Rpc[Req, Rep], req: Req, timeout_s: float | None = None) -> Rep:
        """One request; the reply, or the typed error (see the module docstring)."""
        try:
            reply = await self.bus.request(rpc.subject, req, rpc.reply, timeout=timeout_s or self.timeout_s)
        except TimeoutError as exc:
            raise StoreUnavailable(f"store {rpc.method}: {exc}") from None
        except nats.errors.MaxPayloadError:
            raise Rejected(f"store {rpc.method}: request larger than the NATS max_payload", 413) from None
        except OverflowError:  # from MessagePack: the same request always fails the same way
            raise Rejected(f"store {rpc.method}: an integer in the request does not fit 64 bits", 422) from None
        except nats.errors.Error as exc:  # connection closed or reconnecting
            raise StoreUnavailable(f"store {rpc.method}: {type(exc).__name__}: {exc}") from None
        except DecodeError as exc:  # a store of another version: retrying does not help
            raise StoreError(f"store {rpc.method}: undecodable reply: {exc}") from None
        if isinstance(reply, Failure):
            raise fault(rpc.method, reply)
        return reply

    @property
    def payload_budget(self) -> int:
        return max(self.bus.nc.max_payload - PAYLOAD_HEADROOM, 1)

    # --- tasks and rollouts ---

    async def put_tasks(self, specs: Sequence[TaskSpec], project: str | None = None) -> int:
        """Store tasks (idempotent by task id), in as many messages as max_payload needs;
        returns how many were new. With `project`, their runs must be that project's."""
        stored = 0
        for chunk in _chunks_under(specs, self.payload_budget):
            stored += (await self.call(PUT_TASKS, PutTasks(tasks=chunk, project=project))).stored
        return stored

    async def get_task(self, task_id: str, project: str | None = None) -> TaskView:
        return (await self.call(GET_TASK, GetById(id=task_id, project=project))).task

    async def get_rollout(self, rollout_id: str, project: str | None = None) -> Trajectory:
        return (await self.call(GET_ROLLOUT, GetById(id=rollout_id, project=project))).trajectory

    async def ping(self) -> None:
        """Returns when the store and its database answer; StoreUnavailable otherwise."""
        await self.call(PING, Ping())

    # --- runs ---

    async def put_run(self, config: RunConfig, rows: int, project: str = DEFAULT_PROJECT) -> RunView:
        """Create the run in `project`; a run id another project holds is refused (409)."""
        return (await self.call(PUT_RUN, PutRun(config=config, rows=rows, project=project))).run

    async def get_run(self, run_id: str, project: str | None = None) -> RunView:
        """The run with its whole config, inline rows included; NotFound for another project's."""
        return (await self.call(GET_RUN, GetById(id=run_id, project=project))).run

    async def list_runs(
        self, states: Iterable[RunState] = (), limit: int = 100, project: str | None = None
    ) -> list[ListedRun]:
        """Up to `limit` runs (of `project`, when given), newest first, without inline rows, following pages."""
        states = list(states)
        runs: list[ListedRun] = []
        after: tuple[float, str] | None = None
        while len(runs) < limit:
            req = ListRuns(states=states, limit=limit - len(runs), after=after, project=project)
            page = await self.call(LIST_RUNS, req)
            runs.extend(page.runs)
            if page.next is None or not page.runs:
                break
            after = page.next
        return runs

    async def set_run_state(
        self, run_id: str, state: RunState, from_states: Sequence[RunState] = (), error: str | None = None
    ) -> RunView:
        """Compare-and-set: Rejected(409) unless the run is in one of `from_states` (any when empty)."""
        req = SetRunState(run_id=run_id, state=state, error=error, from_states=list(from_states))
        return (await self.call(SET_RUN_STATE, req)).run

    async def save_cursor(self, run_id: str, cursor: PaceCursor) -> bool:
        """Whether the cursor was stored (False: a further one already was)."""
        return bool((await self.call(SAVE_CURSOR, SaveCursor(run_id=run_id, cursor=cursor))).stored)

    # --- datasets, metrics, evaluations, replay ---

    async def put_dataset(self, name: str, rows: list[dict[str, Any]], project: str = DEFAULT_PROJECT) -> int:
        return (await self.call(PUT_DATASET, PutDataset(name=name, rows=rows, project=project))).stored

    async def get_dataset(self, name: str, project: str | None = None) -> list[dict[str, Any]]:
        """Every row of a named dataset (NotFound for another project's), following pages."""
        rows: list[dict[str, Any]] = []
        offset: int | None = 0
        while offset is not None:
            page = await self.call(GET_DATASET, GetDataset(name=name, offset=offset, project=project))
            rows.extend(page.rows)
            offset = page.next_offset if page.rows else None
        return rows

    async def get_metrics(self, run_id: str, after_step: int = 0, limit: int = 10000) -> list[StepMetrics]:
        """Up to `limit` steps after `after_step`, oldest first, following pages."""
        metrics: list[StepMetrics] = []
        while len(metrics) < limit:
            page = await self.call(GET_METRICS, GetMetrics(run_id=run_id, after_step=after_step, limit=limit - len(metrics)))
            metrics.extend(page.metrics)
            if not page.more or not page.metrics:
                break
            after_step = page.metrics[-1].step
        return metrics

    async def get_evals(self, run_id: str, accuracy_threshold: float = 1.0) -> list[EvalSummary]:
        return (await self.call(GET_EVALS, GetEvals(run_id=run_id, accuracy_threshold=accuracy_threshold))).evals

    async def replay(
        self,
        run_id: str,
        into: str | None = None,
        versions: tuple[int, int] | None = None,
        min_reward: float | None = None,
        timeout_s: float | None = None,
    ) -> int:
        """Re-publish a run's trained groups; how many the stream took as new."""
        req = ReplayRequest(run_id=run_id, into=into, versions=versions, min_reward=min_reward)
        return (await self.call(REPLAY, req, timeout_s=timeout_s)).stored


    # --- API keys ---

    async def create_key(self, key_id: str, secret_hash: str, project: str, scope: Scope, name: str = "") -> KeyInfo:
        req = CreateKey(key_id=key_id, secret_hash=secret_hash, project=project, scope=scope, name=name)
        return (await self.call(CREATE_KEY, req)).key

    async def verify_key(self, key_id: str, secret_hash: str) -> KeyInfo:
        """The live key; Rejected(401) with the reason when it is unknown, wrong or revoked."""
        return (await self.call(VERIFY_KEY, VerifyKey(key_id=key_id, secret_hash=secret_hash))).key

    async def list_keys(self, project: str) -> list[KeyInfo]:
        return (await self.call(LIST_KEYS, ListKeys(project=project))).keys

    async def revoke_key(self, key_id: str, project: str | None = None) -> KeyInfo:
        return (await self.call(REVOKE_KEY, RevokeKey(key_id=key_id, project=project))).key

    async def count_run_trajectories(self, run_id: str, min_reward: float | None = None) -> int:
        """How many ok training trajectories of `run_id` have reward >= `min_reward`."""
        req = GetRunTrajectories(run_id=run_id, min_reward=min_reward, limit=0)
        return (await self.call(GET_RUN_TRAJECTORIES, req)).total or 0

    async def get_run_trajectories(
        self, run_id: str, min_reward: float | None = None, finished_before: float | None = None
    ) -> list[Trajectory]:
        """Every ok training trajectory of `run_id` with reward >= `min_reward` (finished
        before `finished_before`), in rollout-id order (stable across calls), following pages."""
        out: list[Trajectory] = []
        after: str | None = None
        while True:
            req = GetRunTrajectories(run_id=run_id, min_reward=min_reward, finished_before=finished_before, after=after)
            page = await self.call(GET_RUN_TRAJECTORIES, req)
            out.extend(page.trajectories)
            if page.next is None or not page.trajectories:
                return out
            after = page.next

    async def get_group_members(self, group_id: str) -> list[Trajectory]:
        """Every stored member of a group in sample order, following pages (a group published
        by reference, `GroupRef`, is too big for one message)."""
        members: list[Trajectory] = []
        after_index = -1
        while True:
            page = await self.call(GET_GROUP_MEMBERS, GetGroupMembers(group_id=group_id, after_index=after_index))
            members.extend(page.trajectories)
            if not page.more or not page.trajectories:
                return members
            after_index = page.trajectories[-1].sample_index


def _chunks_under(specs: Sequence[TaskSpec], budget: int) -> Iterable[list[TaskSpec]]:
    """Consecutive runs of `specs` whose packed size stays under `budget` bytes each."""
    chunk: list[TaskSpec] = []
    size = 0
    for spec in specs:
        n = packed_size(spec)
        if n > budget:
            raise Rejected(f"task {spec.task_id!r} is {n} bytes packed; one message holds at most {budget}", 413)
        if chunk and size + n > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(spec)
        size += n
    if chunk:
        yield chunk
