"""The store process: consumes TRAJECTORIES, METRICS and DLQ, publishes complete groups,
answers queries, and replays a run's trained groups."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Iterable, TypeVar

import structlog
from pydantic import ValidationError
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import subjects
from shared.bus import Bus, ConsumerSpec, Delivery, Handler, PullConsumer, TransientError, wait_for_stop
from shared.messages import (
    DeadLetter,
    Failure,
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
    SaveCursor,
    SetRunState,
    StepMetrics,
    Trajectory,
)
from shared.store_api import (
    PAYLOAD_HEADROOM,
    RPCS,
    CreateKey,
    DatasetPage,
    Evals,
    GetDataset,
    GetRunTrajectories,
    KeyFound,
    KeyList,
    ListedRun,
    ListKeys,
    MetricsPage,
    Pong,
    RevokeKey,
    RolloutFound,
    RunFound,
    RunPage,
    Stored,
    TaskFound,
    TrajectoryPage,
    VerifyKey,
    packed_size,
)
from services.store.cleanup import clean_up_run
from services.store.keys import KeyRepository
from services.store.repository import Repository
from services.store.runs import Refused, RunRepository
from services.store.settings import StoreSettings

# The data path: isolating refused rows, groups by reference, dead-lettered members, the reconciler.
from shared.faults import is_transient
from shared.messages import GetGroupMembers, GroupMembers, GroupRef
from sqlalchemy.exc import SQLAlchemyError
from services.store import records
from services.store.db import is_row_error

log = structlog.get_logger("store")

M = TypeVar("M", bound=Message)
T = TypeVar("T")  # a model or plain data (dataset rows)

# Failures outside the message: retried later, never counted toward poison.
_TRANSIENT = (OperationalError, DBAPIError, ConnectionError, OSError)
# Groups loaded from SQL at once while replaying (bounds memory, not order).
_REPLAY_CHUNK = 64
# Room kept in a group message for its headers (trace context, Nats-Msg-Id).
_GROUP_HEADROOM = 16 * 1024
# Members read from SQL at once while filling one get_group_members reply.
_MEMBERS_PER_READ = 4
# Trajectories read from SQL at once while filling one get_run_trajectories reply.
_TRAJECTORIES_PER_READ = 64
# Groups one reconciler query returns (it pages until none are left).
_SWEEP_GROUPS = 500


class Store:
    def __init__(self, bus: Bus, engine: AsyncEngine, settings: StoreSettings) -> None:
        self.bus = bus
        self.repo = Repository(engine)
        self.runs = RunRepository(engine)
        self.keys = KeyRepository(engine)
        self.settings = settings
        self._replays: dict[str, asyncio.Task[None]] = {}  # replay jobs running here, by `into`

    # --- trajectories -> SQL -> groups -------------------------------------------------

    async def on_trajectories(self, batch: list[Delivery[Trajectory]]) -> None:
        """Store a batch, then publish every group it completed. Acked by the consumer after.

        A row the database refuses for its data (a constraint, a value too long) is isolated
        from the batch and rejected: the consumer dead-letters it with the reason (and the dead
        letter completes its group as a failed member, see `on_dead_letters`); the rest is
        stored. Any other failure (database down or locked, NATS) is transient: the whole
        batch comes back later, and nothing counts toward poison.
        """
        trajectories = [d.value for d in batch]
        try:
            inserted, refused = await self.repo.put_trajectories_isolating(trajectories)
            for i, reason in refused.items():
                batch[i].reject(reason)
            # Checked for every group in the batch, not only new rows: a redelivery after a
            # crash between commit and publish must still publish the group.
            complete = await self.repo.complete_unpublished_groups(
                t.group_id for i, t in enumerate(trajectories) if i not in refused
            )
            if complete:
                await self.publish_groups(complete, known=inserted)
        except Exception as exc:
            _raise_transient(exc)
            raise
        if refused:
            log.warning("rows refused by the database; dead-lettered", refused=len(refused), stored=len(inserted))
        log.debug("stored trajectories", received=len(trajectories), new=len(inserted), groups=len(complete))

    async def publish_groups(self, group_ids: list[str], known: dict[str, Trajectory] | None = None) -> None:
        """Publish complete groups (each whole, or by reference when too big), then mark them published.

        Publish before mark: a crash in between publishes again, and the stream drops the copy
        (same Nats-Msg-Id within its duplicate window)."""
        members = await self.repo.load_trajectories(group_ids, known)
        groups = [
            Group(run_id=m[0].run_id, group_id=g, task_id=m[0].task_id, trajectories=m) for g, m in members.items()
        ]
        # Only groups a trainer will consume go on the bus: GROUPS is a work queue, and a
        # group nobody consumes would stay there. Evaluation groups are aggregated, never
        # trained; ad-hoc tasks have no trainer; an ended run's stragglers have none any more.
        # They are all complete in SQL (and replay can still send them to a run).
        active = await self.runs.active(g.run_id for g in groups)
        await self.bus.publish_many(
            (subjects.groups(g.run_id), self.group_message(g), f"group:{g.group_id}")
            for g in groups
            if not g.trajectories[0].eval and g.run_id in active
        )
        await self.repo.mark_published([(g.group_id, g.run_id, g.task_id, len(g.trajectories)) for g in groups])
        for g in groups:
            log.debug("group complete", run_id=g.run_id, group_id=g.group_id, size=len(g.trajectories))

    def group_message(self, group: Group) -> Group | GroupRef:
        """`group` itself when it fits one message under the server's max_payload, else a
        `GroupRef` the trainer resolves through `get_group_members` (services/trainer/groups_in.py).

        Measured (tests/integration/test_store_faults.py): a 20-call trajectory at an 8k-token context packs
        to about 0.75 MB (8k prompt + 0.5k response tokens a call, 4 bytes a prompt token, 12 a
        response token), so the default 8 MB max_payload holds about 10 of them: groups of 16
        such rollouts go by reference. One member must still fit a message: the worker
        publishes it alone."""
        nbytes = len(group.encode())
        if nbytes <= self.bus.nc.max_payload - _GROUP_HEADROOM:
            return group
        log.info("group too big for one message; published by reference", group_id=group.group_id, nbytes=nbytes,
                 max_payload=self.bus.nc.max_payload)
        return GroupRef(
            run_id=group.run_id,
            group_id=group.group_id,
            task_id=group.task_id,
            size=len(group.trajectories),
            nbytes=nbytes,
            completed_at=group.completed_at,
        )

    async def rpc_get_group_members(self, req: GetGroupMembers) -> GroupMembers:
        """Members of a stored group after `after_index`, as many as fit one reply (at least one)."""
        budget = self.bus.nc.max_payload - PAYLOAD_HEADROOM
        out: list[Trajectory] = []
        size = 0
        after = req.after_index
        while True:
            page = await self.repo.group_members_page(req.group_id, after, _MEMBERS_PER_READ)
            for t in page:
                n = len(t.encode())
                if out and size + n > budget:
                    return GroupMembers(trajectories=out, more=True)
                out.append(t)
                size += n
            if len(page) < _MEMBERS_PER_READ:
                break
            after = page[-1].sample_index
        if not out and req.after_index < 0:
            raise Refused(404, f"group {req.group_id!r} has no stored members")
        return GroupMembers(trajectories=out, more=False)

    async def on_metrics(self, batch: list[Delivery[StepMetrics]]) -> None:
        """Store trainer steps; a re-sent step replaces the stored one (see RunRepository.put_metrics)."""
        try:
            await self.runs.put_metrics([(d.value, d.msg.metadata.sequence.stream) for d in batch])
        except Exception as exc:
            _raise_transient(exc)
            raise

    async def on_dead_letters(self, batch: list[Delivery[DeadLetter]]) -> None:
        """Store dead letters; one that stands for a group member (its rollout request or its
        trajectory) also stores that member as a failed trajectory (status error, reward 0,
        error = the reason) and publishes the group if that completed it, so the run moves on.

        Insert-ignore: a member stored before (the real trajectory) wins. Database failures
        here are transient, whatever they are: this consumer never dead-letters (spec)."""
        letters = [d.value for d in batch]
        members: list[Trajectory] = []
        for letter in letters:
            member = records.failed_member(letter)
            if member is not None:
                members.append(member)
            elif letter.stream in (subjects.STREAM_TASKS, subjects.STREAM_TRAJECTORIES):
                log.error("dead letter names no rollout: its group cannot complete", stream=letter.stream,
                          subject=letter.subject, seq=letter.stream_seq, reason=letter.reason[:500])
        try:
            await self.repo.put_dead_letters(letters)
            if not members:
                return
            inserted, refused = await self.repo.put_trajectories_isolating(members)
            for i, reason in refused.items():
                log.error("failed member not stored", rollout_id=members[i].rollout_id, reason=reason)
            complete = await self.repo.complete_unpublished_groups(m.group_id for m in members)
            if complete:
                await self.publish_groups(complete, known=inserted)
        except Exception as exc:
            if isinstance(exc, SQLAlchemyError) or is_transient(exc):
                raise TransientError(f"dead letters not stored yet: {type(exc).__name__}: {exc}") from exc
            raise
        for rollout_id in inserted:
            log.warning("dead-lettered rollout stored as failed", rollout_id=rollout_id)

    # --- reconciliation ------------------------------------------------------------------

    async def reconcile(self, stop: asyncio.Event) -> None:
        """At start and every `reconcile_every_s`: publish complete groups never published (a
        crash between storing a group's last member and publishing it; a group completed while
        NATS was away). Failures are logged and tried again next period."""
        while not stop.is_set():
            try:
                await self.reconcile_once()
            except Exception as exc:  # noqa: BLE001 - a sweep must never end the store
                log.warning("reconcile failed; retried next period", error=f"{type(exc).__name__}: {exc}")
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.settings.reconcile_every_s)
            except asyncio.TimeoutError:
                pass

    async def reconcile_once(self) -> int:
        """One sweep; returns how many groups it published. Ended runs are cleaned up after."""
        total = 0
        # Groups the normal path may be publishing right now are left to it: their last member
        # finished less than two ack_waits ago (a batch in hand is either done by then or back
        # on the stream for this store).
        settled = time.time() - 2 * self.settings.ack_wait_s
        while True:
            ids = await self.repo.sweep_complete_groups(_SWEEP_GROUPS, finished_before=settled)
            if ids:
                await self.publish_groups(ids)
                total += len(ids)
            if len(ids) < _SWEEP_GROUPS:
                break
        if total:
            log.info("reconciler published complete groups", groups=total)
        await self.clean_up_ended_runs()
        return total

    async def clean_up_ended_runs(self) -> list[str]:
        """Remove the bus objects of runs ended at least `cleanup_after_s` ago (services/store/cleanup.py)."""
        cleaned = []
        for run in await self.runs.ended_uncleaned(time.time() - self.settings.cleanup_after_s):
            consumed = await clean_up_run(self.bus, run)
            await self.runs.mark_cleaned(run.run_id, consumed)
            cleaned.append(run.run_id)
        return cleaned

    # --- queries (core NATS request/reply) ---------------------------------------------

    async def rpc_put_tasks(self, req: PutTasks) -> Stored:
        if not req.tasks:
            raise Refused(400, "no tasks")
        return Stored(stored=await self.repo.put_tasks(req.tasks, req.project))

    async def rpc_get_task(self, req: GetById) -> TaskFound:
        task = await self.repo.get_task(req.id, req.project)
        if task is None:
            raise Refused(404, f"task {req.id!r} not found")
        return TaskFound(task=task)

    async def rpc_get_rollout(self, req: GetById) -> RolloutFound:
        traj = await self.repo.get_trajectory(req.id, req.project)
        if traj is None:
            raise Refused(404, f"rollout {req.id!r} not found")
        return RolloutFound(trajectory=traj)

    async def rpc_ping(self, _: Ping) -> Pong:
        await self.repo.count_rollouts("__ping__")  # proves the database answers, not just the process
        return Pong()

    # --- runs, datasets, metrics ------------------------------------------------------

    async def rpc_put_run(self, req: PutRun) -> RunFound:
        return RunFound(run=await self.runs.put_run(req.config, req.rows, req.project))

    async def rpc_get_run(self, req: GetById) -> RunFound:
        run = await self.runs.get_run(req.id, req.project)
        if run is None:
            raise Refused(404, f"run {req.id!r} not found")
        return RunFound(run=run)

    async def rpc_list_runs(self, req: ListRuns) -> RunPage:
        """Runs newest first without their inline rows (a listing of many runs must not grow
        with their datasets); cut to one message, with `next` to page on from."""
        runs = [ListedRun.of(r) for r in await self.runs.list_runs(req.states, req.limit, req.after, req.project)]
        kept = self._fit(runs, "runs")
        last = kept[-1] if kept else None
        return RunPage(runs=kept, next=(last.created_at, last.run_id) if last and len(kept) < len(runs) else None)

    async def rpc_set_run_state(self, req: SetRunState) -> RunFound:
        return RunFound(run=await self.runs.set_state(req.run_id, req.state, req.error, req.from_states))

    async def rpc_save_cursor(self, req: SaveCursor) -> Stored:
        """`stored` is 1 when the cursor was applied, 0 when a further one was already stored."""
        return Stored(stored=int(await self.runs.save_cursor(req.run_id, req.cursor)))

    async def rpc_put_dataset(self, req: PutDataset) -> Stored:
        await self.runs.put_dataset(req.name, req.rows, req.project)
        return Stored(stored=len(req.rows))

    async def rpc_get_dataset(self, req: GetDataset) -> DatasetPage:
        """Rows from `offset` on, as many as fit in one message."""
        rows = await self.runs.get_dataset(req.name, req.project)
        if rows is None:
            raise Refused(404, f"dataset {req.name!r} not found")
        kept = self._fit(rows[req.offset :], "dataset rows")
        end = req.offset + len(kept)
        return DatasetPage(rows=kept, total=len(rows), next_offset=end if end < len(rows) else None)

    async def rpc_get_metrics(self, req: GetMetrics) -> MetricsPage:
        """Steps after `after_step`, oldest first; `more` when the reply was cut to fit one NATS
        message (page on with after_step = the last step returned)."""
        metrics = await self.runs.get_metrics(req.run_id, req.after_step, req.limit)
        kept = self._fit(metrics, "metrics")
        return MetricsPage(metrics=kept, more=len(kept) < len(metrics))

    # --- API keys ----------------------------------------------------------------------

    async def rpc_create_key(self, req: CreateKey) -> KeyFound:
        return KeyFound(key=await self.keys.create(req))

    async def rpc_verify_key(self, req: VerifyKey) -> KeyFound:
        return KeyFound(key=await self.keys.verify(req.key_id, req.secret_hash))

    async def rpc_list_keys(self, req: ListKeys) -> KeyList:
        return KeyList(keys=self._fit(await self.keys.list(req.project), "keys"))

    async def rpc_revoke_key(self, req: RevokeKey) -> KeyFound:
        key = await self.keys.revoke(req.key_id, req.project)
        log.info("API key revoked", key_id=key.key_id, project=key.project)
        return KeyFound(key=key)

    def _fit(self, items: list[T], what: str) -> list[T]:
        """The longest prefix of `items` that fits in one reply (at least one item)."""
        budget = self.bus.nc.max_payload - PAYLOAD_HEADROOM
        size = 0
        for n, item in enumerate(items):
            size += packed_size(item)
            if size > budget and n > 0:
                log.info("reply cut to fit max_payload; the client pages on", what=what, kept=n, asked=len(items))
                return items[:n]
        return items

    # --- replay ------------------------------------------------------------------------

    async def rpc_replay(self, req: ReplayRequest) -> Stored:
        """Start (or find) the durable replay job that re-publishes the groups run `run_id`
        trained, in the order its trainer consumed them, to `groups(into, replay=True)`, and
        answer at once with the job's group count. The job is stored before anything is
        published and advances a stored cursor, so a store restarted mid-replay resumes it
        (`resume_replays`) and a repeated request republishes nothing."""
        into = req.into or req.run_id
        try:
            subjects.check_token(into)
        except ValueError as exc:
            raise Refused(400, f"into: {exc}") from None
        order = await self.runs.trained_groups(req.run_id, req.versions)
        if order is None:
            raise Refused(404, f"run {req.run_id!r} has no stored training steps to replay")
        if into != req.run_id:
            await self.runs.copy_run(req.run_id, into)
        selected = await self._replayable(order, req.min_reward)
        job = await self.runs.create_replay_job(req.run_id, into, selected)
        self._start_replay(job.into)
        log.info("replay job", run_id=req.run_id, into=into, groups=len(job.group_ids), cursor=job.cursor)
        return Stored(stored=len(job.group_ids))

    async def _replayable(self, order: list[str], min_reward: float | None) -> list[str]:
        """The trained groups, in order, that are stored here and pass `min_reward`."""
        out: list[str] = []
        for chunk in _chunks(order, _REPLAY_CHUNK):
            stored = await self.repo.load_trajectories(chunk)
            rewards = await self.repo.group_rewards(chunk) if min_reward is not None else {}
            for g in chunk:
                if g not in stored:  # trained but not stored here (e.g. groups from another store)
                    log.warning("replay: group not stored; skipped", group_id=g)
                elif min_reward is None or rewards.get(g, float("-inf")) >= min_reward:
                    out.append(g)
        return out

    def _start_replay(self, into: str) -> None:
        """Run the job into `into` in the background unless it already runs here."""
        if into in self._replays and not self._replays[into].done():
            return
        self._replays[into] = asyncio.create_task(self._replay_job(into))

    async def resume_replays(self) -> None:
        """Restart every stored replay job that has not finished (at store start)."""
        for job in await self.runs.unfinished_replay_jobs():
            self._start_replay(job.into)

    async def _replay_job(self, into: str) -> None:
        """Publish the job's groups from its cursor, one at a time (the stream order must be the
        trained order), advancing the cursor after each chunk; transient faults wait and retry."""
        delay = 0.5
        while True:
            try:
                jobs = {j.into: j for j in await self.runs.unfinished_replay_jobs()}
                job = jobs.get(into)
                if job is None:
                    return
                for start in range(job.cursor, len(job.group_ids), _REPLAY_CHUNK):
                    chunk = job.group_ids[start : start + _REPLAY_CHUNK]
                    members = await self.repo.load_trajectories(chunk)
                    for g in chunk:
                        group = Group(run_id=into, group_id=g, task_id=members[g][0].task_id, trajectories=members[g])
                        await self.bus.publish(subjects.groups(into, replay=True), self.group_message(group), f"replay:{into}:{g}")
                    end = start + len(chunk)
                    await self.runs.advance_replay_job(into, end, done=end >= len(job.group_ids))
                if not job.group_ids:
                    await self.runs.advance_replay_job(into, 0, done=True)
                log.info("replayed", run_id=job.source, into=into, groups=len(job.group_ids))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not _is_outage(exc):
                    log.exception("replay job failed", into=into)
                    return
                log.warning("replay waiting for a transient fault", into=into, error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def rpc_get_run_trajectories(self, req: GetRunTrajectories) -> TrajectoryPage:
        """A page of a run's ok training trajectories (reward >= min_reward), under max_payload."""
        total = None
        if req.after is None:
            total = await self.repo.count_run_trajectories(req.run_id, req.min_reward, req.finished_before)
        if req.limit == 0:
            return TrajectoryPage(trajectories=[], total=total)
        budget = self.bus.nc.max_payload - PAYLOAD_HEADROOM
        out: list[Trajectory] = []
        size = 0
        after = req.after
        while len(out) < req.limit:
            page = await self.repo.run_trajectories_page(
                req.run_id, req.min_reward, req.finished_before, after, _TRAJECTORIES_PER_READ
            )
            for t in page:
                n = len(t.encode())
                if n > budget:  # never fits a reply: the caller must hear which one and why
                    raise Refused(413, f"trajectory {t.rollout_id!r} is {n} bytes packed; one reply holds {budget}")
                if out and (size + n > budget or len(out) >= req.limit):
                    return TrajectoryPage(trajectories=out, total=total, next=out[-1].rollout_id)
                out.append(t)
                size += n
            if len(page) < _TRAJECTORIES_PER_READ:
                return TrajectoryPage(trajectories=out, total=total)
            after = page[-1].rollout_id
        return TrajectoryPage(trajectories=out, total=total, next=out[-1].rollout_id)

    async def rpc_get_evals(self, req: GetEvals) -> Evals:
        """Evaluation rollouts of a run aggregated per policy version."""
        return Evals(evals=await self.repo.eval_summaries(req.run_id, req.accuracy_threshold))

    # --- serving -----------------------------------------------------------------------

    async def serve(self) -> None:
        """Answer every RPC of the registry (`shared.store_api.RPCS`) with its `rpc_<method>`."""
        for rpc in RPCS:
            handler = getattr(self, f"rpc_{rpc.method}")
            await self.bus.serve(rpc.subject, subjects.STORE_RPC_QUEUE, rpc.request, _refusals(handler))

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
        """A batch consumer of every subject of `stream` (the DLQ's never dead-letters again)."""
        spec = ConsumerSpec(
            stream=stream,
            durable=durable,
            filter_subject=subjects.STREAM_SUBJECTS[stream],
            dead_letter=stream != subjects.STREAM_DLQ,
        )
        return PullConsumer(bus=self.bus, spec=spec, model=model, handler=handler, batch=64)

    async def run(self, stop: asyncio.Event) -> None:
        await self.serve()
        await self.resume_replays()
        try:
            await wait_for_stop(stop, self.reconcile(stop), *(c.run(stop) for c in self.consumers()))
        finally:
            for task in self._replays.values():  # the cursor is stored: the next start resumes
                task.cancel()


