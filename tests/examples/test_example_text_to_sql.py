"""The text-to-SQL example: databases, safe execution, SQL extraction, reward, dataset, Spider
loader, the agent's write/check/rewrite loop (scripted model), and one end-to-end run."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from examples.text_to_sql import agent as t2s
from examples.text_to_sql import sql as t2s_sql
from examples.text_to_sql.access import DB_DIR_ENV, DatabaseRefused, allowed_database
from examples.text_to_sql.data import TEMPLATES, Db, answerable, make_dataset
from examples.text_to_sql.databases import DB_IDS, SCHEMAS, content_hash, database_path, memory_database
from examples.text_to_sql.reward import execution_reward, has_order_by, rows_match
from examples.text_to_sql.spider import load_spider
from examples.text_to_sql.sql import QueryResult, execute_sql, extract_sql, format_result, schema_sql
from services.cli.app import load_run_config
from services.cli.client import GatewayClient
from services.rollout import registry
from shared.messages import RunConfig, unpack_i32
from tests.support.agent_stack import assert_captured, run_tasks, samples_of

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "text_to_sql"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_spider(root: Path) -> Path:
    """A tiny Spider-format folder at `root`: dev.json and database/concerts/concerts.sqlite."""
    db_dir = root / "database" / "concerts"
    db_dir.mkdir(parents=True)
    conn = sqlite3.connect(db_dir / "concerts.sqlite")
    conn.execute("CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, age INTEGER)")
    conn.executemany(
        "INSERT INTO singer VALUES (?, ?, ?, ?)",
        [(1, "Joe", "France", 52), (2, "Ann", "Peru", 31), (3, "Lee", "France", 25)],
    )
    conn.commit()
    conn.close()
    examples = [
        {"db_id": "concerts", "question": "How many singers are there?", "query": "SELECT count(*) FROM singer",
         "query_toks": ["SELECT"], "sql": {}},
        {"db_id": "concerts", "question": "Names of singers from France by age.",
         "query": "SELECT name FROM singer WHERE country = 'France' ORDER BY age"},
    ]  # fmt: skip
    (root / "dev.json").write_text(json.dumps(examples))
    return root


@pytest.fixture
def spider_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`make_spider` under tmp_path, its database folder configured as the one the agent may read."""
    root = make_spider(tmp_path / "spider")
    monkeypatch.setenv(DB_DIR_ENV, str(root / "database"))
    return root


# --- databases --------------------------------------------------------------------------


