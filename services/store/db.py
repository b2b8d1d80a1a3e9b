"""Database engine: SQLite (aiosqlite) by default, PostgreSQL (asyncpg) when the URL says so;
which database errors are about a row (`is_row_error`) and which are transient."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from sqlalchemy import Connection, event, inspect, text
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.schema import CreateColumn
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.sql import Insert

from services.store.tables import Base


def create_engine(url: str) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
    # WAL lets the query API read while the consumer writes; NORMAL sync is durable in WAL mode
    # up to the last checkpointed transaction (a power cut, not a process crash, can lose the tail).
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


async def create_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.run_sync(_add_missing_columns)
        await conn.run_sync(_add_missing_indexes)


def _add_missing_columns(conn: Connection) -> None:
    """`create_all` never alters an existing table: add the columns this version introduced to
    a database an older version created. Only nullable or server-defaulted columns are ever
    added to a table, so existing rows stay valid."""
    inspector = inspect(conn)
    prep = conn.dialect.identifier_preparer
    guard = " IF NOT EXISTS" if conn.dialect.name == "postgresql" else ""  # two stores starting at once
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not (column.nullable or column.server_default is not None):
                raise RuntimeError(f"cannot add required column {table.name}.{column.name} to an existing table")
            ddl = CreateColumn(column).compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {prep.format_table(table)} ADD COLUMN{guard} {ddl}"))


def _add_missing_indexes(conn: Connection) -> None:
    """`create_all` skips the indexes of a table that already exists: create those a newer
    version declares (after their columns exist)."""
    for table in Base.metadata.sorted_tables:
        for index in table.indexes:
            index.create(conn, checkfirst=True)


def sessions(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)


def insert_ignore(engine: AsyncEngine, table: Any) -> Insert:
    """`INSERT ... ON CONFLICT DO NOTHING` for the engine's dialect: the idempotent upsert."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


def upsert(engine: AsyncEngine, table: Any, keys: Sequence[str], newer: str | None = None) -> Insert:
    """`INSERT ... ON CONFLICT (keys) DO UPDATE` every other column: the incoming row replaces
    the stored one. With `newer`, only when the incoming row's `newer` column is >= the stored
    one, so an older message arriving late cannot undo a newer write."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(table)
    columns = table.__table__.c
    update = {c.name: stmt.excluded[c.name] for c in columns if c.name not in keys}
    where = columns[newer] <= stmt.excluded[newer] if newer else None
    return stmt.on_conflict_do_update(index_elements=list(keys), set_=update, where=where)


# SQLSTATE classes about the row itself: 22 data exception (too long, NUL byte, bad JSON),
# 23 integrity constraint violation (NOT NULL, unique, foreign key).
_ROW_SQLSTATE_CLASSES = ("22", "23")


def is_row_error(exc: BaseException) -> bool:
    """True when the database refused the data (retrying the same row fails the same way):
    the row is isolated and dead-lettered. Everything else a database raises (connection lost,
    locked, out of resources, a missing table) is transient: the batch is retried later and
    no durable state changes because of it.

    asyncpg's data errors reach SQLAlchemy as a plain DBAPIError, so the SQLSTATE decides there;
    SQLite reports a NaN stored as NULL as an IntegrityError."""
    if isinstance(exc, (IntegrityError, DataError)):
        return True
    if isinstance(exc, DBAPIError):
        state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        return isinstance(state, str) and state[:2] in _ROW_SQLSTATE_CLASSES
    if isinstance(exc, StatementError):  # a bound value the driver could not take
        return isinstance(exc.orig, (ValueError, TypeError))
    return isinstance(exc, ValueError)
