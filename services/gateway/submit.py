"""Store tasks, then publish their rollout requests: shared by `POST /v1/tasks` and run pacing."""

from __future__ import annotations

from typing import Sequence

from fastapi import HTTPException

from shared import subjects, telemetry
from shared.bus import Bus
from shared.messages import PutTasks, RolloutRequest, TaskSpec
from services.gateway.deps import StoreClient


async def submit(bus: Bus, store: StoreClient, specs: Sequence[TaskSpec], min_version: int = 0) -> None:
    """Tasks are stored before their requests are published, and every publish carries
    `Nats-Msg-Id`, so resubmitting the same task ids after any failure creates nothing twice."""
    with telemetry.tracer().start_as_current_span("submit_tasks", attributes={"tasks": len(specs)}):
        await store.call("put_tasks", PutTasks(tasks=list(specs)))
        requests = [RolloutRequest.for_task(s, i, min_version) for s in specs for i in range(s.group_size)]
        try:
            await bus.publish_many((subjects.tasks(r.run_id, r.eval), r, r.rollout_id) for r in requests)
        except Exception as exc:  # stored but not all published: safe to retry with the same task ids
            raise HTTPException(
                503, f"could not publish rollout requests ({exc}); retry with the same task_id values"
            ) from exc
