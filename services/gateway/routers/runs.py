"""Training runs: create, inspect, follow metrics, pause / resume / cancel, replay; datasets."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import nats.errors

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from shared.bus import Bus
from shared.faults import NotFound, Rejected
from shared.messages import RUN_ACTIVE, EvalSummary, RunConfig, RunState, RunView, StepMetrics
from shared.store_api import ListedRun, StoreClient
from shared.weights import WeightsError, WeightsNotFound, read_version
from services.gateway.agents import AgentCatalog
from services.gateway.deps import CurrentKey, authorize, get_agents, get_bus, get_settings, get_store
from services.gateway.evals import eval_tasks
from services.gateway.ids import is_other_adhoc_run
from services.gateway.pacing import purge_tasks, read_progress
from services.gateway.schemas import AUTH_ERRORS, ErrorOut
from services.gateway.settings import GatewaySettings
from services.gateway.submit import submit
from shared import subjects

# Every route is its key's project's: another project's run is 404, as if it did not exist.
router = APIRouter(prefix="/v1", tags=["runs"], dependencies=[Depends(authorize)])
ERRORS = {400: {"model": ErrorOut}, 404: {"model": ErrorOut}, 409: {"model": ErrorOut}, 413: {"model": ErrorOut},
          503: {"model": ErrorOut}, **AUTH_ERRORS}  # fmt: skip


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
async def put_dataset(
    body: DatasetIn, key: CurrentKey, store: StoreClient = Depends(get_store), settings: GatewaySettings = Depends(get_settings)
) -> DatasetOut:
    """Store dataset rows under a name; runs refer to it with `dataset_name`. Names are global:
    one another project holds is refused (409)."""
    _check_dataset(body.rows, "dataset", settings)
    size = _json_bytes(body.rows)
    if size > settings.max_dataset_bytes:
        raise HTTPException(413, f"dataset rows are {size} bytes as JSON; the limit is {settings.max_dataset_bytes}")
    return DatasetOut(name=body.name, rows=await store.put_dataset(body.name, body.rows, key.project))


@router.post("/runs", status_code=status.HTTP_201_CREATED, responses=ERRORS)
async def create_run(
    config: RunConfig,
    request: Request,
    key: CurrentKey,
    store: StoreClient = Depends(get_store),
    agents: AgentCatalog = Depends(get_agents),
    bus: Bus = Depends(get_bus),
    settings: GatewaySettings = Depends(get_settings),
) -> RunView:
    """Create a training run. The gateway then publishes its rollout requests, paced by `max_staleness`.

    Creating the same run again with the same config returns it; another config under an
    existing `run_id` is refused with 409, and so is a `model` that no inference replica serves.
    Run ids are global: one another project holds is refused (409, without saying whose).
    A config, an inline dataset or a run's rollouts over the gateway's limits is 413.
    """
    if is_other_adhoc_run(config.run_id, key.project):
        raise HTTPException(422, f"run_id {config.run_id!r} is reserved for tasks submitted without a run: choose another")
    size = _json_bytes(config.model_dump(mode="json"))
    if size > settings.max_run_config_bytes:
        raise HTTPException(413, f"run config is {size} bytes as JSON; the limit is {settings.max_run_config_bytes} "
                                 "(store large datasets with POST /v1/datasets and name them)")  # fmt: skip
    _check_dataset(config.dataset, "dataset", settings)
    _check_dataset(config.eval_dataset, "eval_dataset", settings)
    await _require_served_model(bus, config.model)
    await agents.require({config.agent})
    await _require_init_source(store, config, key.project)
    if config.sft.from_run is not None:
        rows = await _sft_source_size(store, config, key.project)
    else:
        rows = len(config.dataset) if config.dataset else await _dataset_size(store, config.dataset_name or "", key.project)
    _check_run_rollouts(config, rows, settings)
    run = await store.put_run(config, rows, key.project)
    request.app.state.pacer.wake.set()
    return run


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str))


def _check_dataset(rows: list[dict[str, Any]], what: str, settings: GatewaySettings) -> None:
    if len(rows) > settings.max_dataset_rows:
        raise HTTPException(413, f"{what} has {len(rows)} rows; the limit is {settings.max_dataset_rows}")


def _check_run_rollouts(config: RunConfig, rows: int, settings: GatewaySettings) -> None:
    """Refuse (413) a training run that would request more rollouts than `max_rollouts_per_run`:
    its groups (rows x epochs, or what max_steps consumes plus the staleness window) x group_size.
    An sft or replay run requests none for training."""
    if config.mode != "train" or config.algorithm == "sft":
        return
    groups = rows * config.data_epochs
    if config.training.max_steps:
        groups = min(groups, (config.training.max_steps + config.max_staleness + 1) * config.training.batch_size)
    rollouts = groups * config.training.group_size
    if rollouts > settings.max_rollouts_per_run:
        raise HTTPException(
            413, f"the run would request {rollouts} rollouts (rows x epochs x group_size); the limit is "
            f"{settings.max_rollouts_per_run}: use fewer rows, epochs, max_steps or a smaller group_size",
        )


@router.get("/runs", responses=ERRORS)
async def list_runs(
    key: CurrentKey,
    state: list[RunState] = Query(default_factory=list),
    limit: int = Query(100, ge=1, le=10000),
    store: StoreClient = Depends(get_store),
) -> list[ListedRun]:
    """The key's project's runs, newest first; `?state=running&state=paused` filters. Inline
    dataset rows are left out (`config.rows_omitted`): `GET /v1/runs/{run_id}` has them."""
    return await store.list_runs(states=state, limit=limit, project=key.project)


@router.get("/runs/{run_id}", responses=ERRORS)
async def get_run(
    run_id: str, key: CurrentKey, store: StoreClient = Depends(get_store), bus: Bus = Depends(get_bus)
) -> RunView:
    """A run: state, pacing cursor, and the trainer's live step, version and groups consumed."""
    return await _run_with_progress(run_id, store, bus, key.project)


