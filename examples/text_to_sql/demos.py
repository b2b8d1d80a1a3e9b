"""SFT warm-start data for the text-to-SQL agent: imperfect demonstrations and a held-out split.

A demonstration is one LLM call of the agent (`agent.py`), in OpenAI chat format: the messages
the agent sends for that role, exactly as its builders make them, with the model's reply as
the last message, `{"messages": [...], "meta": {...}}`:

- `write`: `write_messages(schema, question)` + "```sql\\n<SQL>\\n```";
- `check`: `check_messages(...)` on a query and what the agent's own executor (`execute_sql`)
  returned for it + a verdict: `APPROVAL`, or one sentence on what is wrong;
- `rewrite`: `rewrite_messages(...)` (the write conversation, the rejected answer, its result,
  the verdict) + a new query in a ```sql block.

Demonstrations come in episodes that follow the agent's loop (write, then check and rewrite
until the checker approves or `DEFAULT_MAX_TURNS` queries were written), so each role sees the
inputs it would see when the agent runs. `meta` (ignored by the SFT trainer) holds `role`,
`correct` (for write/rewrite: the query's result matches the gold's, per
`reward.execution_reward`; for check: the verdict is right), `episode`, `db_id`, `kind` and
`gold_sql`.

Real demonstration data is imperfect, and SFT data that was perfect would leave RL nothing to
learn, so `DemoMix` sets how imperfect: the share of written queries with a plausible mistake
(`mistakes`: a wrong column, a condition left out or turned around, a wrong aggregate, the
wrong sort direction, IN for NOT IN, DISTINCT forgotten, or a misspelt table or column that
makes the query fail, at half the weight of each other kind; always really wrong, checked by
running it), the share of wrong
verdicts (approving a wrong query, or rejecting a right one with a made-up complaint), and the
share of rewrites still wrong. With the defaults a perfect imitator writes a right query 30%
of the time, and the whole loop ends right `expected_accuracy(DemoMix())` = 43.1% of the time.

`eval_rows(n)` is a held-out split for evaluating the agent: rows as `data.make_dataset` makes
them, from their own seed (`EVAL_SEED`). The question space is small (about 730 questions over
the three databases), so evaluation owns a fixed share of it: among the questions not in the
RL rows (`rows.jsonl`), one in `HELD_OUT_BUCKETS`, chosen by hash (`reserved`): 202 questions.
No demonstration of any seed asks a reserved question, and no RL row is reserved.

    python -m examples.text_to_sql.demos demos --n 2000 --seed 1 > demos.jsonl
    python -m examples.text_to_sql.demos eval --n 100 > eval.jsonl
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Iterator

from examples.text_to_sql.agent import (
    APPROVAL,
    DEFAULT_MAX_TURNS,
    check_messages,
    rewrite_messages,
    write_messages,
)
from examples.text_to_sql.data import make_dataset
from examples.text_to_sql.databases import database_path, memory_database
from examples.text_to_sql.reward import execution_reward
from examples.text_to_sql.sql import QueryResult, execute_sql, extract_sql, schema_sql
from examples.splits_cli import write_split

Row = dict[str, Any]

EVAL_SEED = 7919
HELD_OUT_BUCKETS = 2  # of the questions outside the RL rows, one in this many is reserved for evaluation
RL_ROWS = Path(__file__).with_name("rows.jsonl")
STREAM_BLOCK = 150  # rows per make_dataset call: 50 per database, always within its question space
MAX_EVAL_BLOCKS = 120  # blocks drawn while collecting held-out rows (all 202 took 57 from EVAL_SEED)


@dataclass(frozen=True)
class DemoMix:
    """How imperfect the demonstrations are; each a probability.

    `wrong_write`: a written query has a plausible mistake (the write step's imitation accuracy
    is 1 - this). `wrong_verdict`: the checker's verdict is wrong, approving a wrong query or
    rejecting a right one. `unfixed_rewrite`: a rewrite is still wrong (a new mistake, maybe
    the same one again). The defaults leave the loop right ~43% of the time under imitation,
    so RL can still win most of the rest.
    """

    wrong_write: float = 0.7
    wrong_verdict: float = 0.25
    unfixed_rewrite: float = 0.75

    def __post_init__(self) -> None:
        for name in ("wrong_write", "wrong_verdict", "unfixed_rewrite"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}: a probability must be within [0, 1], got {p}")


def expected_accuracy(mix: DemoMix, max_turns: int = DEFAULT_MAX_TURNS) -> float:
    """The share of episodes whose last query is right for a perfect imitator of `mix` running
    the agent's loop (write, then check / rewrite while rejected, `max_turns` queries at most)."""
    right = 1.0 - mix.wrong_write  # the query under review is right (and the episode still open)
    open_ = 1.0  # the episode is still open
    done_right = 0.0
    for _ in range(1, max_turns):
        approved_right = right * (1.0 - mix.wrong_verdict)
        approved_wrong = (open_ - right) * mix.wrong_verdict
        done_right += approved_right
        open_ -= approved_right + approved_wrong
        right = open_ * (1.0 - mix.unfixed_rewrite)
    return done_right + right