def test_databases_are_built_once_atomically_and_deterministically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAYRL_EXAMPLES_CACHE", str(tmp_path))
    paths = {db_id: database_path(db_id) for db_id in DB_IDS}
    assert len(DB_IDS) >= 3
    for db_id, path in paths.items():
        assert path.parent == tmp_path / "text_to_sql" and content_hash(db_id)[:16] in path.name
        tables = [r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert len(tables) == len(SCHEMAS[db_id]) == 3
        for table in tables:  # same rows as a fresh in-memory build
            disk = sqlite3.connect(path).execute(f"SELECT * FROM {table}").fetchall()
            assert disk == memory_database(db_id).execute(f"SELECT * FROM {table}").fetchall() and disk
    stamp = {p: p.stat().st_mtime_ns for p in paths.values()}
    assert {db_id: database_path(db_id) for db_id in DB_IDS} == paths  # found, not rebuilt
    assert {p: p.stat().st_mtime_ns for p in paths.values()} == stamp
    assert sorted(p.name for p in (tmp_path / "text_to_sql").iterdir()) == sorted(p.name for p in paths.values())
    with pytest.raises(KeyError, match="unknown db_id"):
        database_path("nope")


# --- execution --------------------------------------------------------------------------


def test_execute_sql_reads_and_reports_errors() -> None:
    db = database_path("shop")
    res = execute_sql(db, "SELECT id, name FROM customers ORDER BY id LIMIT 3")
    assert res.ok and res.columns == ("id", "name") and [r[0] for r in res.rows] == [1, 2, 3] and not res.truncated
    bad = execute_sql(db, "SELECT nope FROM customers")
    assert not bad.ok and "no such column" in (bad.error or "")
    assert execute_sql(db, "").error == "no SQL query found in the answer"
    assert not execute_sql(db, "SELECT 1; SELECT 2").ok  # one statement at a time
    missing = execute_sql(db.with_name("missing.sqlite"), "SELECT 1")
    assert not missing.ok and "not found" in (missing.error or "")
    assert not missing.ok and not db.with_name("missing.sqlite").exists()  # read-only mode creates nothing


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM customers",
        "UPDATE products SET price = 0",
        "INSERT INTO customers VALUES (999, 'x', 'y', 2020)",
        "DROP TABLE orders",
        "CREATE TABLE t (x)",
        "PRAGMA query_only = OFF",
        "ATTACH DATABASE 'evil.sqlite' AS evil",
        "BEGIN",
    ],
)
def test_execute_sql_never_modifies_the_database(sql: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where a relative ATTACH would create its file
    db = database_path("shop")
    before = sha256(db)
    res = execute_sql(db, sql)
    assert not res.ok and res.error
    assert sha256(db) == before and not (tmp_path / "evil.sqlite").exists()


def test_execute_sql_time_and_row_limits() -> None:
    db = database_path("library")
    forever = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
    res = execute_sql(db, forever, timeout_s=0.2)
    assert not res.ok and res.error == "query timed out after 0.2s" and res.elapsed_s < 2.0
    many = execute_sql(db, "SELECT * FROM loans", max_rows=10)
    assert many.ok and many.truncated and len(many.rows) == 10
    assert "Rows: 10+" in format_result(many) and "... (5 more)" in format_result(many, max_rows=5)
    assert format_result(execute_sql(db, "SELECT x")).startswith("Error: ")


def test_schema_sql_lists_create_statements() -> None:
    schema = schema_sql(database_path("school"))
    assert schema.count("CREATE TABLE") == 3 and "enrollments" in schema and schema.endswith(";")


@pytest.mark.parametrize(
    ("text", "sql"),
    [
        ("```sql\nSELECT a FROM t;\n```", "SELECT a FROM t"),
        ("Here:\n```SQL\nSELECT 1\n```\nthen\n```sql\nSELECT 2\n```", "SELECT 2"),  # the last sql block
        ("```\nSELECT b FROM t\n```", "SELECT b FROM t"),  # a fence without a language
        ("```python\nx = 1\n```\n```sqlite\nSELECT c FROM t\n```", "SELECT c FROM t"),
        ("```sql\nSELECT d FROM t WHERE", "SELECT d FROM t WHERE"),  # cut off by max_tokens
        ("The answer is SELECT name FROM t WHERE x = 'a;b'; which works", "SELECT name FROM t WHERE x = 'a;b'"),
        ("SELECT e FROM t\n\nThis query returns e.", "SELECT e FROM t"),
        ("with x as (select 1) select * from x;", "with x as (select 1) select * from x"),
        ("<think>maybe SELECT wrong FROM t</think>\nSELECT right FROM t", "SELECT right FROM t"),
        ("no query here", "no query here"),
        ("", ""),
    ],
)
def test_extract_sql(text: str, sql: str) -> None:
    assert extract_sql(text) == sql


# --- reward -----------------------------------------------------------------------------


def test_rows_match_multisets_and_order() -> None:
    assert rows_match([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], ordered=False)
    assert not rows_match([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], ordered=True)
    assert not rows_match([(1,), (1,)], [(1,)], ordered=False)  # duplicates count
    assert not rows_match([(1,), (2,)], [(1,), (1,)], ordered=False)
    assert rows_match([(3,)], [(3.0,)], ordered=True)
    assert rows_match([(1 / 3,)], [(0.3333333333,)], ordered=True)  # rounded to 6 decimals
    assert not rows_match([(1, "a")], [("a", 1)], ordered=False)  # columns by position
    assert not rows_match([("A",)], [("a",)], ordered=False)
    assert rows_match([], [], ordered=False)


def test_has_order_by_ignores_string_literals() -> None:
    assert has_order_by("SELECT a FROM t ORDER  BY a")
    assert has_order_by("select a from t order by a desc limit 1")
    assert not has_order_by("SELECT a FROM t WHERE b = 'order by'")
    assert not has_order_by("SELECT border_by FROM t")


def test_execution_reward() -> None:
    gold = QueryResult(True, ("n",), ((3,), (1,)))
    assert execution_reward(QueryResult(True, ("x",), ((1,), (3,))), gold, "SELECT n FROM t") == 1.0
    assert execution_reward(QueryResult(True, ("x",), ((1,), (3,))), gold, "SELECT n FROM t ORDER BY n DESC") == 0.0
    assert execution_reward(QueryResult(False, error="boom"), gold, "SELECT n FROM t") == 0.0
    assert execution_reward(QueryResult(True, ("x",), ((3,), (1,)), truncated=True), gold, "SELECT n FROM t") == 0.0
    with pytest.raises(ValueError, match="gold query failed"):
        execution_reward(gold, QueryResult(False, error="boom"), "SELECT n FROM t")


# --- dataset ----------------------------------------------------------------------------


def test_dataset_is_deterministic_and_varied() -> None:
    rows = make_dataset(90, seed=3)
    assert rows == make_dataset(90, seed=3) and rows != make_dataset(90, seed=4)
    assert make_dataset(30, seed=3) == rows[:30]
    assert {r["db_id"] for r in rows} == set(DB_IDS)
    assert {r["kind"] for r in rows} >= {"count", "filter", "aggregate", "join", "group_by", "order_limit"}
    assert len({(r["db_id"], r["question"]) for r in rows}) == len(rows)
    assert all(set(r) == {"db_id", "question", "gold_sql", "kind"} for r in rows)
    assert {t.db_id for t in TEMPLATES} == set(DB_IDS)


def test_committed_rows_are_the_generator_output_and_all_answerable() -> None:
    committed = [json.loads(line) for line in (EXAMPLE / "rows.jsonl").read_text().splitlines()]
    assert committed == make_dataset(len(committed), seed=0)
    assert 200 <= len(committed) and (EXAMPLE / "rows.jsonl").stat().st_size < 300_000
    dbs = {db_id: Db(memory_database(db_id)) for db_id in DB_IDS}
    for row in committed:
        gold = execute_sql(database_path(row["db_id"]), row["gold_sql"])
        assert gold.ok and answerable(dbs[row["db_id"]], row["gold_sql"]), row
        assert execution_reward(gold, gold, row["gold_sql"]) == 1.0


# --- Spider -----------------------------------------------------------------------------


def test_load_spider_json(spider_root: Path) -> None:
    rows = load_spider(spider_root, split_file="dev.json")
    db_path = str((spider_root / "database" / "concerts" / "concerts.sqlite").resolve())
    assert rows == [
        {"db_id": "concerts", "question": "How many singers are there?", "gold_sql": "SELECT count(*) FROM singer",
         "db_path": db_path},
        {"db_id": "concerts", "question": "Names of singers from France by age.",
         "gold_sql": "SELECT name FROM singer WHERE country = 'France' ORDER BY age", "db_path": db_path},
    ]  # fmt: skip
    assert load_spider(spider_root, split_file="dev") == rows  # a bare split name finds dev.json
    assert load_spider(spider_root, split_file="dev.json", limit=1) == rows[:1]
    gold = execute_sql(rows[1]["db_path"], rows[1]["gold_sql"])
    assert gold.rows == (("Lee",), ("Joe",))


def test_load_spider_errors(spider_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="split file"):
        load_spider(spider_root, split_file="train_spider.json")
    (spider_root / "bad.json").write_text(json.dumps([{"db_id": "gone", "question": "q", "query": "SELECT 1"}]))
    with pytest.raises(FileNotFoundError, match="'gone' not found"):
        load_spider(spider_root, split_file="bad.json")


def test_load_spider_parquet(spider_root: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    examples = json.loads((spider_root / "dev.json").read_text())
    table = pa.table({k: [e[k] for e in examples] for k in ("db_id", "question", "query")})
    pq.write_table(table, spider_root / "test_dev.parquet")
    assert load_spider(spider_root, split_file="test_dev.parquet") == load_spider(spider_root, "dev.json")
    assert load_spider(spider_root, split_file="test_dev") == load_spider(spider_root, "dev.json")


def test_load_spider_parquet_without_readers_says_what_to_install(
    spider_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (spider_root / "train_spider.parquet").write_bytes(b"PAR1")
    for mod in ("pandas", "pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import` of a None entry raises ImportError
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_spider(spider_root, split_file="train_spider.parquet")


# --- the agent loop, with a scripted model ----------------------------------------------


class ScriptedCtx:
    """Just enough of AgentContext for the loop: scripted answers per role, calls and events logged."""

    def __init__(self, inp: dict[str, Any], script: dict[str, list[Any]]) -> None:
        self.input = inp
        self.model = "scripted"
        self.script = {role: list(answers) for role, answers in script.items()}
        self.calls: list[tuple[str, list[dict[str, str]], int | None]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []

    def openai(self, role: str = "assistant") -> Any:
        async def create(model: str, messages: list[dict[str, str]], max_tokens: int | None = None) -> Any:
            self.calls.append((role, messages, max_tokens))
            text = self.script[role].pop(0)
            if isinstance(text, Exception):
                raise text
            return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=text))])

        return SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))

    def event(self, name: str, step: int | None = None, **data: Any) -> None:
        self.events.append((name, data))


