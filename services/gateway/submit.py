"""Store tasks, then publish their rollout requests: shared by `POST /v1/tasks` and run pacing."""

from __future__ import annotations

from typing import Sequence

from shared import subjects, telemetry
from shared.bus import Bus
from shared.messages import RolloutRequest, TaskSpec
from shared.store_api import StoreClient


class NotPublished(ConnectionError):
    """Transient: the tasks are stored but not all their requests were published. Retrying
    with the same task ids is safe (the store and the stream deduplicate)."""


async def submit(
    bus: Bus, store: StoreClient, specs: Sequence[TaskSpec], min_version: int = 0, project: str | None = None
) -> None:
    """Tasks are stored before their requests are published, and every publish carries
    `Nats-Msg-Id`, so resubmitting the same task ids after any failure creates nothing twice.
    The store client splits the tasks into messages under the connection's max_payload.
    With `project` (a user's request) the store refuses runs of another project and task ids
    of another run before anything is published."""
    with telemetry.tracer().start_as_current_span("submit_tasks", attributes={"tasks": len(specs)}):
        await store.put_tasks(specs, project)
        requests = [RolloutRequest.for_task(s, i, min_version) for s in specs for i in range(s.group_size)]
        try:
            await bus.publish_many((subjects.tasks(r.run_id, r.eval), r, r.rollout_id) for r in requests)
        except Exception as exc:  # stored but not all published: safe to retry with the same task ids
            raise NotPublished(
                f"could not publish rollout requests ({type(exc).__name__}: {exc}); retry with the same task_id values"
            ) from exc
