"""Tasks: submit one or a batch, read one back with its progress."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, HTTPException, status

from shared.bus import Bus
from shared.messages import TaskSpec, TaskView
from shared.store_api import StoreClient
from services.gateway.agents import AgentCatalog
from services.gateway.deps import CurrentKey, authorize, get_agents, get_bus, get_settings, get_store
from services.gateway.ids import adhoc_run, is_reserved
from services.gateway.schemas import AUTH_ERRORS, ErrorOut, TaskAccepted, TaskBatch, TaskIn, TasksAccepted, TasksBody
from services.gateway.settings import GatewaySettings
from services.gateway.submit import submit

router = APIRouter(prefix="/v1", tags=["tasks"], dependencies=[Depends(authorize)])


@router.post(
    "/tasks",
    status_code=status.HTTP_202_ACCEPTED,
    responses={400: {"model": ErrorOut}, 404: {"model": ErrorOut}, 409: {"model": ErrorOut}, 413: {"model": ErrorOut},
               503: {"model": ErrorOut}, **AUTH_ERRORS},
)  # fmt: skip
async def submit_tasks(
    body: TasksBody,
    key: CurrentKey,
    bus: Bus = Depends(get_bus),
    store: StoreClient = Depends(get_store),
    agents: AgentCatalog = Depends(get_agents),
    settings: GatewaySettings = Depends(get_settings),
) -> TasksAccepted:
    """Submit one task or a batch (`{"tasks": [...]}`); each becomes `group_size` rollout requests.

    The tasks are stored first, then their requests published with `Nats-Msg-Id`, so a client
    that retries with the same `task_id`s after an error creates nothing twice. Every check
    (limits, ids, the run's project) passes before anything is stored or published.
    """
    items = body.tasks if isinstance(body, TaskBatch) else [body]
    if len(items) > settings.max_tasks_per_request:
        raise HTTPException(413, f"{len(items)} tasks in one request; the limit is {settings.max_tasks_per_request}")
    rollouts = sum(t.group_size for t in items)
    if rollouts > settings.max_rollouts_per_request:
        raise HTTPException(
            413, f"{rollouts} rollouts in one request (tasks x group_size); the limit is "
            f"{settings.max_rollouts_per_request}: send fewer tasks per request",
        )
    reserved = [t.task_id for t in items if t.task_id is not None and is_reserved(t.task_id)]
    if reserved:
        raise HTTPException(
            422, f"task_id {reserved[0]!r} has the form of a run's own tasks (<run>-e<N>-r<N>, <run>-eval-v<N>-...), "
            "which only the gateway makes: choose another task_id",
        )
    await agents.require({t.agent for t in items})
    specs = [_spec(t, key.project) for t in items]
    if len({s.task_id for s in specs}) != len(specs):
        raise HTTPException(422, "task_id values must be unique within a request")
    await submit(bus, store, specs, project=key.project)
    return TasksAccepted(
        tasks=[
            TaskAccepted(
                task_id=s.task_id,
                run_id=s.run_id,
                group_size=s.group_size,
                rollout_ids=[s.rollout_id(i) for i in range(s.group_size)],
            )
            for s in specs
        ]
    )


def _spec(t: TaskIn, project: str) -> TaskSpec:
    return TaskSpec(
        task_id=t.task_id or uuid.uuid4().hex,
        run_id=t.run_id or adhoc_run(project),
        agent=t.agent,
        input=t.input,
        group_size=t.group_size,
        sampling=t.sampling,
        timeout_s=t.timeout_s,
    )


@router.get("/tasks/{task_id}", responses={404: {"model": ErrorOut}, 503: {"model": ErrorOut}, **AUTH_ERRORS})
async def get_task(task_id: str, key: CurrentKey, store: StoreClient = Depends(get_store)) -> TaskView:
    """A task, its progress (pending / running / done) and a summary of each rollout."""
    return await store.get_task(task_id, key.project)
