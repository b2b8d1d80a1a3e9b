"""Execution-match reward: a query is right when it returns what the gold query returns.

Pure functions of query results (no database access):

- rows are compared as multisets (order-insensitive, duplicates counted), or as lists when the
  gold query has an ORDER BY (then the order is part of the answer);
- values compare by value: 3 == 3.0, and floats are rounded to 6 decimals so AVG(...) and
  SUM(...)/COUNT(...) agree;
- columns compare by position (the question fixes what to select and in which order); names
  and aliases do not matter;
- a query that failed, or whose result was cut at the row limit while the gold's was not,
  scores 0.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

from examples.text_to_sql.sql import QueryResult

Row = tuple[Any, ...]

FLOAT_DECIMALS = 6
_STRING_LITERAL = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
_ORDER_BY = re.compile(r"\border\s+by\b", re.I)


def has_order_by(sql: str) -> bool:
    """Whether `sql` sorts its result (an ORDER BY outside string literals)."""
    return bool(_ORDER_BY.search(_STRING_LITERAL.sub("''", sql)))


def normalize_value(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, FLOAT_DECIMALS) + 0.0  # + 0.0: -0.0 and 0.0 compare as one value
    return value


def normalize_rows(rows: Sequence[Sequence[Any]]) -> list[Row]:
    return [tuple(normalize_value(v) for v in row) for row in rows]


def rows_match(predicted: Sequence[Sequence[Any]], gold: Sequence[Sequence[Any]], ordered: bool) -> bool:
    """Same rows (as lists when `ordered`, else as multisets), values compared after normalisation."""
    pred, want = normalize_rows(predicted), normalize_rows(gold)
    if ordered:
        return pred == want
    return len(pred) == len(want) and Counter(pred) == Counter(want)


def execution_reward(predicted: QueryResult, gold: QueryResult, gold_sql: str) -> float:
    """1.0 when the predicted query ran and its result matches the gold query's, else 0.0."""
    if not gold.ok:
        # Without gold.error: the gold query comes from a task and its error text can quote data.
        raise ValueError("the gold query failed")
    if not predicted.ok or predicted.truncated != gold.truncated:
        return 0.0
    return 1.0 if rows_match(predicted.rows, gold.rows, ordered=has_order_by(gold_sql)) else 0.0