# --- the databases, as the agent sees them ------------------------------------------------


@functools.cache
def schema(db_id: str) -> str:
    """The schema text the agent puts in its prompts for database `db_id`."""
    return schema_sql(database_path(db_id))


@functools.cache
def run(db_id: str, sql: str) -> QueryResult:
    """`sql`'s result on `db_id`, by the agent's own executor (cached: demos repeat queries)."""
    return execute_sql(database_path(db_id), sql)


@functools.cache
def columns(db_id: str) -> dict[str, dict[str, str]]:
    """table -> column -> declared type, of database `db_id`."""
    conn = memory_database(db_id)
    try:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")]
        return {t: {c[1]: c[2] for c in conn.execute(f"PRAGMA table_info({t})")} for t in tables}
    finally:
        conn.close()


def is_right(db_id: str, sql: str, gold_sql: str) -> bool:
    """Whether `sql` earns reward 1 against `gold_sql` (the agent's reward function)."""
    return execution_reward(run(db_id, sql), run(db_id, gold_sql), gold_sql) == 1.0


# --- mistakes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mistake:
    """A wrong query and what a reviewer who caught it would say."""

    kind: str
    sql: str
    feedback: str


_CONDITION = re.compile(r"(?P<col>(?:\w+\.)?\w+) (?P<op>=|<|>|<=|>=) (?P<val>'(?:[^']|'')*'|\d+(?:\.\d+)?)")
_AGGREGATE = re.compile(r"\b(AVG|SUM|MAX|MIN)\(")
_TABLE = re.compile(r"\b(?:FROM|JOIN) (\w+)(?: (?!ON\b|WHERE\b|JOIN\b|GROUP\b|ORDER\b|LIMIT\b)(\w+))?")
_REF = re.compile(r"\b(?:(\w+)\.)?(\w+)\b(?!\s*\()")
_AGG_SWAPS = {"AVG": "SUM", "SUM": "AVG", "MAX": "MIN", "MIN": "MAX"}
_AGG_WORDS = {"AVG": "the average", "SUM": "the total", "MAX": "the largest value", "MIN": "the smallest value"}
_FLIPS = {"<": (">", "<="), ">": ("<", ">="), "<=": (">=", "<"), ">=": ("<=", ">")}
# What a checker says when it rejects a right query: complaints that sound like reviews.
FALSE_ALARMS = (
    "It should use DISTINCT: the same row can come back more than once.",
    "The WHERE condition is too loose, so it returns rows the question does not ask for.",
    "It joins the tables on the wrong columns, so the rows are paired up wrongly.",
)


def _numeric(declared: str) -> bool:
    return declared.upper() in ("INTEGER", "REAL")


