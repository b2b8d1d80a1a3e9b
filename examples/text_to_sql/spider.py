"""Spider-format data as agent inputs: the same row shape as the generated dataset.

Spider (Yu et al., 2018) ships as a folder:

    <root>/train_spider.json   JSON list of {"db_id", "question", "query", ...}
    <root>/dev.json
    <root>/database/<db_id>/<db_id>.sqlite

Some redistributions ship the splits as Parquet instead (`train_spider.parquet`,
`test_dev.parquet`, ...) with the columns db_id, question, query; reading those needs pandas
or pyarrow, imported only then. Nothing is downloaded here: point `load_spider` at a copy you
have.

    rows = load_spider("/data/spider", split_file="dev.json")
    # [{"db_id": "concert_singer", "question": "...", "gold_sql": "SELECT ...",
    #   "db_path": "/data/spider/database/concert_singer/concert_singer.sqlite"}, ...]

`db_path` is absolute, so the rows work from any worker that sees the same path and allows it:
the agent opens only files under the worker's `RELAYRL_TEXT_TO_SQL_DB_DIR` (set it to the
`database/` folder, e.g. `RELAYRL_TEXT_TO_SQL_DB_DIR=/data/spider/database`; see `access.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPLIT_SUFFIXES = (".json", ".parquet")
REQUIRED = ("db_id", "question", "query")


def _split_path(root: Path, split_file: str | Path) -> Path:
    """The split file: as given (relative to `root`), or `root/<name>.json|.parquet` for a bare name."""
    path = Path(split_file)
    path = path if path.is_absolute() else root / path
    if path.is_file() or path.suffix in SPLIT_SUFFIXES:
        return path
    for suffix in SPLIT_SUFFIXES:
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    return path


def _read_json(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
    return data


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pandas as pd
    except ImportError:
        pd = None
    if pd is not None:
        return pd.read_parquet(path, columns=list(REQUIRED)).to_dict(orient="records")  # type: ignore[no-any-return]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {path.name} needs pandas or pyarrow: pip install pyarrow (or pandas with pyarrow)"
        ) from None
    return pq.read_table(path, columns=list(REQUIRED)).to_pylist()  # type: ignore[no-any-return]


def load_spider(
    path: str | Path,
    split_file: str | Path = "dev.json",
    database_dir: str | Path | None = None,
    limit: int | None = None,
) -> list[dict[str, str]]:
    """Rows `{db_id, question, gold_sql, db_path}` from a Spider-format folder.

    `split_file`: `train_spider.json`, `dev.json`, a Parquet file (`train_spider.parquet`,
    `test_dev.parquet`), or a bare name that is looked up with either suffix; relative to
    `path` unless absolute. `database_dir` defaults to `path/database`. Every row's database
    must exist (`<database_dir>/<db_id>/<db_id>.sqlite`): a missing one raises, naming it.
    """
    root = Path(path)
    split = _split_path(root, split_file)
    if not split.is_file():
        raise FileNotFoundError(f"Spider split file not found: {split}")
    examples = _read_parquet(split) if split.suffix == ".parquet" else _read_json(split)
    databases = Path(database_dir) if database_dir is not None else root / "database"
    rows: list[dict[str, str]] = []
    for i, ex in enumerate(examples[:limit] if limit is not None else examples):
        missing = [k for k in REQUIRED if not ex.get(k)]
        if missing:
            raise ValueError(f"{split.name} example {i} lacks {missing}")
        db_id = str(ex["db_id"])
        db_path = (databases / db_id / f"{db_id}.sqlite").resolve()
        if not db_path.is_file():
            raise FileNotFoundError(f"{split.name} example {i}: database {db_id!r} not found at {db_path}")
        rows.append(
            {"db_id": db_id, "question": str(ex["question"]), "gold_sql": str(ex["query"]), "db_path": str(db_path)}
        )
    return rows