GOLD = {"db_id": "library", "question": "How many authors are from Peru?",
        "gold_sql": "SELECT COUNT(*) FROM authors WHERE country = 'Peru'"}  # fmt: skip


async def test_agent_rewrites_until_the_checker_approves() -> None:
    ctx = ScriptedCtx(
        {**GOLD, "max_turns": 3, "sql_max_tokens": 40},
        {
            "write": ["```sql\nSELECT COUNT(*) FROM writers\n```"],
            "check": ["The table writers does not exist.", "THE QUERY IS CORRECT."],
            "rewrite": ["```sql\nSELECT COUNT(*) FROM authors WHERE country = 'Peru'\n```"],
        },
    )
    assert await t2s.text_to_sql_agent(ctx) == 1.0  # type: ignore[arg-type]
    assert [c[0] for c in ctx.calls] == ["write", "check", "rewrite", "check"]
    assert [c[2] for c in ctx.calls] == [40, t2s.DEFAULT_CHECK_MAX_TOKENS, 40, t2s.DEFAULT_CHECK_MAX_TOKENS]
    assert [name for name, _ in ctx.events] == ["tool_failure", "tool_success"]
    assert ctx.events[0][1]["rows"] == 0 and "no such table" in ctx.events[0][1]["error"]
    assert ctx.events[1][1] == {"tool": "sql", "turn": 1, "ok": True, "error": None, "rows": 1}
    write_prompt, check_prompt, rewrite_prompt = (c[1] for c in ctx.calls[:3])
    assert "CREATE TABLE authors" in write_prompt[-1]["content"] and GOLD["question"] in write_prompt[-1]["content"]
    assert "SELECT COUNT(*) FROM writers" in check_prompt[-1]["content"]
    assert "no such table" in check_prompt[-1]["content"]
    assert rewrite_prompt[: len(write_prompt)] == write_prompt  # the write conversation, continued
    assert rewrite_prompt[-2]["role"] == "assistant" and "does not exist" in rewrite_prompt[-1]["content"]


