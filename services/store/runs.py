"""SQL for training runs: run lifecycle and pacing cursor, named datasets, step metrics, and the
order in which a run's trainer consumed its groups (what replay re-publishes)."""

from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.messages import RUN_ACTIVE, RUN_ENDED, PaceCursor, RunConfig, RunState, RunView, StepMetrics
from services.store import records
from services.store.db import insert_ignore, sessions, upsert
from services.store.tables import DatasetRow, MetricRow, ReplayJobRow, RunRow

_ROWS_PER_STATEMENT = 500


class Refused(Exception):
    """A request the store will not apply; `code` is HTTP-like (404 missing, 409 conflict)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class RunRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = sessions(engine)

    # --- runs --------------------------------------------------------------------------

    async def put_run(self, config: RunConfig, rows: int, project: str = "default") -> RunView:
        """Create a run in state "running" in `project`; the same config again returns the stored run.

        Raises Refused(409) when the run exists with another config or in another project
        (run ids are global; the reason names no project), Refused(400) when the config cannot
        be stored as JSON."""
        try:
            row = records.run_row(config, rows, time.time(), project)
        except ValueError as exc:
            raise Refused(400, f"run config: {exc}") from None
        async with self.sessions.begin() as s:
            created = (await s.execute(insert_ignore(self.engine, RunRow).values(row).returning(RunRow.run_id))).first()
            if created is None and not await self._adopt(s, row):
                existing = await s.get(RunRow, config.run_id)
                if existing is not None and existing.project != project:
                    raise Refused(409, f"run id {config.run_id!r} is taken: choose another")
                _check_same(existing, row)
        view = await self.get_run(config.run_id)
        assert view is not None
        return view

    async def _adopt(self, s: Any, row: dict[str, Any]) -> bool:
        """Turn an ad-hoc task bucket of the same id and project into this run (tasks submitted before it)."""
        result = await s.execute(
            update(RunRow)
            .where(RunRow.run_id == row["run_id"], RunRow.state.is_(None), RunRow.project == row["project"])
            .values(row)
            .execution_options(synchronize_session=False)
        )
        return result.rowcount > 0

    async def get_run(self, run_id: str, project: str | None = None) -> RunView | None:
        """A configured run; None for an unknown id, an ad-hoc task bucket, or (with `project`)
        a run of another project."""
        async with self.sessions() as s:
            row = await s.get(RunRow, run_id)
            if row is None or row.state is None or (project is not None and row.project != project):
                return None
            latest = await _latest_metrics(s, [run_id])
        return records.run_view(row, latest.get(run_id))

    async def list_runs(
        self,
        states: Sequence[RunState],
        limit: int,
        after: tuple[float, str] | None = None,
        project: str | None = None,
    ) -> list[RunView]:
        """Configured runs (of `project`, when given), newest first, optionally only those in
        `states`; with `after` (created_at, run_id of the last run of a previous page), only the
        runs listed after it."""
        q = select(RunRow).where(RunRow.state.is_not(None))
        if project is not None:
            q = q.where(RunRow.project == project)
        if states:
            q = q.where(RunRow.state.in_(list(states)))
        if after is not None:
            created, run_id = after
            q = q.where(or_(RunRow.created_at < created, and_(RunRow.created_at == created, RunRow.run_id > run_id)))
        q = q.order_by(RunRow.created_at.desc(), RunRow.run_id).limit(limit)
        async with self.sessions() as s:
            rows = (await s.execute(q)).scalars().all()
            latest = await _latest_metrics(s, [r.run_id for r in rows])
        return [records.run_view(r, latest.get(r.run_id)) for r in rows]

    async def set_state(
        self, run_id: str, state: RunState, error: str | None, from_states: Sequence[RunState]
    ) -> RunView:
        """Compare-and-set the state in one UPDATE, so two gateways cannot both win a transition."""
        stmt = (
            update(RunRow)
            .where(RunRow.run_id == run_id, RunRow.state.is_not(None))
            .values(state=state, error=error, updated_at=time.time())
            .execution_options(synchronize_session=False)
        )
        if from_states:
            stmt = stmt.where(RunRow.state.in_(list(from_states)))
        async with self.sessions.begin() as s:
            if (await s.execute(stmt)).rowcount == 0:
                current = await s.get(RunRow, run_id)
                if current is None or current.state is None:
                    raise Refused(404, f"run {run_id!r} not found")
                allowed = " or ".join(from_states)
                raise Refused(409, f"run {run_id!r} is {current.state}; only a {allowed} run can become {state}")
        view = await self.get_run(run_id)
        assert view is not None
        return view

    async def active(self, run_ids: Iterable[str]) -> set[str]:
        """Of `run_ids`, the runs a trainer consumes groups for (running or paused)."""
        ids = sorted(set(run_ids))
        if not ids:
            return set()
        q = select(RunRow.run_id).where(RunRow.run_id.in_(ids), RunRow.state.in_(list(RUN_ACTIVE)))
        async with self.sessions() as s:
            return set((await s.execute(q)).scalars().all())

    async def ended_uncleaned(self, ended_before: float, limit: int = 100) -> list[RunView]:
        """Runs that ended before `ended_before` whose bus objects were not cleaned up yet."""
        q = (
            select(RunRow)
            .where(RunRow.state.in_(list(RUN_ENDED)), RunRow.cleaned_at.is_(None), RunRow.updated_at < ended_before)
            .order_by(RunRow.updated_at)
            .limit(limit)
        )
        async with self.sessions() as s:
            rows = (await s.execute(q)).scalars().all()
        return [records.run_view(r, None) for r in rows]

    async def mark_cleaned(self, run_id: str, groups_consumed: int | None) -> None:
        """Record the cleanup (and the trainer's last count of consumed groups, when it had one)."""
        values: dict[str, Any] = {"cleaned_at": time.time()}
        if groups_consumed is not None:
            values["groups_consumed"] = groups_consumed
        async with self.sessions.begin() as s:
            await s.execute(update(RunRow).where(RunRow.run_id == run_id).values(**values))

    async def save_cursor(self, run_id: str, cursor: PaceCursor) -> bool:
        """Store the pacing cursor unless a further one is stored; returns whether it was applied.

        A cursor never moves back: a stale writer (a gateway that lost its lease mid-tick)
        must not make the next one republish groups."""
        stmt = (
            update(RunRow)
            .where(
                RunRow.run_id == run_id,
                RunRow.state.is_not(None),
                RunRow.groups_published <= cursor.groups_published,
            )
            .values(cursor=cursor.model_dump(), groups_published=cursor.groups_published, updated_at=time.time())
            .execution_options(synchronize_session=False)
        )
        async with self.sessions.begin() as s:
            if (await s.execute(stmt)).rowcount > 0:
                return True
            current = await s.get(RunRow, run_id)
        if current is None or current.state is None:
            raise Refused(404, f"run {run_id!r} not found")
        return False

    async def copy_run(self, source: str, into: str) -> None:
        """Create run `into` from `source`'s config in "replay" mode, unless it exists: its
        groups come only from replay (the gateway publishes no rollouts for such a run), the
        same run the gateway's replay endpoint creates before calling replay."""
        async with self.sessions() as s:
            if await s.get(RunRow, into) is not None:
                return
            src = await s.get(RunRow, source)
        if src is None or src.state is None:
            raise Refused(404, f"run {source!r} has no stored config to create run {into!r} from")
        config = RunConfig.model_validate({**src.config, "run_id": into, "mode": "replay"})
        try:
            await self.put_run(config, 0, src.project)  # its size is the replay job's group count, set with the job
        except Refused as exc:
            if exc.code != 409:  # 409: created concurrently (by the gateway or another replay); fine
                raise

    # --- replay jobs -------------------------------------------------------------------

    async def create_replay_job(self, source: str, into: str, group_ids: list[str]) -> ReplayJobRow:
        """The replay job into `into`: created with `group_ids` unless one exists (then that one,
        unchanged: a repeated request resumes, it never starts over). A new job also sets run
        `into`'s size to its group count (what its trainer consumes before finishing), unless
        `into` is `source` itself."""
        now = time.time()
        new = {"into": into, "source": source, "group_ids": group_ids, "cursor": 0, "state": "running",
               "created_at": now, "updated_at": now}  # fmt: skip
        async with self.sessions.begin() as s:
            created = (await s.execute(insert_ignore(self.engine, ReplayJobRow).values(new).returning(ReplayJobRow.into))).first()
            if created is not None and into != source:
                await s.execute(
                    update(RunRow).where(RunRow.run_id == into).values(rows=len(group_ids), updated_at=now)
                    .execution_options(synchronize_session=False)
                )  # fmt: skip
        async with self.sessions() as s:
            job = await s.get(ReplayJobRow, into)
        assert job is not None
        return job

    async def advance_replay_job(self, into: str, cursor: int, done: bool) -> None:
        async with self.sessions.begin() as s:
            await s.execute(
                update(ReplayJobRow).where(ReplayJobRow.into == into, ReplayJobRow.cursor <= cursor)
                .values(cursor=cursor, state="done" if done else "running", updated_at=time.time())
                .execution_options(synchronize_session=False)
            )  # fmt: skip

    async def unfinished_replay_jobs(self) -> list[ReplayJobRow]:
        async with self.sessions() as s:
            return list((await s.execute(select(ReplayJobRow).where(ReplayJobRow.state == "running"))).scalars().all())

    # --- datasets ----------------------------------------------------------------------

    async def put_dataset(self, name: str, rows: list[dict[str, Any]], project: str = "default") -> None:
        """Store rows under `name` in `project` once; the same rows again is a no-op, others are
        refused, and so is a name another project holds (names are global)."""
        try:
            stored = records.json_safe(rows)
        except ValueError as exc:
            raise Refused(400, f"dataset {name!r}: {exc}") from None
        async with self.sessions.begin() as s:
            new = {"name": name, "rows": stored, "created_at": time.time(), "project": project}
            if (await s.execute(insert_ignore(self.engine, DatasetRow).values(new).returning(DatasetRow.name))).first():
                return
            existing = await s.get(DatasetRow, name)
        if existing is not None and existing.project != project:
            raise Refused(409, f"dataset name {name!r} is taken: choose another")
        if existing is not None and existing.rows != stored:
            raise Refused(409, f"dataset {name!r} already exists with different rows ({len(existing.rows)} rows)")

    async def get_dataset(self, name: str, project: str | None = None) -> list[dict[str, Any]] | None:
        """The rows; None for an unknown name or (with `project`) another project's dataset."""
        async with self.sessions() as s:
            row = await s.get(DatasetRow, name)
        return row.rows if row and (project is None or row.project == project) else None

    # --- metrics -----------------------------------------------------------------------

    async def put_metrics(self, items: Sequence[tuple[StepMetrics, int]]) -> None:
        """Upsert steps by (run, step); `int` is the stream sequence, and the highest wins, so
        a re-trained step (trainer restarted from a checkpoint) replaces the stored one."""
        latest: dict[tuple[str, int], dict[str, Any]] = {}
        for m, seq in items:
            key = (m.run_id, m.step)
            # One statement may not touch a row twice (PostgreSQL): keep one row per key.
            if key not in latest or seq >= latest[key]["seq"]:
                latest[key] = records.metric_row(m, seq)
        rows = list(latest.values())
        async with self.sessions.begin() as s:
            for i in range(0, len(rows), _ROWS_PER_STATEMENT):
                stmt = upsert(self.engine, MetricRow, ["run_id", "step"], newer="seq")
                await s.execute(stmt, rows[i : i + _ROWS_PER_STATEMENT])

    async def get_metrics(self, run_id: str, after_step: int, limit: int) -> list[StepMetrics]:
        q = (
            select(MetricRow)
            .where(MetricRow.run_id == run_id, MetricRow.step > after_step)
            .order_by(MetricRow.step)
            .limit(limit)
        )
        async with self.sessions() as s:
            return [records.step_metrics(r) for r in (await s.execute(q)).scalars()]

    async def trained_groups(self, run_id: str, versions: tuple[int, int] | None) -> list[str] | None:
        """Group ids the run's trainer trained, in the order it consumed them (step, then
        position in the step), each once; None when the run has no stored metrics at all."""
        q = select(MetricRow.step, MetricRow.version, MetricRow.group_ids).where(MetricRow.run_id == run_id)
        async with self.sessions() as s:
            steps = (await s.execute(q.order_by(MetricRow.step))).all()
        if not steps:
            return None
        low, high = versions if versions else (None, None)
        ordered: dict[str, None] = {}  # insertion-ordered set: a group trained twice goes once, first
        for _, version, group_ids in steps:
            if low is None or low <= version <= high:  # type: ignore[operator]
                ordered.update(dict.fromkeys(group_ids))
        return list(ordered)


def _check_same(existing: RunRow | None, wanted: dict[str, Any]) -> None:
    """Refuse (409) a put_run whose config or dataset size differs from the stored run's."""
    assert existing is not None  # the insert conflicted, so the row exists (runs are never deleted)
    # Re-validated, so fields a newer RunConfig added (with defaults) do not count as changes.
    stored = records.json_safe(RunConfig.model_validate(existing.config).model_dump(mode="json"))
    new = wanted["config"]
    differs = sorted(k for k in stored.keys() | new.keys() if stored.get(k) != new.get(k))
    # A replay run's size is set by its replay job, after whoever created the run.
    if existing.rows != wanted["rows"] and new.get("mode") != "replay":
        differs.append("rows")
    if differs:
        raise Refused(
            409, f"run {wanted['run_id']!r} already exists with a different config (differs in: {', '.join(differs)})"
        )


async def _latest_metrics(s: Any, run_ids: list[str]) -> dict[str, MetricRow]:
    """The highest stored step of each run."""
    if not run_ids:
        return {}
    top = (
        select(MetricRow.run_id, func.max(MetricRow.step).label("step"))
        .where(MetricRow.run_id.in_(run_ids))
        .group_by(MetricRow.run_id)
        .subquery()
    )
    q = select(MetricRow).join(top, and_(MetricRow.run_id == top.c.run_id, MetricRow.step == top.c.step))
    return {r.run_id: r for r in (await s.execute(q)).scalars()}