def _aliases(sql: str) -> dict[str, str]:
    """Name or alias -> table, for the tables `sql` reads."""
    out: dict[str, str] = {}
    for table, alias in _TABLE.findall(sql):
        out[table] = table
        if alias:
            out[alias] = table
    return out


def _column_mistakes(db_id: str, sql: str) -> list[Mistake]:
    """A wrong column of the same table (and kind of value) in the SELECT list."""
    head = re.match(r"SELECT (?:DISTINCT )?(.*?) FROM ", sql)
    if head is None:
        return []
    tables, aliases = columns(db_id), _aliases(sql)
    single = [t for t in aliases.values() if t in tables]
    out = []
    for ref in _REF.finditer(head.group(1)):
        prefix, col = ref.group(1), ref.group(2)
        table = aliases.get(prefix) if prefix else (single[0] if len(set(single)) == 1 else None)
        if table not in tables or col not in tables[table]:
            continue
        for other, declared in tables[table].items():
            if other == col or other == "id" or other.endswith("_id"):
                continue
            if _numeric(declared) != _numeric(tables[table][col]):
                continue
            start, end = head.start(1) + ref.start(2), head.start(1) + ref.end(2)
            wrong = sql[:start] + other + sql[end:]
            out.append(Mistake("column", wrong, f"It returns {other} where the question asks for {col}."))
    return out


def _condition_mistakes(sql: str) -> list[Mistake]:
    """A condition of the question left out, or its comparison turned around or off by its boundary."""
    out = []
    for m in _CONDITION.finditer(sql):
        before, cond, after = sql[: m.start()], m.group(0), sql[m.end() :]
        if before.endswith(" AND "):
            dropped = before[: -len(" AND ")] + after
        elif after.startswith(" AND "):
            dropped = before + after[len(" AND ") :]
        elif before.endswith(" WHERE "):
            dropped = before[: -len(" WHERE ")] + after
        else:
            dropped = None
        if dropped is not None:
            out.append(Mistake("condition", dropped, f"It leaves out the condition {cond} that the question asks for."))
        for op in _FLIPS.get(m.group("op"), ()):
            turned = f"{m.group('col')} {op} {m.group('val')}"
            feedback = f"It filters on {turned}; the question needs {cond}."
            out.append(Mistake("comparison", before + turned + after, feedback))
    return out


def _aggregate_mistakes(sql: str) -> list[Mistake]:
    out = []
    for m in _AGGREGATE.finditer(sql):
        old, new = m.group(1), _AGG_SWAPS[m.group(1)]
        wrong = sql[: m.start(1)] + new + sql[m.end(1) :]
        out.append(Mistake("aggregate", wrong, f"It computes {_AGG_WORDS[new]} instead of {_AGG_WORDS[old]}."))
    for m in re.finditer(r"COUNT\(DISTINCT ", sql):
        wrong = sql[: m.start()] + "COUNT(" + sql[m.end() :]
        out.append(Mistake("aggregate", wrong, "It counts the same one more than once; count distinct values."))
    return out


def _shape_mistakes(sql: str) -> list[Mistake]:
    """The wrong sort direction, IN for NOT IN, DISTINCT forgotten."""
    out = []
    for m in re.finditer(r"\b(ASC|DESC)\b", sql):
        other = "ASC" if m.group(1) == "DESC" else "DESC"
        out.append(Mistake("order", sql[: m.start()] + other + sql[m.end() :], "It sorts in the wrong direction."))
    for m in re.finditer(r" NOT IN ", sql):
        out.append(Mistake(
            "negation", sql[: m.start()] + " IN " + sql[m.end() :],
            "It keeps the rows found by the subquery; the question asks for the ones that are not.",
        ))  # fmt: skip
    if sql.startswith("SELECT DISTINCT "):
        wrong = "SELECT " + sql[len("SELECT DISTINCT ") :]
        feedback = "It lists the same value more than once; the question asks for each once."
        out.append(Mistake("distinct", wrong, feedback))
    return out


