"""Training runs: create, inspect, follow metrics, pause / resume / cancel, replay; datasets."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field

from shared.bus import Bus
from shared.messages import (
    EvalSummary,
    GetById,
    GetEvals,
    GetMetrics,
    ListRuns,
    PutDataset,
    PutRun,
    ReplayRequest,
    RunConfig,
    RunState,
    RunView,
    SetRunState,
    StepMetrics,
)
from services.gateway.deps import AgentCatalog, StoreClient, get_agents, get_bus, get_settings, get_store
from services.gateway.evals import eval_tasks
from services.gateway.pacing import purge_tasks, read_progress
from services.gateway.schemas import ErrorOut
from services.gateway.settings import GatewaySettings
from services.gateway.submit import submit

router = APIRouter(prefix="/v1", tags=["runs"])
ERRORS = {400: {"model": ErrorOut}, 404: {"model": ErrorOut}, 409: {"model": ErrorOut}, 503: {"model": ErrorOut}}


class DatasetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    rows: list[dict] = Field(min_length=1)


class DatasetOut(BaseModel):
    name: str
    rows: int


class ReplayIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    into: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    versions: tuple[int, int] | None = None
    min_reward: float | None = None


class ReplayOut(BaseModel):
    run_id: str
    into: str
    groups: int


@router.post("/datasets", status_code=status.HTTP_201_CREATED, responses=ERRORS)
async def put_dataset(body: DatasetIn, store: StoreClient = Depends(get_store)) -> DatasetOut:
    """Store dataset rows under a name; runs refer to it with `dataset_name`."""
    reply = await store.call("put_dataset", PutDataset(name=body.name, rows=body.rows))
    return DatasetOut(name=body.name, rows=reply.stored or 0)


@router.post("/runs", status_code=status.HTTP_201_CREATED, responses=ERRORS)
async def create_run(
    config: RunConfig,
    request: Request,
    store: StoreClient = Depends(get_store),
    agents: AgentCatalog = Depends(get_agents),
) -> RunView:
    """Create a training run. The gateway then publishes its rollout requests, paced by `max_staleness`.

    Creating the same run again with the same config returns it; another config under an
    existing `run_id` is refused with 409.
    """
    await agents.require({config.agent})
    rows = len(config.dataset) if config.dataset else await _dataset_size(store, config.dataset_name or "")
    reply = await store.call("put_run", PutRun(config=config, rows=rows))
    request.app.state.pacer.wake.set()
    assert reply.run is not None
    return reply.run


@router.get("/runs", responses=ERRORS)
async def list_runs(
    state: list[RunState] = Query(default_factory=list),
    limit: int = Query(100, ge=1, le=10000),
    store: StoreClient = Depends(get_store),
) -> list[RunView]:
    """Runs, newest first; `?state=running&state=paused` filters."""
    reply = await store.call("list_runs", ListRuns(states=state, limit=limit))
    return reply.runs or []


@router.get("/runs/{run_id}", responses=ERRORS)
async def get_run(run_id: str, store: StoreClient = Depends(get_store), bus: Bus = Depends(get_bus)) -> RunView:
    """A run: state, pacing cursor, and the trainer's live step, version and groups consumed."""
    return await _run_with_progress(run_id, store, bus)


@router.get("/runs/{run_id}/metrics", responses=ERRORS)
async def get_metrics(
    run_id: str,
    after_step: int = Query(0, ge=0),
    limit: int = Query(10000, ge=1, le=100000),
    store: StoreClient = Depends(get_store),
) -> list[StepMetrics]:
    """Per-step training metrics (reward, loss, clip fraction, KL, entropy, staleness, ...)."""
    await _require_run(run_id, store)
    reply = await store.call("get_metrics", GetMetrics(run_id=run_id, after_step=after_step, limit=limit))
    return reply.metrics or []


@router.post("/runs/{run_id}/replay", status_code=status.HTTP_202_ACCEPTED, responses=ERRORS)
async def replay(
    run_id: str,
    body: ReplayIn,
    store: StoreClient = Depends(get_store),
    settings: GatewaySettings = Depends(get_settings),
) -> ReplayOut:
    """Re-publish a run's trained groups, in the order its trainer consumed them, to a trainer.

    With `into`, a new run in `replay` mode is created from the source config (no rollouts are
    published for it); a trainer started for it trains on exactly the stored groups.
    """
    source = await _require_run(run_id, store)
    into = body.into or run_id
    if into != run_id:
        config = source.config.model_copy(update={"run_id": into, "mode": "replay"})
        await store.call("put_run", PutRun(config=config, rows=source.rows))
    # The store answers after the last group is published: allow for long runs (~500 groups/s).
    reply = await store.call(
        "replay",
        ReplayRequest(run_id=run_id, into=into, versions=body.versions, min_reward=body.min_reward),
        timeout_s=settings.replay_timeout_s,
    )
    return ReplayOut(run_id=run_id, into=into, groups=reply.stored or 0)


class EvalIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: list[dict[str, Any]] | None = Field(None, min_length=1, description="default: the run's eval_dataset")
    version: int | None = Field(
        None, ge=0, description="policy version to evaluate: the trainer's current one (the default). "
        "Inference serves only the latest weights, so another version is refused (409)."
    )


class EvalOut(BaseModel):
    run_id: str
    version: int
    tasks: list[str]


@router.post("/runs/{run_id}/evals", status_code=status.HTTP_202_ACCEPTED, responses=ERRORS)
async def start_eval(
    run_id: str,
    body: EvalIn,
    store: StoreClient = Depends(get_store),
    bus: Bus = Depends(get_bus),
    agents: AgentCatalog = Depends(get_agents),
) -> EvalOut:
    """Evaluate rows greedily (temperature 0) at one policy version. Results are aggregated per
    version by `GET /v1/runs/{id}/evals`; evaluation rollouts are never trained on."""
    run = await _run_with_progress(run_id, store, bus)
    if run.state not in ("running", "paused"):
        # Inference follows the live run: a finished run's weights may no longer be what it serves.
        raise HTTPException(409, f"run {run_id} is {run.state}: evaluate a running or paused run "
                                 "(eval_every evaluates a run's final version when it finishes)")  # fmt: skip
    rows = body.rows or run.config.eval_dataset
    if not rows:
        raise HTTPException(400, "no rows to evaluate: send `rows` or create the run with `eval_dataset`")
    version = run.version if body.version is None else body.version
    if version != run.version:
        raise HTTPException(
            409, f"version {version} is not served: inference serves the trainer's latest weights, now "
            f"version {run.version}; evaluate that one",
        )
    await agents.require({run.config.agent})
    specs = eval_tasks(run.config, rows, version)
    await submit(bus, store, specs, min_version=version)
    return EvalOut(run_id=run_id, version=version, tasks=[s.task_id for s in specs])


@router.get("/runs/{run_id}/evals", responses=ERRORS)
async def get_evals(
    run_id: str,
    accuracy_threshold: float = Query(1.0, description="a rollout counts as correct with reward >= this"),
    store: StoreClient = Depends(get_store),
) -> list[EvalSummary]:
    """Evaluation results per policy version: rollouts, mean reward, accuracy."""
    await _require_run(run_id, store)
    reply = await store.call("get_evals", GetEvals(run_id=run_id, accuracy_threshold=accuracy_threshold))
    return reply.evals or []


_TRANSITIONS: dict[str, tuple[RunState, list[RunState]]] = {
    "pause": ("paused", ["running"]),
    "resume": ("running", ["paused"]),
    "cancel": ("cancelled", ["running", "paused"]),
}


@router.post("/runs/{run_id}/{action}", responses=ERRORS)
async def change_state(
    run_id: str,
    action: Literal["pause", "resume", "cancel"],
    request: Request,
    store: StoreClient = Depends(get_store),
    bus: Bus = Depends(get_bus),
) -> RunView:
    """`pause` stops publishing new requests (in-flight work finishes and is trained);
    `resume` continues; `cancel` ends the run and drops its queued requests."""
    target, from_states = _TRANSITIONS[action]
    await store.call("set_run_state", SetRunState(run_id=run_id, state=target, from_states=from_states))
    if action == "cancel":
        await purge_tasks(bus, run_id, evals=True)
    request.app.state.pacer.wake.set()
    return await _run_with_progress(run_id, store, bus)


async def _dataset_size(store: StoreClient, name: str) -> int:
    try:
        reply = await store.call("get_dataset", GetById(id=name))
    except HTTPException as exc:
        if exc.status_code == 404:
            raise HTTPException(400, f"unknown dataset {name!r}; store it first with POST /v1/datasets") from None
        raise
    return len(reply.rows or [])


async def _require_run(run_id: str, store: StoreClient) -> RunView:
    reply = await store.call("get_run", GetById(id=run_id))
    assert reply.run is not None
    return reply.run


async def _run_with_progress(run_id: str, store: StoreClient, bus: Bus) -> RunView:
    run = await _require_run(run_id, store)
    progress = await read_progress(bus, run_id)
    if progress is not None and progress.step >= run.step:
        run = run.model_copy(
            update={"step": progress.step, "version": progress.version, "groups_consumed": progress.groups_consumed}
        )
    return run
