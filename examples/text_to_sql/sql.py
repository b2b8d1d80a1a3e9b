"""SQL out of model text, and safe execution of it.

`execute_sql` never modifies a database and never runs away:

- the file is opened read-only (`file:...?mode=ro` URI) with `PRAGMA query_only`, and an
  authorizer allows reading only (SELECT, column reads, functions, recursive CTEs): ATTACH,
  PRAGMA, writes and transactions are denied before they run;
- a progress handler interrupts a statement that runs past `timeout_s` (a cross join of every
  table, a recursive CTE without an end);
- at most `max_rows` rows are fetched; a larger result is marked `truncated`.

Every failure (syntax error, unknown column, timeout, more than one statement, no SQL at all)
comes back as a `QueryResult` with `ok=False` and the error text, which is what the agent
shows its checker and rewriter; nothing raises.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = tuple[Any, ...]

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MAX_ROWS = 10_000
PROGRESS_EVERY = 1000  # SQLite VM instructions between two deadline checks

# Authorizer action codes a read-only query needs; everything else is denied.
_READ_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)

_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S | re.I)
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|$)", re.S)
_SQL_START = re.compile(r"\b(?:SELECT|WITH)\b", re.I)


@dataclass(frozen=True)
class QueryResult:
    """What running one query gave: rows and column names, or the error."""

    ok: bool
    columns: tuple[str, ...] = ()
    rows: tuple[Row, ...] = ()
    error: str | None = None
    truncated: bool = False  # more than max_rows rows: `rows` holds the first max_rows
    elapsed_s: float = 0.0


def extract_sql(text: str) -> str:
    """The SQL query in a model's answer ("" when there is none to find).

    Reasoning in `<think>` blocks is dropped. Then, in order: the last ```sql (or ```sqlite)
    fenced block; the last fenced block of any language; otherwise the text from the first
    SELECT/WITH keyword up to the first blank line. Only the first complete statement is kept
    (up to a `;` outside string literals), without the `;`. A fence left open (the answer ran
    out of tokens) still counts.
    """
    text = _THINK.sub("", text or "")
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    sql_blocks = [body for lang, body in blocks if lang in ("sql", "sqlite")]
    candidates = sql_blocks or [body for _, body in blocks]
    if candidates:
        body = candidates[-1]
    else:
        start = _SQL_START.search(text)
        # Prose usually follows a query after a blank line ("SELECT ...\n\nThis query ...").
        body = text[start.start() :].split("\n\n", 1)[0] if start else text
    return _first_statement(body)


def _first_statement(body: str) -> str:
    for i, char in enumerate(body):
        # complete_statement: a ';' that ends a statement (not one inside a string literal).
        if char == ";" and sqlite3.complete_statement(body[: i + 1]):
            return body[:i].strip()
    return body.strip().rstrip(";").strip()


def read_only_uri(db_path: str | Path) -> str:
    """`file:` URI that opens `db_path` read-only (SQLite then refuses every write)."""
    return Path(db_path).resolve().as_uri() + "?mode=ro"


def _authorize(action: int, *_: Any) -> int:
    return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY


def connect_read_only(db_path: str | Path) -> sqlite3.Connection:
    """A connection to an existing database that can only read it. Raises sqlite3.Error."""
    path = Path(db_path)
    if not path.is_file():
        # mode=ro never creates a file, but say plainly what is missing.
        raise sqlite3.OperationalError(f"database file not found: {path}")
    conn = sqlite3.connect(read_only_uri(path), uri=True, timeout=1.0)
    # Spider-style databases hold the odd non-UTF-8 byte; show it rather than fail the query.
    conn.text_factory = lambda b: b.decode("utf-8", "replace")
    conn.execute("PRAGMA query_only = ON")
    conn.set_authorizer(_authorize)
    return conn


def execute_sql(
    db_path: str | Path, sql: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, max_rows: int = DEFAULT_MAX_ROWS
) -> QueryResult:
    """Run one query read-only on `db_path` within `timeout_s`; at most `max_rows` rows."""
    started = time.monotonic()
    if not sql or not sql.strip():
        return QueryResult(ok=False, error="no SQL query found in the answer")
    deadline = started + timeout_s
    try:
        conn = connect_read_only(db_path)
    except sqlite3.Error as exc:
        return QueryResult(ok=False, error=str(exc), elapsed_s=time.monotonic() - started)
    try:
        # A non-zero return interrupts the statement ("interrupted"), reported as a timeout below.
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), PROGRESS_EVERY)
        cursor = conn.execute(sql)
        fetched = cursor.fetchmany(max_rows + 1)
        columns = tuple(d[0] for d in cursor.description or ())
        truncated = len(fetched) > max_rows
        rows = tuple(tuple(r) for r in fetched[:max_rows])
        return QueryResult(True, columns, rows, None, truncated, time.monotonic() - started)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as exc:
        error = str(exc)
        if time.monotonic() > deadline and "interrupt" in error.lower():
            error = f"query timed out after {timeout_s:g}s"
        elif "not authorized" in error.lower():
            error = "not authorized: only read-only SELECT queries may run"
        return QueryResult(ok=False, error=error, elapsed_s=time.monotonic() - started)
    finally:
        conn.close()


def schema_sql(db_path: str | Path) -> str:
    """The database's CREATE TABLE statements, one per line group, in creation order."""
    conn = connect_read_only(db_path)
    try:
        rows = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL"
            " AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
        ).fetchall()
    finally:
        conn.close()
    return "\n".join(f"{sql.strip()};" for (sql,) in rows)


def _cell(value: Any, width: int) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, bytes):
        text = f"<{len(value)} bytes>"
    else:
        text = str(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_result(result: QueryResult, max_rows: int = 5, width: int = 32) -> str:
    """A short text view of a result for the model: the error, or columns and the first rows."""
    if not result.ok:
        return f"Error: {result.error}"
    total = f"{len(result.rows)}{'+' if result.truncated else ''}"
    lines = [f"Columns: {', '.join(result.columns)}", f"Rows: {total}"]
    lines += [" | ".join(_cell(v, width) for v in row) for row in result.rows[:max_rows]]
    if len(result.rows) > max_rows:
        lines.append(f"... ({len(result.rows) - max_rows} more)")
    return "\n".join(lines)
