"""The `text-to-sql` agent: write a query, run it, have it checked, rewrite it, up to `max_turns`.

Three roles of one policy, each through its own OpenAI client (`ctx.openai(role=...)`), so
every call is recorded as a transition of its role and a run can train some roles only
(`trained_agents: "write|rewrite"`: the checker shares the weights but its tokens get loss mask 0):

1. `write`: schema (the database's CREATE statements) + question -> an answer holding SQL;
2. the SQL is pulled out of the answer and run read-only, time- and row-limited (`sql.py`);
   one event per run: `tool_success` (it ran) or `tool_failure` (it did not), with
   `ok`, `error`, `rows`, so AIR rules can reward or penalise it;
3. `check`: question + schema + the SQL + its result or error -> a verdict; saying
   "THE QUERY IS CORRECT" ends the loop;
4. otherwise `rewrite`: the write conversation continued with the result and the checker's
   feedback -> a new query, run again (step 2), then back to 3.

A turn is one query: `max_turns` (input, default 3) bounds write + rewrites, so the checker
speaks between turns, at most `max_turns - 1` times (a verdict after the last query could
change nothing). The reward is 1.0 when the final query's result matches the gold query's
(`reward.execution_reward`: multisets of rows, ordered when the gold sorts), else 0.0.

Input: `question`, `gold_sql`, and `db_path` (a SQLite file, e.g. from `load_spider`) or
`db_id` (a generated database, built on first use). Optional: `max_turns`, `sql_max_tokens`
(default: the run's sampling `max_tokens`), `check_max_tokens` (default 96), `query_timeout_s`
(default 2, at most `sql.MAX_TIMEOUT_S` = 10).

The input is untrusted (anyone who may submit tasks writes it):

- `db_path` must name one of the generated databases or a SQLite file under the worker's
  configured database directory (`access.allowed_database`, `RELAYRL_TEXT_TO_SQL_DB_DIR`);
  anything else fails the rollout with the reason, before the file is opened or its schema
  reaches a prompt;
- `gold_sql` runs under the same executor as the model's queries (read-only, time-, size- and
  function-limited) and is used by its result only: neither it nor its error text (which can
  quote data, e.g. `json_extract('{}', (SELECT secret FROM t))`) reaches a prompt, a reward
  or the rollout's recorded error;
- `query_timeout_s` outside (0, 10] is refused rather than silently cut.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from examples.text_to_sql.access import allowed_database
from examples.text_to_sql.databases import DB_IDS, database_path
from examples.text_to_sql.reward import execution_reward
from examples.text_to_sql.sql import MAX_TIMEOUT_S, QueryResult, execute_sql, extract_sql, format_result, schema_sql
from services.rollout.context import AgentContext
from services.rollout.registry import agent

NAME = "text-to-sql"
APPROVAL = "THE QUERY IS CORRECT"
DEFAULT_MAX_TURNS = 3
DEFAULT_CHECK_MAX_TOKENS = 96  # the verdict, or a sentence or two on what is wrong
DEFAULT_QUERY_TIMEOUT_S = 2.0
RESULT_ROWS_SHOWN = 5
FEEDBACK_CHARS = 600  # of the checker's text passed to the rewriter: keeps the rewrite prompt bounded

WRITE_SYSTEM = (
    "You are an expert SQLite developer. Given a database schema and a question, write one SQLite "
    "query that answers the question. Reply with the query in a ```sql code block."
)
CHECK_SYSTEM = (
    "You review SQLite queries. Given a question, the database schema, a query and what running it "
    f"returned, decide whether the query answers the question. If it does, reply exactly: {APPROVAL}. "
    "If not, say in one or two sentences what is wrong."
)


@dataclass(frozen=True)
class Task:
    """One agent input, validated."""

    question: str
    gold_sql: str
    db_path: str | None  # given by the row (Spider), unchecked until `database()`; else `db_id`
    db_id: str | None
    max_turns: int
    sql_max_tokens: int | None
    check_max_tokens: int
    query_timeout_s: float

    @classmethod
    def from_input(cls, data: dict[str, Any]) -> Task:
        question = str(data.get("question") or "").strip()
        gold_sql = str(data.get("gold_sql") or data.get("query") or "").strip()
        if not question or not gold_sql:
            raise ValueError("a text-to-sql input needs `question` and `gold_sql`")
        db_path = str(data["db_path"]) if data.get("db_path") else None
        db_id = str(data["db_id"]) if data.get("db_id") else None
        if db_path is None and db_id not in DB_IDS:
            raise ValueError(f"give `db_path`, or `db_id` naming a generated database {list(DB_IDS)}; got {db_id!r}")
        max_turns = int(data.get("max_turns", DEFAULT_MAX_TURNS))
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        sql_tokens = data.get("sql_max_tokens")
        query_timeout_s = float(data.get("query_timeout_s", DEFAULT_QUERY_TIMEOUT_S))
        if not (0 < query_timeout_s <= MAX_TIMEOUT_S):  # also refuses NaN and inf
            raise ValueError(f"query_timeout_s must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {query_timeout_s}")
        return cls(
            question=question,
            gold_sql=gold_sql,
            db_path=db_path,
            db_id=db_id,
            max_turns=max_turns,
            sql_max_tokens=int(sql_tokens) if sql_tokens is not None else None,
            check_max_tokens=int(data.get("check_max_tokens", DEFAULT_CHECK_MAX_TOKENS)),
            query_timeout_s=query_timeout_s,
        )

    def database(self) -> Path:
        """The SQLite file to query (builds a generated database on first use). Raises
        `access.DatabaseRefused` for a `db_path` the example may not open."""
        if self.db_path is not None:
            return allowed_database(self.db_path)
        assert self.db_id is not None
        return database_path(self.db_id)


# --- prompts ----------------------------------------------------------------------------


def write_messages(schema: str, question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": WRITE_SYSTEM},
        {"role": "user", "content": f"Schema:\n{schema}\n\nQuestion: {question}"},
    ]


def check_messages(schema: str, question: str, sql: str, result: QueryResult) -> list[dict[str, str]]:
    shown = sql if sql else "(no SQL query found in the answer)"
    return [
        {"role": "system", "content": CHECK_SYSTEM},
        {
            "role": "user",
            "content": f"Schema:\n{schema}\n\nQuestion: {question}\n\nQuery:\n{shown}\n\n"
            f"Result:\n{format_result(result, RESULT_ROWS_SHOWN)}",
        },
    ]


def rewrite_messages(
    conversation: list[dict[str, str]], answer: str, result: QueryResult, verdict: str
) -> list[dict[str, str]]:
    """The write conversation so far, continued with the last answer, its result and the review."""
    review = verdict.strip()[:FEEDBACK_CHARS] or "(no feedback)"
    feedback = (
        f"Running that query gave:\n{format_result(result, RESULT_ROWS_SHOWN)}\n\n"
        f"A reviewer said: {review}\n\nWrite a corrected query in a ```sql code block."
    )
    return [*conversation, {"role": "assistant", "content": answer}, {"role": "user", "content": feedback}]


def approved(verdict: str) -> bool:
    """Whether the checker's verdict accepts the query (the approval phrase, any case or spacing)."""
    return APPROVAL in " ".join(verdict.upper().split())