async def test_agent_stops_at_max_turns_and_scores_the_last_query() -> None:
    ctx = ScriptedCtx(
        {**GOLD, "max_turns": 2},
        {"write": ["SELECT 1"], "check": ["wrong"], "rewrite": ["SELECT COUNT(*) FROM authors"]},
    )
    assert await t2s.text_to_sql_agent(ctx) == 0.0  # type: ignore[arg-type]
    assert [c[0] for c in ctx.calls] == ["write", "check", "rewrite"]  # no check after the last query
    assert [c[2] for c in ctx.calls] == [None, t2s.DEFAULT_CHECK_MAX_TOKENS, None]  # SQL budget: the run's
    assert [name for name, _ in ctx.events] == ["tool_success", "tool_success"]


async def test_agent_approval_ends_the_loop_and_one_turn_has_no_check(spider_root: Path) -> None:
    row = load_spider(spider_root, "dev.json")[1]
    ctx = ScriptedCtx({**row}, {"write": ["SELECT name FROM singer WHERE country = 'France' ORDER BY age"],
                                "check": ["the query is  correct"]})  # fmt: skip
    assert await t2s.text_to_sql_agent(ctx) == 1.0  # type: ignore[arg-type]
    assert [c[0] for c in ctx.calls] == ["write", "check"]
    # One turn: no check. The gold sorts, so the right rows in the wrong order score 0.
    reversed_order = ScriptedCtx(
        {**row, "max_turns": 1}, {"write": ["SELECT name FROM singer WHERE country = 'France' ORDER BY age DESC"]}
    )
    assert await t2s.text_to_sql_agent(reversed_order) == 0.0  # type: ignore[arg-type]
    assert [c[0] for c in reversed_order.calls] == ["write"]