@router.get("/runs/{run_id}/metrics", responses=ERRORS)
async def get_metrics(
    run_id: str,
    key: CurrentKey,
    after_step: int = Query(0, ge=0),
    limit: int = Query(10000, ge=1, le=100000),
    store: StoreClient = Depends(get_store),
) -> list[StepMetrics]:
    """Per-step training metrics (reward, loss, clip fraction, KL, entropy, staleness, ...)."""
    await store.get_run(run_id, key.project)  # 404 for an unknown run (or another project's), not an empty list
    return await store.get_metrics(run_id, after_step, limit)


@router.post("/runs/{run_id}/replay", status_code=status.HTTP_202_ACCEPTED, responses=ERRORS)
async def replay(
    run_id: str,
    body: ReplayIn,
    key: CurrentKey,
    store: StoreClient = Depends(get_store),
    settings: GatewaySettings = Depends(get_settings),
) -> ReplayOut:
    """Re-publish a run's trained groups, in the order its trainer consumed them, to a trainer.

    With `into`, a new run in `replay` mode is created from the source config (no rollouts are
    published for it); a trainer started for it trains on exactly the stored groups.
    """
    source = await store.get_run(run_id, key.project)
    into = body.into or run_id
    if into != run_id:
        if is_other_adhoc_run(into, key.project):
            raise HTTPException(422, f"into {into!r} is reserved for tasks submitted without a run: choose another")
        config = source.config.model_copy(update={"run_id": into, "mode": "replay"})
        # In the key's project; a run id another project holds is refused (409) before any replay.
        await store.put_run(config, 0, key.project)  # its size is set by the store's replay job
    # The store records a durable replay job and answers with its group count; it publishes
    # the groups in the background and resumes after a restart.
    groups = await store.replay(
        run_id, into=into, versions=body.versions, min_reward=body.min_reward, timeout_s=settings.replay_timeout_s
    )
    return ReplayOut(run_id=run_id, into=into, groups=groups)


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
    key: CurrentKey,
    store: StoreClient = Depends(get_store),
    bus: Bus = Depends(get_bus),
    agents: AgentCatalog = Depends(get_agents),
) -> EvalOut:
    """Evaluate rows greedily (temperature 0) at one policy version. Results are aggregated per
    version by `GET /v1/runs/{id}/evals`; evaluation rollouts are never trained on."""
    run = await _run_with_progress(run_id, store, bus, key.project)
    if run.state not in RUN_ACTIVE:
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
    await submit(bus, store, specs, min_version=version, project=key.project)
    return EvalOut(run_id=run_id, version=version, tasks=[s.task_id for s in specs])


