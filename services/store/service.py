"""The store process: consumes TRAJECTORIES and DLQ, publishes complete groups, answers queries."""

from __future__ import annotations

import asyncio

import structlog
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import subjects
from shared.bus import Bus, ConsumerSpec, Delivery, PullConsumer, TransientError, wait_for_stop
from shared.messages import DeadLetter, GetById, Group, Ping, PutTasks, Reply, Trajectory
from services.store.repository import Repository
from services.store.settings import StoreSettings

log = structlog.get_logger("store")


class Store:
    def __init__(self, bus: Bus, engine: AsyncEngine, settings: StoreSettings) -> None:
        self.bus = bus
        self.repo = Repository(engine)
        self.settings = settings

    # --- trajectories -> SQL -> groups -------------------------------------------------

    async def on_trajectories(self, batch: list[Delivery[Trajectory]]) -> None:
        """Store a batch, then publish every group it completed. Acked by the consumer after."""
        trajectories = [d.value for d in batch]
        try:
            inserted = await self.repo.put_trajectories(trajectories)
            # Checked for every group in the batch, not only new rows: a redelivery after a
            # crash between commit and publish must still publish the group.
            complete = await self.repo.complete_unpublished_groups(t.group_id for t in trajectories)
            if complete:
                await self.publish_groups(complete, known=inserted)
        except (OperationalError, DBAPIError, ConnectionError, OSError) as exc:
            raise TransientError(f"database unavailable: {exc}") from exc
        log.debug("stored trajectories", received=len(trajectories), new=len(inserted), groups=len(complete))

    async def publish_groups(self, group_ids: list[str], known: dict[str, Trajectory] | None = None) -> None:
        members = await self.repo.load_trajectories(group_ids, known)
        groups = [
            Group(run_id=m[0].run_id, group_id=g, task_id=m[0].task_id, trajectories=m) for g, m in members.items()
        ]
        await self.bus.publish_many(
            (subjects.groups(g.run_id), g, f"group:{g.group_id}") for g in groups
        )
        await self.repo.mark_published([(g.group_id, g.run_id, g.task_id, len(g.trajectories)) for g in groups])
        for g in groups:
            log.info("group complete", run_id=g.run_id, group_id=g.group_id, size=len(g.trajectories))

    async def on_dead_letters(self, batch: list[Delivery[DeadLetter]]) -> None:
        await self.repo.put_dead_letters([d.value for d in batch])

    # --- queries (core NATS request/reply) ---------------------------------------------

    async def rpc_put_tasks(self, req: PutTasks) -> Reply:
        if not req.tasks:
            return Reply.fail(400, "no tasks")
        new = await self.repo.put_tasks(req.tasks)
        return Reply.of(stored=new)

    async def rpc_get_task(self, req: GetById) -> Reply:
        task = await self.repo.get_task(req.id)
        return Reply.of(task=task) if task else Reply.fail(404, f"task {req.id!r} not found")

    async def rpc_get_rollout(self, req: GetById) -> Reply:
        traj = await self.repo.get_trajectory(req.id)
        return Reply.of(trajectory=traj) if traj else Reply.fail(404, f"rollout {req.id!r} not found")

    async def rpc_ping(self, _: Ping) -> Reply:
        await self.repo.count_rollouts("__ping__")  # proves the database answers, not just the process
        return Reply.of()

    async def serve(self) -> None:
        q = subjects.STORE_RPC_QUEUE
        await self.bus.serve(subjects.store_rpc("put_tasks"), q, PutTasks, self.rpc_put_tasks)
        await self.bus.serve(subjects.store_rpc("get_task"), q, GetById, self.rpc_get_task)
        await self.bus.serve(subjects.store_rpc("get_rollout"), q, GetById, self.rpc_get_rollout)
        await self.bus.serve(subjects.store_rpc("ping"), q, Ping, self.rpc_ping)

    def consumers(self) -> list[PullConsumer]:  # type: ignore[type-arg]
        trajectories = PullConsumer(
            bus=self.bus,
            spec=ConsumerSpec(
                stream=subjects.STREAM_TRAJECTORIES,
                durable=subjects.CONSUMER_STORE_TRAJECTORIES,
                filter_subject=subjects.STREAM_SUBJECTS[subjects.STREAM_TRAJECTORIES],
                ack_wait_s=self.settings.ack_wait_s,
            ),
            model=Trajectory,
            handler=self.on_trajectories,
            batch=self.settings.batch_size,
            # Two batches in flight: the next fetch overlaps the current SQL write.
            max_in_flight=2 * self.settings.batch_size,
        )
        dead_letters = PullConsumer(
            bus=self.bus,
            spec=ConsumerSpec(
                stream=subjects.STREAM_DLQ,
                durable=subjects.CONSUMER_STORE_DLQ,
                filter_subject=subjects.STREAM_SUBJECTS[subjects.STREAM_DLQ],
            ),
            model=DeadLetter,
            handler=self.on_dead_letters,
            batch=64,
        )
        return [trajectories, dead_letters]

    async def run(self, stop: asyncio.Event) -> None:
        await self.serve()
        await wait_for_stop(stop, *(c.run(stop) for c in self.consumers()))