def _typo_mistakes(db_id: str, sql: str) -> list[Mistake]:
    """A table name in the singular, or a selected column in the plural: the query fails."""
    out = []
    for m in re.finditer(r"\b(FROM|JOIN) (\w+)", sql):
        table = m.group(2)
        if table.endswith("s"):
            wrong = sql[: m.start(2)] + table[:-1] + sql[m.end(2) :]
            out.append(Mistake("typo", wrong, f"The query fails: the table is called {table}."))
    head = re.match(r"SELECT (?:DISTINCT )?(.*?) FROM ", sql)
    if head is None:
        return out
    known = {c for cols in columns(db_id).values() for c in cols}
    for ref in _REF.finditer(head.group(1)):
        if ref.group(2) in known:
            start, end = head.start(1) + ref.start(2), head.start(1) + ref.end(2)
            wrong = sql[:start] + ref.group(2) + "s" + sql[end:]
            out.append(Mistake("typo", wrong, f"The query fails: the column is called {ref.group(2)}."))
    return out


@functools.cache
def mistakes(db_id: str, gold_sql: str) -> dict[str, tuple[Mistake, ...]]:
    """Plausible wrong versions of `gold_sql`, by kind of mistake. Every one is really wrong:
    a typo fails to run, any other runs and returns something the reward does not accept."""
    candidates = [
        *_column_mistakes(db_id, gold_sql),
        *_condition_mistakes(gold_sql),
        *_aggregate_mistakes(gold_sql),
        *_shape_mistakes(gold_sql),
        *_typo_mistakes(db_id, gold_sql),
    ]
    by_kind: dict[str, list[Mistake]] = {}
    for m in dict.fromkeys(candidates):  # in order, once each
        result = run(db_id, m.sql)
        if m.kind == "typo":
            keep = not result.ok
        else:
            keep = result.ok and not is_right(db_id, m.sql, gold_sql)
        if keep:
            if m.kind == "typo":  # the checker sees the error; say it as it would
                m = Mistake(m.kind, m.sql, f"{m.feedback[:-1]} ({result.error}).")
            by_kind.setdefault(m.kind, []).append(m)
    if not by_kind:
        raise ValueError(f"no plausible mistake found for {gold_sql!r}")
    return {kind: tuple(ms) for kind, ms in sorted(by_kind.items())}


# Every query can be misspelt, so typos would otherwise be the most common mistake; a query that
# fails teaches the checker and rewriter least, so they weigh half as much as the other kinds.
_KIND_WEIGHTS = {"typo": 0.5}


def draw_mistake(db_id: str, gold_sql: str, rng: random.Random) -> Mistake:
    """One mistake on `gold_sql`: a kind of mistake among those it allows (typos at half the
    weight of the others), then one mistake of that kind."""
    by_kind = mistakes(db_id, gold_sql)
    kinds = sorted(by_kind)
    kind = rng.choices(kinds, weights=[_KIND_WEIGHTS.get(k, 1.0) for k in kinds])[0]
    return rng.choice(by_kind[kind])


# --- demonstrations -------------------------------------------------------------------------


def sql_answer(sql: str) -> str:
    """A write/rewrite reply: the query in a ```sql block, nothing else."""
    return f"```sql\n{sql}\n```"