@router.get("/runs/{run_id}/evals", responses=ERRORS)
async def get_evals(
    run_id: str,
    key: CurrentKey,
    accuracy_threshold: float = Query(1.0, description="a rollout counts as correct with reward >= this"),
    store: StoreClient = Depends(get_store),
) -> list[EvalSummary]:
    """Evaluation results per policy version: rollouts, mean reward, accuracy."""
    await store.get_run(run_id, key.project)  # 404 for an unknown run, not an empty list
    return await store.get_evals(run_id, accuracy_threshold)


_TRANSITIONS: dict[str, tuple[RunState, list[RunState]]] = {
    "pause": ("paused", ["running"]),
    "resume": ("running", ["paused"]),
    "cancel": ("cancelled", list(RUN_ACTIVE)),
}


@router.post("/runs/{run_id}/{action}", responses=ERRORS)
async def change_state(
    run_id: str,
    action: Literal["pause", "resume", "cancel"],
    request: Request,
    key: CurrentKey,
    store: StoreClient = Depends(get_store),
    bus: Bus = Depends(get_bus),
) -> RunView:
    """`pause` stops publishing new requests (in-flight work finishes and is trained);
    `resume` continues; `cancel` ends the run and drops its queued requests."""
    target, from_states = _TRANSITIONS[action]
    await store.get_run(run_id, key.project)  # another project's run is 404 before anything changes
    await store.set_run_state(run_id, target, from_states=from_states)
    if action == "cancel":
        await purge_tasks(bus, run_id, evals=True)
    request.app.state.pacer.wake.set()
    return await _run_with_progress(run_id, store, bus, key.project)


async def _dataset_size(store: StoreClient, name: str, project: str) -> int:
    try:
        return len(await store.get_dataset(name, project))
    except NotFound:
        raise Rejected(f"unknown dataset {name!r}; store it first with POST /v1/datasets", 400) from None


async def _run_with_progress(run_id: str, store: StoreClient, bus: Bus, project: str) -> RunView:
    run = await store.get_run(run_id, project)
    progress = await read_progress(bus, run_id)
    if progress is not None and progress.step >= run.step:
        run = run.model_copy(
            update={"step": progress.step, "version": progress.version, "groups_consumed": progress.groups_consumed}
        )
    return run


async def _require_init_source(store: StoreClient, config: RunConfig, project: str) -> None:
    """`init_from` must name an existing run of the same model (its weights must fit) in the project."""
    if config.init_from is None:
        return
    try:
        source = await store.get_run(config.init_from, project)
    except NotFound:
        raise HTTPException(409, f"init_from: there is no run {config.init_from!r}") from None
    if source.config.model != config.model:
        raise HTTPException(
            409, f"init_from: run {config.init_from!r} trained model {source.config.model!r}, not {config.model!r}"
        )
    # Ended: its latest weights cannot move, so a resumed trainer starts its KL reference (and a
    # restarted fresh one its policy) from the same weights as the first attempt.
    if source.state in RUN_ACTIVE:
        raise HTTPException(409, f"init_from: run {config.init_from!r} is {source.state}; start from it once it ended")
    if source.state != "finished":
        raise HTTPException(409, f"init_from: run {config.init_from!r} {source.state}; start from a finished run")