def _refusals(handler: Callable[[M], Awaitable[Message]]) -> Callable[[M], Awaitable[Message]]:
    """Answer failures by type so callers can tell waiting from giving up: a `Refused` with its
    code; a database that is down, restarting or locked as a transient 503 (the request may
    succeed later); data the database refuses as 409 (constraint) or 400 (value)."""

    async def answer(req: M) -> Message:
        try:
            return await handler(req)
        except Refused as exc:
            return Failure(code=exc.code, error=exc.reason)
        except IntegrityError as exc:
            return Failure(code=409, error=f"conflicts with stored data: {exc.orig}")
        except (DataError, ValidationError) as exc:
            return Failure(code=400, error=f"invalid data: {exc}")
        except (*_TRANSIENT, PoolTimeout) as exc:  # PoolTimeout: every connection busy, for now
            if isinstance(exc, DBAPIError) and not _connection_error(exc):
                raise  # a statement the database refuses for good (a bug): the bus answers 500
            log.warning("database unavailable", error=str(exc))
            return Failure(code=503, error=f"database unavailable: {type(exc).__name__}: {exc}", transient=True)

    return answer


def _connection_error(exc: DBAPIError) -> bool:
    """An error of the database connection (down, restarting, locked, gone), not of the statement."""
    return isinstance(exc, (OperationalError, InterfaceError)) or exc.connection_invalidated


def _is_outage(exc: BaseException) -> bool:
    """A failure outside the data: any database error but a refused row, and what
    `shared.faults.is_transient` says (NATS, timeouts)."""
    return (isinstance(exc, SQLAlchemyError) and not is_row_error(exc)) or is_transient(exc)


def _raise_transient(exc: Exception) -> None:
    """Raise TransientError for an outage (`_is_outage`); return otherwise."""
    if _is_outage(exc):
        kind = "database unavailable: " if isinstance(exc, SQLAlchemyError) else ""
        raise TransientError(f"{kind}{type(exc).__name__}: {exc}") from exc


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