async def test_agent_scores_the_last_query_when_the_context_is_full() -> None:
    import httpx
    import openai

    too_long = openai.BadRequestError(
        "this model's maximum context length is 1024 tokens; the request has 1100 prompt tokens",
        response=httpx.Response(400, request=httpx.Request("POST", "http://inference/v1/chat/completions")),
        body=None,
    )
    ctx = ScriptedCtx(
        {**GOLD, "max_turns": 3},
        {"write": [f"```sql\n{GOLD['gold_sql']}\n```"], "check": ["Wrong."], "rewrite": [too_long]},
    )
    assert await t2s.text_to_sql_agent(ctx) == 1.0  # type: ignore[arg-type]
    assert [c[0] for c in ctx.calls] == ["write", "check", "rewrite"] and len(ctx.events) == 1
    other = openai.BadRequestError("bad request", response=too_long.response, body=None)
    with pytest.raises(openai.BadRequestError):  # any other refusal fails the rollout
        await t2s.text_to_sql_agent(ScriptedCtx(GOLD, {"write": [other]}))  # type: ignore[arg-type]


async def test_agent_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="question"):
        await t2s.text_to_sql_agent(ScriptedCtx({"db_id": "shop"}, {}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="db_id"):
        await t2s.text_to_sql_agent(ScriptedCtx({**GOLD, "db_id": "nope"}, {}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gold query fails"):
        await t2s.text_to_sql_agent(ScriptedCtx({**GOLD, "gold_sql": "SELECT nope"}, {}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_turns"):
        await t2s.text_to_sql_agent(ScriptedCtx({**GOLD, "max_turns": 0}, {}))  # type: ignore[arg-type]


# --- untrusted input: db_path, gold SQL, timeouts, expensive functions ----------------------

FOREVER = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
SECRET = "TOPSECRET-42"

_recording: list[str] | None = None  # paths opened while `opened_files` records (audit hook below)


def _record_opens(event: str, args: tuple[Any, ...]) -> None:
    if _recording is not None and event in ("open", "sqlite3.connect"):
        _recording.append(os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else str(args[0]))


@pytest.fixture
def opened_files() -> Iterator[list[str]]:
    """Every path the process opens during the test (Python's `open` and `sqlite3.connect` audit
    events, from any thread). An audit hook cannot be removed: it is added once and only records
    while a test holds this fixture."""
    global _recording
    if not getattr(sys, "_t2s_open_hook", False):
        sys.addaudithook(_record_opens)
        sys._t2s_open_hook = True  # type: ignore[attr-defined]
    _recording = []
    try:
        yield _recording
    finally:
        _recording = None


def sqlite_file(path: Path, *statements: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path


@pytest.fixture
def db_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A configured database directory (a database, a text file, symlinks pointing out of it)
    and, outside it, a database holding a secret."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    sqlite_file(allowed / "good.sqlite", "CREATE TABLE t (x INTEGER)", "INSERT INTO t VALUES (7)")
    sqlite_file(outside / "secret.sqlite", "CREATE TABLE vault_secret_table (p TEXT)", f"INSERT INTO vault_secret_table VALUES ('{SECRET}')")
    (allowed / "notes.txt").write_text("SQLite format 2 -- not a database\n")
    (allowed / "link.sqlite").symlink_to(outside / "secret.sqlite")
    (allowed / "linkdir").symlink_to(outside, target_is_directory=True)
    (allowed / "inner.sqlite").symlink_to(allowed / "good.sqlite")
    monkeypatch.setenv(DB_DIR_ENV, str(allowed))
    return allowed, outside


@pytest.mark.parametrize(
    ("db_path", "reason"),
    [
        ("{outside}/secret.sqlite", "only the example's generated databases"),
        ("/etc/passwd", "only the example's generated databases"),
        ("{allowed}/../outside/secret.sqlite", "'..' components are not allowed"),
        ("../outside/secret.sqlite", "'..' components are not allowed"),
        ("{allowed}/link.sqlite", "only the example's generated databases"),  # a symlink out of the dir
        ("{allowed}/linkdir/secret.sqlite", "only the example's generated databases"),
        ("{allowed}/notes.txt", "not a SQLite database"),
        ("{allowed}/missing.sqlite", "no such database file"),
        ("{allowed}", "no such database file"),  # the directory itself
    ],
)
async def test_db_path_outside_the_allowed_places_is_refused_unopened(
    db_path: str, reason: str, db_places: tuple[Path, Path], opened_files: list[str]
) -> None:
    allowed, outside = db_places
    path = db_path.format(allowed=allowed, outside=outside)
    ctx = ScriptedCtx({"question": "q?", "gold_sql": "SELECT 1", "db_path": path}, {})
    with pytest.raises(DatabaseRefused, match=reason) as refused:
        await t2s.text_to_sql_agent(ctx)  # type: ignore[arg-type]
    assert ctx.calls == [] and ctx.events == []  # no prompt, so no schema in one
    assert str(allowed) not in str(refused.value).replace(path, "")  # the configured dir is not disclosed
    # Nothing outside the allowed directory was opened, not even to read a header.
    assert [p for p in opened_files if str(outside) in p or "passwd" in p or "secret" in p] == []
    assert any(str(allowed) in p for p in opened_files) == path.endswith("notes.txt")  # the hook sees opens


def test_db_path_inside_the_allowed_places(db_places: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    allowed, outside = db_places
    good = (allowed / "good.sqlite").resolve()
    assert allowed_database(str(allowed / "good.sqlite")) == good
    assert allowed_database("good.sqlite") == good  # relative: under the configured directory
    assert allowed_database(str(allowed / "inner.sqlite")) == good  # a symlink that stays inside
    generated = database_path("shop")
    assert allowed_database(str(generated)) == generated.resolve()
    monkeypatch.setenv(DB_DIR_ENV, os.pathsep.join([str(tmp) for tmp in (outside / "none", allowed)]))
    assert allowed_database(str(allowed / "good.sqlite")) == good  # any of several directories
    monkeypatch.delenv(DB_DIR_ENV)
    assert allowed_database(str(generated)) == generated.resolve()  # generated ones need no setting
    with pytest.raises(DatabaseRefused, match="only the example's generated databases"):
        allowed_database(str(allowed / "good.sqlite"))
    with pytest.raises(DatabaseRefused, match="relative path needs a database directory"):
        allowed_database("good.sqlite")
    # Another file in the generated databases' cache directory is not a generated database.
    stray = sqlite_file(generated.parent / "stray-test.sqlite", "CREATE TABLE t (x)")
    try:
        with pytest.raises(DatabaseRefused, match="only the example's generated databases"):
            allowed_database(str(stray))
    finally:
        stray.unlink()


async def test_agent_runs_on_a_database_in_the_configured_directory(db_places: tuple[Path, Path]) -> None:
    ctx = ScriptedCtx(
        {"question": "x?", "gold_sql": "SELECT x FROM t", "db_path": "good.sqlite", "max_turns": 1},
        {"write": ["SELECT x FROM t"]},
    )
    assert await t2s.text_to_sql_agent(ctx) == 1.0  # type: ignore[arg-type]
    assert "CREATE TABLE t" in ctx.calls[0][1][-1]["content"]


async def test_gold_query_error_text_never_leaves_the_agent(db_places: tuple[Path, Path]) -> None:
    allowed, _ = db_places
    vault = sqlite_file(allowed / "vault.sqlite", "CREATE TABLE u (p TEXT)", f"INSERT INTO u VALUES ('{SECRET}')")
    for gold in (
        "SELECT json_extract('{}', (SELECT p FROM u))",  # SQLite quotes the bad path: the secret
        "SELECT p FROM u WHERE p = 'x' AND zeroblob(1)",
        FOREVER,
    ):
        ctx = ScriptedCtx({"question": "q?", "gold_sql": gold, "db_path": str(vault)}, {})
        with pytest.raises(t2s.GoldQueryFailed, match="gold query fails on vault.sqlite") as failed:
            await t2s.text_to_sql_agent(ctx)  # type: ignore[arg-type]
        # What the worker records as the rollout's error (worker._run_agent): type and message.
        recorded = f"{type(failed.value).__name__}: {failed.value}"
        assert SECRET not in recorded and gold not in recorded and SECRET not in repr(failed.value)
        assert failed.value.__cause__ is None and failed.value.__context__ is None
        assert ctx.calls == []
    # The channel is real: the same query's own error quotes the secret.
    assert SECRET in (execute_sql(vault, "SELECT json_extract('{}', (SELECT p FROM u))").error or "")
    with pytest.raises(ValueError, match="gold query failed") as reward_error:
        execution_reward(QueryResult(True, ("n",), ((1,),)), QueryResult(False, error=SECRET), "SELECT 1")
    assert SECRET not in str(reward_error.value)


def running_execute_sql() -> list[int]:
    """Ids of threads whose stack is inside `execute_sql` right now."""
    code = t2s_sql.execute_sql.__code__
    return [
        tid for tid, frame in sys._current_frames().items()
        if any(f.f_code is code for f, _ in traceback.walk_stack(frame))
    ]  # fmt: skip


def test_a_runaway_query_stops_at_the_timeout_cap() -> None:
    started = time.monotonic()
    res = execute_sql(database_path("library"), FOREVER, timeout_s=1e18)
    elapsed = time.monotonic() - started
    assert res.error == f"query timed out after {t2s_sql.MAX_TIMEOUT_S:g}s" == "query timed out after 10s"
    assert t2s_sql.MAX_TIMEOUT_S <= elapsed < t2s_sql.MAX_TIMEOUT_S + 2.0
    assert not execute_sql(database_path("library"), "SELECT 1", timeout_s=float("nan")).ok


async def test_agent_timeouts_are_capped_and_leave_no_thread_running(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (1e18, float("inf"), float("nan"), 0, -1, t2s_sql.MAX_TIMEOUT_S + 0.5):
        with pytest.raises(ValueError, match="query_timeout_s must be in"):
            t2s.Task.from_input({**GOLD, "query_timeout_s": bad})
    assert t2s.Task.from_input({**GOLD, "query_timeout_s": t2s_sql.MAX_TIMEOUT_S}).query_timeout_s == 10.0
    # The gold query runs at the cap: shrink the cap (in both modules that read it) to keep this fast.
    monkeypatch.setattr(t2s_sql, "MAX_TIMEOUT_S", 0.3)
    monkeypatch.setattr(t2s, "MAX_TIMEOUT_S", 0.3)
    started = time.monotonic()
    with pytest.raises(t2s.GoldQueryFailed):
        await t2s.text_to_sql_agent(ScriptedCtx({**GOLD, "gold_sql": FOREVER, "query_timeout_s": 0.2}, {}))  # type: ignore[arg-type]
    assert time.monotonic() - started < 2.0 and running_execute_sql() == []
    ctx = ScriptedCtx({**GOLD, "max_turns": 1, "query_timeout_s": 0.2}, {"write": [FOREVER]})
    assert await t2s.text_to_sql_agent(ctx) == 0.0  # type: ignore[arg-type]
    assert ctx.events[0][1]["error"] == "query timed out after 0.2s" and running_execute_sql() == []


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT zeroblob(10)",
        "SELECT length(randomblob(10))",
        "SELECT RandomBlob(10)",  # names are case-insensitive
        "SELECT printf('%.*c', 100000000, 'x')",
        "SELECT format('%d', 1)",
        "SELECT replace(name, 'a', name) FROM authors",
        "SELECT load_extension('/tmp/evil.so')",
        "SELECT name FROM authors WHERE id IN (SELECT length(zeroblob(5)))",
    ],
)
def test_memory_heavy_functions_are_denied(sql: str) -> None:
    res = execute_sql(database_path("library"), sql)
    assert not res.ok and (res.error or "").startswith("not authorized:") and "zeroblob()" in (res.error or "")


def test_values_and_results_are_size_capped() -> None:
    db = database_path("library")
    doubling = "WITH RECURSIVE r(s) AS (SELECT 'x' UNION ALL SELECT s || s FROM r) SELECT max(length(s)) FROM r"
    assert execute_sql(db, doubling).error == "string or blob too big"  # not a 1 GB string
    assert execute_sql(db, f"SELECT 'a' LIKE '{'%' * (t2s_sql.MAX_LIKE_PATTERN + 1)}'").error is not None
    big = t2s_sql.MAX_VALUE_BYTES - 1
    wide = (
        f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 200) "
        f"SELECT substr(hex(zeroblob(1)), 1, 1) || (SELECT group_concat(name, '') FROM authors), "
        f"(WITH RECURSIVE r(s) AS (SELECT 'x' UNION ALL SELECT s || s FROM r WHERE length(s) * 2 <= {big}) "
        f"SELECT max(s) FROM r) FROM n"
    )
    assert not execute_sql(db, wide).ok  # zeroblob: denied before it runs
    rows_of_64k = wide.replace("substr(hex(zeroblob(1)), 1, 1) || ", "")
    res = execute_sql(db, rows_of_64k)  # 200 rows x 64 kB: over MAX_RESULT_BYTES
    assert res.error == f"query result is larger than {t2s_sql.MAX_RESULT_BYTES:,} bytes"
    assert execute_sql(db, rows_of_64k.replace("LIMIT 200", "LIMIT 20")).ok  # 1.3 MB is fine


def test_approval_phrase() -> None:
    assert t2s.approved("Looks good. THE QUERY IS CORRECT")
    assert t2s.approved("the query\nis correct.")
    assert not t2s.approved("THE QUERY IS NOT CORRECT: wrong table")
    assert not t2s.approved("")


def test_train_yaml_is_a_valid_run_config() -> None:
    config = RunConfig.model_validate(load_run_config(EXAMPLE / "train.yaml"))
    assert config.agent == t2s.NAME and registry.get(t2s.NAME) is not None
    assert config.trained_roles == "write|rewrite" and config.model == "tiny"
    assert config.training.group_size >= 4 and len(config.dataset) >= 200
    assert {r.on: r.reward for r in config.runtime.air_values()} == {"tool_success": 0.1, "tool_failure": -0.1}


# --- end to end -------------------------------------------------------------------------


@pytest.mark.e2e
def test_text_to_sql_end_to_end(agent_stack: Any, text_to_sql_db_dir: Path, tmp_path: Path) -> None:
    # The worker reads Spider databases only from the directory it was started with.
    spider_root = make_spider(text_to_sql_db_dir / tmp_path.name)
    budget = {"max_turns": 2, "sql_max_tokens": 24, "check_max_tokens": 16}
    inputs = [{**make_dataset(1, seed=0)[0], **budget}, {**load_spider(spider_root, "dev.json")[0], **budget}]
    secret = sqlite_file(tmp_path / "outside.sqlite", "CREATE TABLE vault_secret_table (p TEXT)")
    vault = sqlite_file(
        spider_root / "database" / "vault.sqlite", "CREATE TABLE u (p TEXT)", f"INSERT INTO u VALUES ('{SECRET}')"
    )
    refused = [
        {"question": "q?", "gold_sql": "SELECT 1", "db_path": str(secret)},
        {"question": "q?", "gold_sql": "SELECT json_extract('{}', (SELECT p FROM u))", "db_path": str(vault)},
    ]
    everything = run_tasks(agent_stack, t2s.NAME, inputs + refused, group_size=2)
    trajs, failed = everything[:4], everything[4:]
    # Refused inputs: the reason is recorded, and neither the file's schema nor the gold query's
    # error text reaches what GET /v1/rollouts returns.
    assert [t.status for t in failed] == ["error"] * 4
    assert all("refused: only the example's generated databases" in (t.error or "") for t in failed[:2])
    assert all("gold query fails on vault.sqlite" in (t.error or "") for t in failed[2:])
    client = GatewayClient(agent_stack.gateway_url, api_key=agent_stack.api_key)
    try:
        views = json.dumps([client.rollout(t.rollout_id) for t in failed])
    finally:
        client.close()
    assert SECRET not in views and "vault_secret_table" not in views and all(not t.transitions for t in failed)
    assert len(trajs) == 4
    # The random model never says the approval phrase, so the checker's rejection leads to a rewrite.
    assert any(t.role == "rewrite" for traj in trajs for t in traj.transitions)
    for traj in trajs:
        assert traj.status == "ok", traj.error
        assert_captured(traj)
        roles = [t.role for t in traj.transitions]
        assert roles[:2] == ["write", "check"] and roles in (["write", "check"], ["write", "check", "rewrite"])
        assert all(roles[i - 1] == "check" for i, r in enumerate(roles) if r == "rewrite")
        assert traj.reward in (0.0, 1.0)
        sql_calls = [i for i, r in enumerate(roles) if r in ("write", "rewrite")]
        assert [e.transition for e in traj.events] == sql_calls  # one event per execution, on its call
        assert all(e.name in ("tool_success", "tool_failure") and e.data["ok"] == (e.name == "tool_success")
                   for e in traj.events)  # fmt: skip
        # Only write/rewrite tokens are trained; the checker's never are.
        trained = sum(int(s.loss_mask.sum()) for s in samples_of(traj, "write|rewrite"))
        assert trained == sum(len(unpack_i32(traj.transitions[i].response_ids)) for i in sql_calls) > 0
        for sample in samples_of(traj, "write|rewrite"):
            assert len(sample.loss_mask) == len(sample.tokens)
            assert set(sample.versions[sample.loss_mask == 0].tolist()) <= {-1}
        # The same calls with the checker trained instead: exactly its tokens flip to mask 1.
        check_calls = [i for i, r in enumerate(roles) if r == "check"]
        assert sum(int(s.loss_mask.sum()) for s in samples_of(traj, "check")) == sum(
            len(unpack_i32(traj.transitions[i].response_ids)) for i in check_calls
        )