async def _sft_source_size(store: StoreClient, config: RunConfig, project: str) -> int:
    """Trajectories an sft run on `sft.from_run` trains on; that run (in the project) must have
    ended (so the examples cannot change under a resumed trainer) and have some."""
    source_id = config.sft.from_run or ""
    try:
        source = await store.get_run(source_id, project)
    except NotFound:
        raise HTTPException(409, f"sft.from_run: there is no run {source_id!r}") from None
    if source.state in RUN_ACTIVE:
        raise HTTPException(409, f"sft.from_run: run {source_id!r} is {source.state}; fine-tune on it once it ended")
    if source.config.model != config.model:  # its token ids are another tokenizer's
        raise HTTPException(409, f"sft.from_run: run {source_id!r} sampled model {source.config.model!r}, not {config.model!r}")
    rows = await store.count_run_trajectories(source_id, config.sft.min_reward)
    if rows == 0:
        floor = "" if config.sft.min_reward is None else f" with reward >= {config.sft.min_reward}"
        raise HTTPException(422, f"sft.from_run: run {source_id!r} has no stored ok trajectory{floor}")
    return rows


async def _require_served_model(bus: Bus, model: str) -> None:
    """Refuse (409) a run whose `model` no running inference replica serves: its version 0 would
    be another model's weights, and the trainer's versions would not fit the replicas.

    Replicas advertise what they serve under `inference.<replica>` in the KV `relayrl-leases`
    (services/inference/policy.py; the bucket's TTL drops a dead replica). A run's model
    matches a replica's `--model`, its served name, or the checkpoint path it loaded. With no
    replica advertising (none started yet) there is nothing to check against: the run is taken.
    """
    try:
        kv = await bus.kv(subjects.KV_LEASES, ttl_s=subjects.LEASE_TTL_S)
        watch = await kv.watch("inference.*")  # subjects.lease_key("inference", <replica>)
        adverts: list[dict[str, Any]] = []
        try:
            while (entry := await watch.updates(timeout=bus.timeout)) is not None:
                if entry.operation is None and entry.value:
                    try:
                        adverts.append(json.loads(entry.value))
                    except ValueError:
                        continue  # not an advert: nothing to check against
        finally:
            await watch.stop()
    except (nats.errors.Error, asyncio.TimeoutError, OSError) as exc:
        raise HTTPException(503, f"cannot read which models inference serves (NATS): {exc}; retry") from None
    if not adverts or any(model in (a.get("model"), a.get("served_model_name"), a.get("path")) for a in adverts):
        return
    served = sorted({str(a.get("served_model_name") or a.get("model")) for a in adverts})
    raise HTTPException(
        409, f"model {model!r} is not served by inference (its replicas serve {', '.join(served)}): create the run "
        "with one of those models, or start inference with --model for it",
    )


@router.get(
    "/runs/{run_id}/weights",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the version's safetensors bytes"},
        **ERRORS,
        502: {"model": ErrorOut},
    },
)
async def get_weights(
    run_id: str,
    key: CurrentKey,
    version: int | None = Query(None, ge=0, description="default: the latest version the run published"),
    store: StoreClient = Depends(get_store),
    bus: Bus = Depends(get_bus),
) -> Response:
    """One version of a run's weights as safetensors bytes, with `X-Policy-Version`,
    `X-Policy-Sha256` and `X-Policy-Step`. Only the versions the trainer still keeps are there
    (`training.keep_versions`, `keep_versions_after` once the run ended); another is 404 with
    the versions that are."""
    await store.get_run(run_id, key.project)  # 404 for an unknown run (or another project's), before its id names an object
    try:
        # read_version checks the bytes against the sha256 (the KV's, or the object's digest
        # for an older version) before anything is sent: a client gets good bytes or an error.
        pv, data = await read_version(bus, run_id, version)
    except WeightsNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except WeightsError as exc:
        raise HTTPException(502, f"the stored weights of run {run_id} are unusable: {exc}") from None
    return Response(
        content=data,
        media_type="application/octet-stream",
        headers={
            "X-Policy-Version": str(pv.version),
            "X-Policy-Sha256": pv.sha256,
            "X-Policy-Step": str(pv.step),
            "Content-Disposition": f'attachment; filename="{run_id}-v{pv.version}.safetensors"',
        },
    )