def episode(row: Row, index: int, rng: random.Random, mix: DemoMix) -> list[Row]:
    """The demonstrations of one run of the agent's loop on dataset row `row`."""
    db_id, question, gold_sql = row["db_id"], row["question"], row["gold_sql"]
    meta = {"episode": index, "db_id": db_id, "kind": row["kind"], "gold_sql": gold_sql}
    out: list[Row] = []

    def query(wrong: float) -> Mistake | None:
        return draw_mistake(db_id, gold_sql, rng) if rng.random() < wrong else None

    def demo(messages: list[dict[str, Any]], reply: str, role: str, correct: bool) -> None:
        out.append({"messages": [*messages, {"role": "assistant", "content": reply}],
                    "meta": {"role": role, "correct": correct, **meta}})  # fmt: skip

    conversation = write_messages(schema(db_id), question)
    mistake = query(mix.wrong_write)
    answer = sql_answer(gold_sql if mistake is None else mistake.sql)
    demo(conversation, answer, "write", mistake is None)
    for _turn in range(1, DEFAULT_MAX_TURNS):
        sql = extract_sql(answer)
        result = run(db_id, sql)
        misjudged = rng.random() < mix.wrong_verdict
        if (mistake is None) != misjudged:
            verdict = APPROVAL
        else:
            verdict = mistake.feedback if mistake is not None else rng.choice(FALSE_ALARMS)
        demo(check_messages(schema(db_id), question, sql, result), verdict, "check", not misjudged)
        if verdict == APPROVAL:
            break
        conversation = rewrite_messages(conversation, answer, result, verdict)
        mistake = query(mix.unfixed_rewrite)
        answer = sql_answer(gold_sql if mistake is None else mistake.sql)
        demo(conversation, answer, "rewrite", mistake is None)
    return out


def _stream(seed: int) -> Iterator[Row]:
    """Dataset rows without end: `make_dataset` blocks of seeds derived from `seed` (questions
    repeat across blocks; the question space is small)."""
    for block in count():
        yield from make_dataset(STREAM_BLOCK, seed * 100_003 + block)


def demonstrations(n: int, seed: int, mix: DemoMix = DemoMix()) -> list[Row]:
    """`n` demonstrations (whole episodes, the last one maybe cut), deterministic for (`seed`,
    `mix`); a smaller `n` gives a prefix of a larger one. Questions come from `_stream(seed)`
    without the ones reserved for evaluation, so a question can recur with other mistakes."""
    rng = random.Random(f"text-to-sql-demos:{seed}")
    rows: list[Row] = []
    rows_in = (row for row in _stream(seed) if not reserved(row["db_id"], row["question"]))
    for index, row in enumerate(rows_in):
        if len(rows) >= n:
            break
        rows += episode(row, index, rng, mix)
    return rows[:n]


# --- held out -------------------------------------------------------------------------------


@functools.cache
def rl_questions() -> frozenset[tuple[str, str]]:
    """(db_id, question) of the RL rows (`rows.jsonl`)."""
    rows = [json.loads(line) for line in RL_ROWS.read_text().splitlines() if line.strip()]
    return frozenset((r["db_id"], r["question"]) for r in rows)


def reserved(db_id: str, question: str) -> bool:
    """Whether a question belongs to the evaluation share (see the module docstring): a property
    of the question alone, so demonstrations of any seed avoid every evaluation split's questions."""
    if (db_id, question) in rl_questions():
        return False
    digest = hashlib.sha256(f"{db_id}\n{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def eval_rows(n: int, seed: int = EVAL_SEED) -> list[Row]:
    """`n` held-out agent inputs `{db_id, question, gold_sql, kind}`, deterministic for `seed`:
    reserved questions, none twice. Raises ValueError when `n` is more than the reserved share
    holds (202), or more than `MAX_EVAL_BLOCKS` blocks of `_stream(seed)` find."""
    seen: set[tuple[str, str]] = set()
    rows: list[Row] = []
    stream = _stream(seed)
    for _ in range(MAX_EVAL_BLOCKS * STREAM_BLOCK):
        if len(rows) >= n:
            return rows
        row = next(stream)
        key = (row["db_id"], row["question"])
        if key not in seen and reserved(*key):
            seen.add(key)
            rows.append(row)
    raise ValueError(f"asked for {n} held-out questions, found {len(rows)}: the reserved share holds 202")


def main(argv: list[str] | None = None) -> None:
    write_split(argv, "write text-to-SQL SFT demonstrations or the held-out split as JSONL", demonstrations, eval_rows, EVAL_SEED, 100)

if __name__ == "__main__":
    main()
