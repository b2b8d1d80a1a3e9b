"""Which SQLite files a text-to-SQL task may name in its `db_path`.

A task's input comes from whoever can submit tasks, and the agent puts the database's schema
into the prompt that `GET /v1/rollouts` returns, so `db_path` must not reach arbitrary files on
the worker. `allowed_database(db_path)` accepts exactly:

- a database this example generated (`databases.generated_path(db_id)` for each `db_id`), and
- a SQLite file under a directory the operator configured on the worker:
  `RELAYRL_TEXT_TO_SQL_DB_DIR` (several directories separated by `os.pathsep`), e.g. the
  `database/` folder of a Spider copy. A relative `db_path` is taken under the first of them.

Everything else is refused with `DatabaseRefused` (a `ValueError`, so the rollout records it as
its error) saying why: an empty path, a `..` component, a path (or a symlink's target) outside
those places, a missing or non-regular file, a file that does not start with SQLite's header.
The place is decided on the fully resolved path before anything is opened, so a refused file
outside the allowed places is never opened; only a file inside them has its 16-byte header read.
The configured directories are not named in the refusal: a task submitter learns nothing about
the worker's file system.
"""

from __future__ import annotations

import os
from pathlib import Path

from examples.text_to_sql.databases import DB_IDS, generated_path

DB_DIR_ENV = "RELAYRL_TEXT_TO_SQL_DB_DIR"
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file


class DatabaseRefused(ValueError):
    """A task's `db_path` names a file the example may not open; the message says why."""


def allowed_dirs() -> tuple[Path, ...]:
    """The configured database directories, resolved (read at each call: tests and operators
    may change the setting without restarting anything that imported this module)."""
    raw = os.environ.get(DB_DIR_ENV, "")
    return tuple(Path(part).expanduser().resolve() for part in raw.split(os.pathsep) if part.strip())


def _generated() -> frozenset[Path]:
    return frozenset(generated_path(db_id).resolve() for db_id in DB_IDS)


def allowed_database(db_path: str | os.PathLike[str]) -> Path:
    """The resolved SQLite file `db_path` names, if a task may use it; else `DatabaseRefused`."""
    raw = os.fspath(db_path)
    if not raw.strip() or "\x00" in raw:
        raise DatabaseRefused(f"db_path {raw!r} refused: not a file path")
    path = Path(raw).expanduser()
    # Refused even when it would resolve inside an allowed directory: a path that climbs out and
    # back in is never what a dataset row means, and refusing it outright is easy to explain.
    if ".." in path.parts:
        raise DatabaseRefused(f"db_path {raw!r} refused: '..' components are not allowed")
    dirs = allowed_dirs()
    if not path.is_absolute():
        if not dirs:
            raise DatabaseRefused(
                f"db_path {raw!r} refused: a relative path needs a database directory on the worker ({DB_DIR_ENV})"
            )
        path = dirs[0] / path
    # resolve() follows every symlink (lstat/readlink only, nothing is opened): a link inside an
    # allowed directory that points elsewhere is judged by where it points.
    real = path.resolve()
    if real not in _generated() and not any(real.is_relative_to(d) for d in dirs):
        raise DatabaseRefused(
            f"db_path {raw!r} refused: only the example's generated databases and SQLite files under the "
            f"worker's configured database directory ({DB_DIR_ENV}) may be used"
        )
    if not real.is_file():
        raise DatabaseRefused(f"db_path {raw!r} refused: no such database file")
    with real.open("rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise DatabaseRefused(f"db_path {raw!r} refused: not a SQLite database")
    return real
