"""A database an older relayrl created gets this version's columns and indexes at start."""

from __future__ import annotations

from sqlalchemy import inspect, text

from services.store.db import create_engine, create_schema


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
