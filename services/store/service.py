"""The store process: consumes TRAJECTORIES, METRICS and DLQ, publishes complete groups,
answers queries, and replays a run's trained groups."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import msgpack
import structlog
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import subjects
from shared.bus import Bus, ConsumerSpec, Delivery, Handler, PullConsumer, TransientError, wait_for_stop
from shared.messages import (
    DeadLetter,
    GetById,
    GetEvals,
    GetMetrics,
    Group,
    ListRuns,
    Message,
    Ping,
    PutDataset,
    PutRun,
    PutTasks,
    ReplayRequest,
    Reply,
    SaveCursor,
    SetRunState,
    StepMetrics,
    Trajectory,
)
from services.store.repository import Repository
from services.store.runs import Refused, RunRepository
from services.store.settings import StoreSettings

log = structlog.get_logger("store")

M = TypeVar("M", bound=Message)
T = TypeVar("T", bound=BaseModel)

# Failures outside the message: retried later, never counted toward poison.
_TRANSIENT = (OperationalError, DBAPIError, ConnectionError, OSError)
# Room left in a reply for everything but its list (error text, field names, envelope).
_REPLY_HEADROOM = 64 * 1024
# Groups loaded from SQL at once while replaying (bounds memory, not order).
_REPLAY_CHUNK = 64


class Store:
    def __init__(self, bus: Bus, engine: AsyncEngine, settings: StoreSettings) -> None:
        self.bus = bus
        self.repo = Repository(engine)
        self.runs = RunRepository(engine)
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
        except _TRANSIENT as exc:
            raise TransientError(f"database unavailable: {exc}") from exc
        log.debug("stored trajectories", received=len(trajectories), new=len(inserted), groups=len(complete))

    async def publish_groups(self, group_ids: list[str], known: dict[str, Trajectory] | None = None) -> None:
        members = await self.repo.load_trajectories(group_ids, known)
        groups = [
            Group(run_id=m[0].run_id, group_id=g, task_id=m[0].task_id, trajectories=m) for g, m in members.items()
        ]
        # Evaluation groups are complete once stored: they are aggregated, never trained.
        await self.bus.publish_many(
            (subjects.groups(g.run_id), g, f"group:{g.group_id}") for g in groups if not g.trajectories[0].eval
        )
        await self.repo.mark_published([(g.group_id, g.run_id, g.task_id, len(g.trajectories)) for g in groups])
        for g in groups:
            log.info("group complete", run_id=g.run_id, group_id=g.group_id, size=len(g.trajectories))

    async def on_metrics(self, batch: list[Delivery[StepMetrics]]) -> None:
        """Store trainer steps; a re-sent step replaces the stored one (see RunRepository.put_metrics)."""
        try:
            await self.runs.put_metrics([(d.value, d.msg.metadata.sequence.stream) for d in batch])
        except _TRANSIENT as exc:
            raise TransientError(f"database unavailable: {exc}") from exc

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

    # --- runs, datasets, metrics ------------------------------------------------------

    async def rpc_put_run(self, req: PutRun) -> Reply:
        return Reply.of(run=await self.runs.put_run(req.config, req.rows))

    async def rpc_get_run(self, req: GetById) -> Reply:
        run = await self.runs.get_run(req.id)
        return Reply.of(run=run) if run else Reply.fail(404, f"run {req.id!r} not found")

    async def rpc_list_runs(self, req: ListRuns) -> Reply:
        runs = await self.runs.list_runs(req.states, req.limit)
        return Reply.of(runs=self._fit(runs, "runs"))

    async def rpc_set_run_state(self, req: SetRunState) -> Reply:
        return Reply.of(run=await self.runs.set_state(req.run_id, req.state, req.error, req.from_states))

    async def rpc_save_cursor(self, req: SaveCursor) -> Reply:
        """`stored` is 1 when the cursor was applied, 0 when a further one was already stored."""
        return Reply.of(stored=int(await self.runs.save_cursor(req.run_id, req.cursor)))

    async def rpc_put_dataset(self, req: PutDataset) -> Reply:
        await self.runs.put_dataset(req.name, req.rows)
        return Reply.of(stored=len(req.rows))

    async def rpc_get_dataset(self, req: GetById) -> Reply:
        rows = await self.runs.get_dataset(req.id)
        return Reply.of(rows=rows) if rows is not None else Reply.fail(404, f"dataset {req.id!r} not found")

    async def rpc_get_metrics(self, req: GetMetrics) -> Reply:
        """Steps after `after_step`, oldest first; fewer than `limit` when the reply would not
        fit in one NATS message (page on with after_step = the last step returned)."""
        metrics = await self.runs.get_metrics(req.run_id, req.after_step, req.limit)
        return Reply.of(metrics=self._fit(metrics, "metrics"))

    def _fit(self, items: list[T], what: str) -> list[T]:
        """The longest prefix of `items` that fits in one reply (at least one item)."""
        budget = self.bus.nc.max_payload - _REPLY_HEADROOM
        size = 0
        for n, item in enumerate(items):
            size += len(msgpack.packb(item.model_dump(), use_bin_type=True))
            if size > budget and n > 0:
                log.warning("reply trimmed to fit max_payload", what=what, kept=n, asked=len(items))
                return items[:n]
        return items

    # --- replay ------------------------------------------------------------------------

    async def rpc_replay(self, req: ReplayRequest) -> Reply:
        """Re-publish the groups run `run_id` trained, in the order its trainer consumed them,
        to `groups(into, replay=True)`. `stored` counts groups the stream took as new: a
        replay repeated within the duplicate window publishes nothing twice."""
        into = req.into or req.run_id
        try:
            subjects.check_token(into)
        except ValueError as exc:
            return Reply.fail(400, f"into: {exc}")
        order = await self.runs.trained_groups(req.run_id, req.versions)
        if order is None:
            return Reply.fail(404, f"run {req.run_id!r} has no stored training steps to replay")
        if into != req.run_id:
            await self.runs.copy_run(req.run_id, into)
        published = 0
        for chunk in _chunks(order, _REPLAY_CHUNK):
            published += await self._replay_chunk(chunk, into, req.min_reward)
        log.info("replayed", run_id=req.run_id, into=into, groups=len(order), published=published)
        return Reply.of(stored=published)

    async def _replay_chunk(self, group_ids: list[str], into: str, min_reward: float | None) -> int:
        if min_reward is not None:
            rewards = await self.repo.group_rewards(group_ids)
            group_ids = [g for g in group_ids if rewards.get(g, float("-inf")) >= min_reward]
        members = await self.repo.load_trajectories(group_ids)
        published = 0
        for g in group_ids:
            if g not in members:  # trained but not stored here (e.g. groups from another store)
                log.warning("replay: group not stored; skipped", group_id=g)
                continue
            group = Group(run_id=into, group_id=g, task_id=members[g][0].task_id, trajectories=members[g])
            # One at a time, each waiting for its ack: the stream order must be the trained order.
            acks = await self.bus.publish_many([(subjects.groups(into, replay=True), group, f"replay:{into}:{g}")])
            published += sum(not a.duplicate for a in acks)
        return published

    async def rpc_get_evals(self, req: GetEvals) -> Reply:
        """Evaluation rollouts of a run aggregated per policy version."""
        return Reply.of(evals=await self.repo.eval_summaries(req.run_id, req.accuracy_threshold))

    # --- serving -----------------------------------------------------------------------

    async def serve(self) -> None:
        rpcs: list[tuple[str, type[Any], Callable[[Any], Awaitable[Reply]]]] = [
            ("put_tasks", PutTasks, self.rpc_put_tasks),
            ("get_task", GetById, self.rpc_get_task),
            ("get_rollout", GetById, self.rpc_get_rollout),
            ("ping", Ping, self.rpc_ping),
            ("put_run", PutRun, self.rpc_put_run),
            ("get_run", GetById, self.rpc_get_run),
            ("list_runs", ListRuns, self.rpc_list_runs),
            ("set_run_state", SetRunState, self.rpc_set_run_state),
            ("save_cursor", SaveCursor, self.rpc_save_cursor),
            ("put_dataset", PutDataset, self.rpc_put_dataset),
            ("get_dataset", GetById, self.rpc_get_dataset),
            ("get_metrics", GetMetrics, self.rpc_get_metrics),
            ("get_evals", GetEvals, self.rpc_get_evals),
            ("replay", ReplayRequest, self.rpc_replay),
        ]
        for method, request_cls, handler in rpcs:
            await self.bus.serve(subjects.store_rpc(method), subjects.STORE_RPC_QUEUE, request_cls, _refusals(handler))

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
        metrics = self._whole_stream(subjects.STREAM_METRICS, subjects.CONSUMER_STORE_METRICS, StepMetrics, self.on_metrics)
        dead_letters = self._whole_stream(subjects.STREAM_DLQ, subjects.CONSUMER_STORE_DLQ, DeadLetter, self.on_dead_letters)
        return [trajectories, metrics, dead_letters]

    def _whole_stream(self, stream: str, durable: str, model: type[M], handler: Handler[M]) -> PullConsumer[M]:
        """A batch consumer of every subject of `stream`."""
        spec = ConsumerSpec(stream=stream, durable=durable, filter_subject=subjects.STREAM_SUBJECTS[stream])
        return PullConsumer(bus=self.bus, spec=spec, model=model, handler=handler, batch=64)

    async def run(self, stop: asyncio.Event) -> None:
        await self.serve()
        await wait_for_stop(stop, *(c.run(stop) for c in self.consumers()))


def _refusals(handler: Callable[[M], Awaitable[Reply]]) -> Callable[[M], Awaitable[Reply]]:
    """Answer a `Refused` with its code instead of the bus's generic 500."""

    async def answer(req: M) -> Reply:
        try:
            return await handler(req)
        except Refused as exc:
            return Reply.fail(exc.code, exc.reason)

    return answer


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
