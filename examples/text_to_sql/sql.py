"""SQL out of model text, and safe execution of it.

`execute_sql` never modifies a database and never runs away:

- the file is opened read-only (`file:...?mode=ro` URI) with `PRAGMA query_only`, and an
  authorizer allows reading only (SELECT, column reads, functions, recursive CTEs): ATTACH,
  PRAGMA, writes and transactions are denied before they run;
- the authorizer also denies the functions that turn a few bytes of SQL into a large value
  (`DENIED_FUNCTIONS`: zeroblob, randomblob, printf/format with their width, replace) and
  load_extension/fts3_tokenizer, and SQLite's own limits cap every string or blob at
  `MAX_VALUE_BYTES` and a LIKE/GLOB pattern at `MAX_LIKE_PATTERN`: no value can grow past
  them by any other route (`||` in a recursive CTE, group_concat, hex), and no single function
  call (instr, LIKE), which the progress handler cannot interrupt, runs for long;
- a progress handler interrupts a statement that runs past `timeout_s` (a cross join of every
  table, a recursive CTE without an end); `timeout_s` is capped at `MAX_TIMEOUT_S`. It runs in
  the calling thread, so nothing is left running once `execute_sql` returns;
- at most `max_rows` rows are fetched; a larger result is marked `truncated`; a result over
  `MAX_RESULT_BYTES` (text and blobs together) is an error, not a worker out of memory.

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
MAX_TIMEOUT_S = 10.0  # any timeout asked for is cut to this
DEFAULT_MAX_ROWS = 10_000
# SQLite VM instructions between two deadline checks. Small, because one instruction may be a
# function call over a value of up to MAX_VALUE_BYTES; a Python call per 100 instructions costs
# under 10% on a counting loop (measured).
PROGRESS_EVERY = 100
MAX_VALUE_BYTES = 100_000  # SQLITE_LIMIT_LENGTH: the largest string, blob or row
# SQLITE_LIMIT_LIKE_PATTERN_LENGTH: LIKE/GLOB cost grows with value x pattern length (a 40,000-
# character pattern over a 100 kB value took 2.5 s in one uninterruptible call; 1,000 takes ~60 ms).
MAX_LIKE_PATTERN = 1_000
MAX_SQL_BYTES = 100_000  # SQLITE_LIMIT_SQL_LENGTH: a query far longer than any answer is refused
MAX_RESULT_BYTES = 8_000_000  # text and blob bytes of one fetched result

# Functions that build a large value from a small argument (a size, a width, a pattern to
# multiply), or reach outside SQL (extensions, the FTS tokenizer pointer). Lower case.
DENIED_FUNCTIONS = frozenset(
    {"zeroblob", "randomblob", "printf", "format", "replace", "load_extension", "fts3_tokenizer"}
)

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


def _authorize(action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY  # arg2 is the function's name for SQLITE_FUNCTION
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
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, MAX_LIKE_PATTERN)
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_BYTES)
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.set_authorizer(_authorize)
    return conn


def _value_bytes(row: Row) -> int:
    return sum(len(v) for v in row if isinstance(v, (str, bytes)))


def execute_sql(
    db_path: str | Path, sql: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, max_rows: int = DEFAULT_MAX_ROWS
) -> QueryResult:
    """Run one query read-only on `db_path` within `timeout_s` (at most `MAX_TIMEOUT_S`); at
    most `max_rows` rows and `MAX_RESULT_BYTES`. `db_path` is opened as given: callers taking it
    from a task check it first (`access.allowed_database`)."""
    started = time.monotonic()
    if not sql or not sql.strip():
        return QueryResult(ok=False, error="no SQL query found in the answer")
    if not timeout_s > 0:  # also NaN
        return QueryResult(ok=False, error=f"timeout_s must be > 0, got {timeout_s!r}")
    timeout_s = min(timeout_s, MAX_TIMEOUT_S)
    deadline = started + timeout_s
    try:
        conn = connect_read_only(db_path)
    except sqlite3.Error as exc:
        return QueryResult(ok=False, error=str(exc), elapsed_s=time.monotonic() - started)
    try:
        # A non-zero return interrupts the statement ("interrupted"), reported as a timeout below.
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), PROGRESS_EVERY)
        cursor = conn.execute(sql)
        fetched: list[Row] = []
        size = 0
        while len(fetched) <= max_rows:
            batch = cursor.fetchmany(min(1000, max_rows + 1 - len(fetched)))
            if not batch:
                break
            size += sum(_value_bytes(r) for r in batch)
            if size > MAX_RESULT_BYTES:
                return QueryResult(
                    ok=False, error=f"query result is larger than {MAX_RESULT_BYTES:,} bytes",
                    elapsed_s=time.monotonic() - started,
                )  # fmt: skip
            fetched += batch
        columns = tuple(d[0] for d in cursor.description or ())
        truncated = len(fetched) > max_rows
        rows = tuple(tuple(r) for r in fetched[:max_rows])
        return QueryResult(True, columns, rows, None, truncated, time.monotonic() - started)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as exc:
        error = str(exc)
        if time.monotonic() > deadline and "interrupt" in error.lower():
            error = f"query timed out after {timeout_s:g}s"
        elif "not authorized" in error.lower():
            error = (
                "not authorized: only read-only SELECT queries may run, without "
                + ", ".join(f"{name}()" for name in sorted(DENIED_FUNCTIONS))
            )
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
