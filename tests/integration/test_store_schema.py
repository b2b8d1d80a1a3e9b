"""A database an older relayrl created gets this version's columns and indexes at start."""

from __future__ import annotations

from sqlalchemy import inspect, text

from shared.messages import RunConfig
from shared.store_api import CreateKey
from services.store.db import create_engine, create_schema
from services.store.keys import KeyRepository
from services.store.runs import RunRepository


async def test_create_schema_upgrades_an_older_database(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await create_schema(engine)
        async with engine.begin() as conn:  # what the previous version's schema lacked
            await conn.execute(text("DROP INDEX ix_rollouts_run_eval_version"))
            for column in ("eval_version", "newest_version"):
                await conn.execute(text(f"ALTER TABLE rollouts DROP COLUMN {column}"))
            await conn.execute(text("DROP TABLE events"))
        await create_schema(engine)
        await create_schema(engine)  # and again: nothing left to add

        def shape(conn):  # type: ignore[no-untyped-def]
            insp = inspect(conn)
            columns = {c["name"] for c in insp.get_columns("rollouts")}
            indexes = {i["name"] for i in insp.get_indexes("rollouts")}
            return columns, indexes, insp.has_table("events")

        async with engine.connect() as conn:
            columns, indexes, has_events = await conn.run_sync(shape)
        assert {"eval", "eval_version", "policy_version", "newest_version"} <= columns
        assert "ix_rollouts_run_eval_version" in indexes and has_events
    finally:
        await engine.dispose()


async def test_runs_stored_before_tenancy_belong_to_the_default_project(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await create_schema(engine)
        runs = RunRepository(engine)
        await runs.put_run(RunConfig(run_id="old", agent="copy", dataset=[{"text": "a"}]), 1)
        async with engine.begin() as conn:  # the schema before projects and API keys
            await conn.execute(text("DROP INDEX ix_runs_project_created"))
            await conn.execute(text("ALTER TABLE runs DROP COLUMN project"))
            await conn.execute(text("ALTER TABLE datasets DROP COLUMN project"))
            await conn.execute(text("DROP TABLE api_keys"))
        await create_schema(engine)

        old = await runs.get_run("old", project="default")
        assert old is not None and old.project == "default"
        assert await runs.get_run("old", project="other") is None
        assert [r.run_id for r in await runs.list_runs([], 10, project="default")] == ["old"]
        key = await KeyRepository(engine).create(
            CreateKey(key_id="0123456789ab", secret_hash="0" * 64, project="default", scope="read")
        )
        assert key.revoked_at is None
    finally:
        await engine.dispose()