# --- the loop ---------------------------------------------------------------------------


class GoldQueryFailed(ValueError):
    """The task's gold query did not run; deliberately without SQLite's error text."""


class ContextFull(Exception):
    """Inference refused a call because the prompt no longer fits the model's context."""


async def complete(ctx: AgentContext, role: str, messages: list[dict[str, str]], max_tokens: int | None) -> str:
    """One chat call recorded as a transition of `role`; the answer's text."""
    import openai  # the worker has it; imported here so importing this module stays cheap

    extra: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
    try:
        reply = await ctx.openai(role=role).chat.completions.create(
            model=ctx.model, messages=messages, **extra  # type: ignore[arg-type]
        )
    except openai.BadRequestError as exc:
        if "maximum context length" in str(exc):
            raise ContextFull(str(exc)) from exc
        raise
    return reply.choices[0].message.content or ""


async def run_query(ctx: AgentContext, task: Task, db: Path, answer: str, turn: int) -> tuple[str, QueryResult]:
    """Pull the SQL out of `answer`, run it (off the event loop), record the outcome as an event
    on the call that wrote it."""
    sql = extract_sql(answer)
    result = await asyncio.to_thread(execute_sql, db, sql, timeout_s=task.query_timeout_s)
    ctx.event(
        "tool_success" if result.ok else "tool_failure",
        tool="sql", turn=turn, ok=result.ok, error=result.error, rows=len(result.rows),
    )  # fmt: skip
    return sql, result


@agent(NAME, description="text-to-SQL: write, run, check, rewrite; reward 1.0 when the result matches the gold query's")
async def text_to_sql_agent(ctx: AgentContext) -> float:
    task = Task.from_input(ctx.input)
    db = await asyncio.to_thread(task.database)
    schema = await asyncio.to_thread(schema_sql, db)
    # The gold result first: a broken row fails the rollout before any model call is spent on it.
    # Its error text is dropped: it can quote the data the query read (see the module docstring).
    gold = await asyncio.to_thread(execute_sql, db, task.gold_sql, timeout_s=MAX_TIMEOUT_S)
    if not gold.ok:
        raise GoldQueryFailed(f"the gold query fails on {db.name} (its error is not reported)")

    conversation = write_messages(schema, task.question)
    answer = await complete(ctx, "write", conversation, task.sql_max_tokens)
    sql, result = await run_query(ctx, task, db, answer, turn=0)
    for turn in range(1, task.max_turns):
        try:
            verdict = await complete(
                ctx, "check", check_messages(schema, task.question, sql, result), task.check_max_tokens
            )
            if approved(verdict):
                break
            conversation = rewrite_messages(conversation, answer, result, verdict)
            answer = await complete(ctx, "rewrite", conversation, task.sql_max_tokens)
        except ContextFull:
            break  # the conversation outgrew the model: score the last query that ran
        sql, result = await run_query(ctx, task, db, answer, turn=turn)
    return execution_reward(result, gold, task.gold_sql)
