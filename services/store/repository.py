"""All SQL the store runs: idempotent writes, group completion, and read queries.

Writes of trajectories isolate bad rows: a batch the database refuses for its data (see
`db.is_row_error`) is bisected until the refused rows are alone, the rest is stored, and
the refused ones are returned with the reason (the service dead-letters them). Transient
errors (connection, locks) propagate unchanged: the caller retries the whole batch.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Iterable, Sequence

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.messages import DeadLetter, EvalSummary, RolloutSummary, TaskSpec, TaskView, Trajectory
from services.store import records
from services.store.db import insert_ignore, is_row_error, sessions
from services.store.runs import Refused
from services.store.tables import (
    DeadLetterRow,
    EventRow,
    GroupRow,
    RewardRow,
    RolloutRow,
    RunRow,
    TaskRow,
    TransitionRow,
)

# Keep each statement's bound parameters under SQLite's limit (32766) for wide rows.
_ROWS_PER_STATEMENT = 500


class Repository:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = sessions(engine)

    # --- writes ------------------------------------------------------------------------

    async def put_tasks(self, tasks: Sequence[TaskSpec], project: str | None = None) -> int:
        """Upsert tasks (and ad-hoc buckets for runs not stored yet); returns how many were new.

        Ids are scoped to their run: a task id stored under another run is refused (409), and
        with `project` (a user's request) so is a run of another project (404, as if it did not
        exist). Either refusal rolls the whole request back: nothing of it is written."""
        runs = {t.run_id for t in tasks}
        async with self.sessions.begin() as s:
            await s.execute(
                insert_ignore(self.engine, RunRow),
                [{"run_id": r, "created_at": time.time(), "config": {}, "project": project or "default"} for r in runs],
            )
            if project is not None:
                owners = await s.execute(select(RunRow.run_id, RunRow.project).where(RunRow.run_id.in_(sorted(runs))))
                foreign = sorted(r for r, p in owners.all() if p != project)
                if foreign:
                    raise Refused(404, f"run {foreign[0]!r} not found")
            wanted = {t.task_id: t.run_id for t in tasks}
            for chunk in _chunks(list(wanted)):
                taken = await s.execute(select(TaskRow.task_id, TaskRow.run_id).where(TaskRow.task_id.in_(chunk)))
                clash = sorted(t for t, r in taken.all() if wanted[t] != r)
                if clash:
                    raise Refused(409, f"task id {clash[0]!r} belongs to another run: choose another task_id")
            new = 0
            for chunk in _chunks([records.task_row(t) for t in tasks]):
                result = await s.execute(insert_ignore(self.engine, TaskRow).returning(TaskRow.task_id), chunk)
                new += len(result.all())
        return new

    async def put_trajectories(self, trajectories: Sequence[Trajectory]) -> dict[str, Trajectory]:
        """Store trajectories once each (first attempt to arrive wins); returns the new ones by id.

        Transitions and rewards are written only for rollouts this call inserted, so a late
        duplicate of another attempt can never mix its transitions into the stored one.
        """
        unique: dict[str, Trajectory] = {}
        for t in trajectories:
            unique.setdefault(t.rollout_id, t)
        inserted: set[str] = set()
        async with self.sessions.begin() as s:
            for chunk in _chunks([records.rollout_row(t) for t in unique.values()]):
                result = await s.execute(insert_ignore(self.engine, RolloutRow).returning(RolloutRow.rollout_id), chunk)
                inserted.update(result.scalars().all())
            fresh = [unique[r] for r in inserted]
            transitions = [row for t in fresh for row in records.transition_rows(t)]
            rewards = [row for t in fresh for row in records.reward_rows(t)]
            events = [row for t in fresh for row in records.event_rows(t)]
            for table, rows in ((TransitionRow, transitions), (RewardRow, rewards), (EventRow, events)):
                for chunk in _chunks(rows):
                    await s.execute(insert_ignore(self.engine, table), chunk)
        return {r: unique[r] for r in inserted}

    async def put_trajectories_isolating(
        self, trajectories: Sequence[Trajectory]
    ) -> tuple[dict[str, Trajectory], dict[int, str]]:
        """`put_trajectories`, but a batch refused for its data is split in halves (each its own
        transaction) until every refused trajectory is alone. Returns the new ones by id and
        the refused ones by index in `trajectories`, with the database's reason.

        One bad row among n costs about 2 log2(n) extra transactions, and only when it happens.
        """
        inserted: dict[str, Trajectory] = {}
        refused: dict[int, str] = {}

        async def attempt(idx: list[int]) -> None:
            try:
                inserted.update(await self.put_trajectories([trajectories[i] for i in idx]))
            except Exception as exc:
                if not is_row_error(exc):
                    raise
                if len(idx) == 1:
                    refused[idx[0]] = f"database refused the row: {_db_reason(exc)}"
                    return
                mid = len(idx) // 2
                await attempt(idx[:mid])
                await attempt(idx[mid:])

        if trajectories:
            await attempt(list(range(len(trajectories))))
        return inserted, refused

    async def put_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Store dead letters once each (stream, stream_seq). Text is cleaned to fit its column
        so a dead letter itself is never refused for its data."""
        rows = [
            {
                "stream": _fit(d.stream, 32),
                "stream_seq": d.stream_seq,
                "subject": _fit(d.subject, 256),
                "consumer": _fit(d.consumer, 64),
                "reason": _fit(d.reason, 100_000),
                "data": d.data,
                "delivered": d.delivered,
                "at": d.at,
            }
            for d in letters
        ]
        if not rows:
            return
        async with self.sessions.begin() as s:
            await s.execute(insert_ignore(self.engine, DeadLetterRow), rows)

    # --- groups ------------------------------------------------------------------------

    async def complete_unpublished_groups(self, group_ids: Iterable[str]) -> list[str]:
        """Of `group_ids`, those with all members stored and not yet published."""
        ids = sorted(set(group_ids))
        complete: list[str] = []
        async with self.sessions() as s:
            for chunk in _chunks(ids):
                q = (
                    select(RolloutRow.group_id)
                    .where(RolloutRow.group_id.in_(chunk))
                    .where(~RolloutRow.group_id.in_(select(GroupRow.group_id).where(GroupRow.group_id.in_(chunk))))
                    .group_by(RolloutRow.group_id)
                    .having(func.count() >= func.max(RolloutRow.group_size))
                )
                complete.extend((await s.execute(q)).scalars().all())
        return complete

    async def sweep_complete_groups(self, limit: int = 1000, finished_before: float | None = None) -> list[str]:
        """Groups with all members stored that were never published: the reconciler's view (a
        crash between storing the last member and publishing, a group completed by a
        dead-lettered member). With `finished_before`, only groups whose last member finished
        before it, so a sweep does not race the normal path's publish of a group just stored.
        At most `limit`, for one pass."""
        q = (
            select(RolloutRow.group_id)
            .outerjoin(GroupRow, GroupRow.group_id == RolloutRow.group_id)
            .where(GroupRow.group_id.is_(None))
            .group_by(RolloutRow.group_id)
            .having(func.count() >= func.max(RolloutRow.group_size))
            .limit(limit)
        )
        if finished_before is not None:
            q = q.having(func.max(RolloutRow.finished_at) < finished_before)
        async with self.sessions() as s:
            return list((await s.execute(q)).scalars().all())

    async def group_members_page(self, group_id: str, after_index: int, limit: int) -> list[Trajectory]:
        """Up to `limit` stored members of a group with sample_index > `after_index`, in order."""
        async with self.sessions() as s:
            rows = (
                (
                    await s.execute(
                        select(RolloutRow)
                        .where(RolloutRow.group_id == group_id, RolloutRow.sample_index > after_index)
                        .order_by(RolloutRow.sample_index)
                        .limit(limit)
                    )
                )
                .scalars()
                .all()
            )
            return await self._assemble(s, rows)

    def _run_trajectories(self, run_id: str, min_reward: float | None, finished_before: float | None):  # type: ignore[no-untyped-def]
        q = select(RolloutRow).where(RolloutRow.run_id == run_id, RolloutRow.status == "ok", RolloutRow.eval.is_(False))
        if finished_before is not None:
            q = q.where(RolloutRow.finished_at < finished_before)
        return q if min_reward is None else q.where(RolloutRow.reward >= min_reward)

    async def count_run_trajectories(self, run_id: str, min_reward: float | None, finished_before: float | None) -> int:
        """Ok training (not evaluation) trajectories of a run with reward >= `min_reward`."""
        q = self._run_trajectories(run_id, min_reward, finished_before).with_only_columns(func.count())
        async with self.sessions() as s:
            return int((await s.execute(q)).scalar_one())

    async def run_trajectories_page(
        self, run_id: str, min_reward: float | None, finished_before: float | None, after: str | None, limit: int
    ) -> list[Trajectory]:
        """Up to `limit` of those trajectories, in rollout-id order after `after`."""
        q = self._run_trajectories(run_id, min_reward, finished_before)
        if after is not None:
            q = q.where(RolloutRow.rollout_id > after)
        async with self.sessions() as s:
            rows = (await s.execute(q.order_by(RolloutRow.rollout_id).limit(limit))).scalars().all()
            return await self._assemble(s, rows)

    async def load_trajectories(
        self, group_ids: Sequence[str], known: dict[str, Trajectory] | None = None
    ) -> dict[str, list[Trajectory]]:
        """Every stored member of each group, ordered by sample index.

        `known` holds trajectories exactly as this process just stored them; only the other
        members are read back from SQL (blobs included), which keeps group assembly cheap when
        a batch completes its own groups.
        """
        known = known or {}
        out: dict[str, list[Trajectory]] = defaultdict(list)
        async with self.sessions() as s:
            missing: list[str] = []
            for chunk in _chunks(list(group_ids)):
                q = select(RolloutRow.rollout_id, RolloutRow.group_id).where(RolloutRow.group_id.in_(chunk))
                for rollout_id, group_id in (await s.execute(q)).all():
                    if rollout_id in known:
                        out[group_id].append(known[rollout_id])
                    else:
                        missing.append(rollout_id)
            for chunk in _chunks(missing):
                rollouts = (await s.execute(select(RolloutRow).where(RolloutRow.rollout_id.in_(chunk)))).scalars().all()
                for traj in await self._assemble(s, rollouts):
                    out[traj.group_id].append(traj)
        for members in out.values():
            members.sort(key=lambda t: t.sample_index)
        return dict(out)

    async def mark_published(self, groups: Sequence[tuple[str, str, str, int]]) -> None:
        rows = [
            {"group_id": g, "run_id": r, "task_id": t, "size": n, "published_at": time.time()} for g, r, t, n in groups
        ]
        async with self.sessions.begin() as s:
            for chunk in _chunks(rows):
                await s.execute(insert_ignore(self.engine, GroupRow), chunk)

    # --- reads -------------------------------------------------------------------------

    async def get_task(self, task_id: str, project: str | None = None) -> TaskView | None:
        """The task; None when unknown or (with `project`) in a run of another project."""
        async with self.sessions() as s:
            task = await s.get(TaskRow, task_id)
            if task is None or not await _in_project(s, task.run_id, project):
                return None
            rollouts = (
                (await s.execute(select(RolloutRow).where(RolloutRow.task_id == task_id).order_by(RolloutRow.sample_index)))
                .scalars()
                .all()
            )
            published = await s.get(GroupRow, task_id) is not None
        status = "pending" if not rollouts else ("done" if len(rollouts) >= task.group_size else "running")
        return TaskView(
            task_id=task.task_id,
            run_id=task.run_id,
            agent=task.agent,
            input=task.input,
            group_size=task.group_size,
            created_at=task.created_at,
            status=status,
            group_published=published,
            eval=bool(task.eval),
            rollouts=[
                RolloutSummary(
                    rollout_id=r.rollout_id,
                    sample_index=r.sample_index,
                    status=r.status,  # type: ignore[arg-type]
                    reward=r.reward,
                    attempt=r.attempt,
                    worker_id=r.worker_id,
                    finished_at=r.finished_at,
                )
                for r in rollouts
            ],
        )

    async def get_trajectory(self, rollout_id: str, project: str | None = None) -> Trajectory | None:
        """The trajectory; None when unknown or (with `project`) of a run of another project."""
        async with self.sessions() as s:
            row = await s.get(RolloutRow, rollout_id)
            if row is None or not await _in_project(s, row.run_id, project):
                return None
            return (await self._assemble(s, [row]))[0]

    async def group_rewards(self, group_ids: Sequence[str]) -> dict[str, float]:
        """Mean final reward of each stored group's members (failed members count as stored)."""
        out: dict[str, float] = {}
        async with self.sessions() as s:
            for chunk in _chunks(list(group_ids)):
                q = (
                    select(RolloutRow.group_id, func.avg(RolloutRow.reward))
                    .where(RolloutRow.group_id.in_(chunk))
                    .group_by(RolloutRow.group_id)
                )
                out.update((g, float(r)) for g, r in (await s.execute(q)).all())
        return out

    async def eval_summaries(self, run_id: str, accuracy_threshold: float = 1.0) -> list[EvalSummary]:
        """A run's evaluation rollouts aggregated per version asked for, oldest version first."""
        passed = case((RolloutRow.reward >= accuracy_threshold, 1), else_=0)
        ok = case((RolloutRow.status == "ok", 1), else_=0)
        # Off version: a generated token from another version. A rollout with no token (failed
        # before any call) ran on no version at all; it counts as failed, not off version.
        off = case(
            (
                (RolloutRow.policy_version != RolloutRow.eval_version)
                | (RolloutRow.newest_version != RolloutRow.eval_version),
                1,
            ),
            else_=0,
        )
        q = (
            select(
                RolloutRow.eval_version,
                func.count(),
                func.sum(ok),
                func.sum(off),
                func.avg(RolloutRow.reward),
                func.sum(passed),
                func.min(RolloutRow.finished_at),
                func.max(RolloutRow.finished_at),
            )
            .where(RolloutRow.run_id == run_id, RolloutRow.eval.is_(True), RolloutRow.eval_version.is_not(None))
            .group_by(RolloutRow.eval_version)
            .order_by(RolloutRow.eval_version)
        )
        evals = (RolloutRow.run_id == run_id, RolloutRow.eval.is_(True), RolloutRow.eval_version.is_not(None))
        calls = (
            select(RolloutRow.eval_version, func.count(), func.sum(func.length(TransitionRow.response_ids)))
            .join(TransitionRow, TransitionRow.rollout_id == RolloutRow.rollout_id)
            .where(*evals)
            .group_by(RolloutRow.eval_version)
        )
        events = (
            select(RolloutRow.eval_version, EventRow.name, func.count(), func.count(func.distinct(EventRow.rollout_id)))
            .join(EventRow, EventRow.rollout_id == RolloutRow.rollout_id)
            .where(*evals)
            .group_by(RolloutRow.eval_version, EventRow.name)
        )
        async with self.sessions() as s:
            rows = (await s.execute(q)).all()
            # Packed int32: 4 bytes a token.
            per_call = {v: (int(n), int(nbytes or 0) // 4) for v, n, nbytes in (await s.execute(calls)).all()}
            named: dict[int, dict[str, tuple[int, int]]] = defaultdict(dict)
            for version, name, count, rollouts in (await s.execute(events)).all():
                named[version][name] = (int(count), int(rollouts))
        return [
            EvalSummary(
                version=version,
                rollouts=int(n),
                ok=int(n_ok),
                off_version=int(n_off),
                reward_mean=float(mean),
                accuracy=int(n_passed) / int(n),
                accuracy_threshold=accuracy_threshold,
                first_at=float(first),
                last_at=float(last),
                calls_mean=per_call.get(version, (0, 0))[0] / int(n),
                response_tokens_mean=per_call[version][1] / per_call[version][0] if per_call.get(version, (0, 0))[0] else 0.0,
                events={name: c for name, (c, _) in sorted(named[version].items())},
                rollouts_with={name: r for name, (_, r) in sorted(named[version].items())},
            )
            for version, n, n_ok, n_off, mean, n_passed, first, last in rows
        ]

    async def count_rollouts(self, run_id: str | None = None) -> int:
        async with self.sessions() as s:
            q = select(func.count()).select_from(RolloutRow)
            if run_id is not None:
                q = q.where(RolloutRow.run_id == run_id)
            return int((await s.execute(q)).scalar_one())

    async def _assemble(self, s, rollouts: Sequence[RolloutRow]) -> list[Trajectory]:  # type: ignore[no-untyped-def]
        ids = [r.rollout_id for r in rollouts]
        transitions: dict[str, list[TransitionRow]] = defaultdict(list)
        rewards: dict[str, list[RewardRow]] = defaultdict(list)
        events: dict[str, list[EventRow]] = defaultdict(list)
        for chunk in _chunks(ids):
            for x in (await s.execute(select(TransitionRow).where(TransitionRow.rollout_id.in_(chunk)))).scalars():
                transitions[x.rollout_id].append(x)
            for w in (await s.execute(select(RewardRow).where(RewardRow.rollout_id.in_(chunk)))).scalars():
                rewards[w.rollout_id].append(w)
            for e in (await s.execute(select(EventRow).where(EventRow.rollout_id.in_(chunk)))).scalars():
                events[e.rollout_id].append(e)
        return [
            records.trajectory_from_rows(r, transitions[r.rollout_id], rewards[r.rollout_id], events[r.rollout_id])
            for r in rollouts
        ]


async def _in_project(s, run_id: str, project: str | None) -> bool:  # type: ignore[no-untyped-def]
    """Whether run `run_id` belongs to `project` (always, when no project is asked for). A run
    with no row at all (trajectories published straight onto the bus, never submitted as
    tasks) is the default project's, like every row stored before tenancy."""
    if project is None:
        return True
    owner = (await s.execute(select(RunRow.project).where(RunRow.run_id == run_id))).scalar_one_or_none()
    return (owner or "default") == project


def _db_reason(exc: BaseException) -> str:
    # The driver's message, not SQLAlchemy's: that one repeats the statement and its
    # parameters (token blobs), far too much for a dead letter's reason.
    orig = getattr(exc, "orig", None)
    return f"{type(exc).__name__}: {orig if orig is not None else exc}"[:2000]


def _fit(text: str, length: int) -> str:
    return text.replace("\x00", "\ufffd")[:length]


def _chunks(items: list, size: int = _ROWS_PER_STATEMENT) -> Iterable[list]:  # type: ignore[type-arg]
    for i in range(0, len(items), size):
        yield items[i : i + size]
