"""Warehouse side of the teacher: cache look-ups and batched upserts.

Rows go in through Arrow (one statement per batch, not one per row). In `llm_calls` a
successful row is never replaced by a failed one (a --refresh that fails keeps the old answer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

LLM_CALL_COLUMNS = (
    "key", "model", "backend", "sample", "draw", "request", "status", "response", "text",
    "finish_reason", "input_tokens", "output_tokens", "latency_s", "attempts", "error",
    "cost_usd", "price_version", "run_id", "reasoning", "group_key", "choice", "logprobs",
)
_UPSERT_CALLS = (
    f"insert into llm_calls ({', '.join(LLM_CALL_COLUMNS)}, created_at)"
    f" select {', '.join(LLM_CALL_COLUMNS)}, current_timestamp from {{source}}"
    " on conflict (key) do update set "
    + ", ".join(f"{c} = excluded.{c}" for c in LLM_CALL_COLUMNS[1:] + ("created_at",))
    + " where llm_calls.status <> 'ok' or excluded.status = 'ok'"
)


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    finish_reason: str | None
    input_tokens: int | None
    output_tokens: int | None
    reasoning: str | None = None    # the model's thinking (reasoning_content or inline)
    logprobs: list[dict[str, Any]] | None = None    # per answer token, when they were asked


def cached_answers(con: duckdb.DuckDBPyConnection, keys: Iterable[str]) -> dict[str, CachedAnswer]:
    """Successful llm_calls rows among `keys`."""
    keys = list(keys)
    if not keys:
        return {}
    rows = con.execute(
        "select key, text, finish_reason, input_tokens, output_tokens, reasoning, logprobs"
        " from llm_calls where status = 'ok' and key in (select unnest(?::varchar[]))", [keys]
    ).fetchall()
    return {k: CachedAnswer(t or "", f, i, o, r, json.loads(lp) if lp else None)
            for k, t, f, i, o, r, lp in rows}


def write_calls(con: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]]) -> None:
    """Upsert llm_calls rows (the last row per key wins within a batch; ok is never lost)."""
    if not rows:
        return
    last = {r["key"]: r for r in rows}
    table = pa.Table.from_pylist([{c: r.get(c) for c in LLM_CALL_COLUMNS} for r in last.values()])
    con.register("_llm_calls_batch", table)
    try:
        con.execute(_UPSERT_CALLS.format(source="_llm_calls_batch")).fetchall()
    finally:
        con.unregister("_llm_calls_batch")


def primary_key(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    row = con.execute(
        "select constraint_column_names from duckdb_constraints()"
        " where table_name = ? and constraint_type = 'PRIMARY KEY' and schema_name = 'main'",
        [table],
    ).fetchall()
    return list(row[0][0]) if row else []


def upsert(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict[str, Any]]) -> None:
    """Insert rows into `table`, replacing rows with the same primary key (which it must have).

    Within one batch the last row per key wins, so a job may hand over a key twice.
    """
    if not rows:
        return
    key = primary_key(con, table)
    if not key:
        raise ValueError(f"table {table} needs a primary key to be upserted into")
    last = {tuple(r.get(c) for c in key): r for r in rows}
    data = pa.Table.from_pylist(list(last.values()))
    view = f"_upsert_{table}"
    con.register(view, data)
    try:
        cols = ", ".join(f'"{c}"' for c in data.column_names)
        con.execute(
            f'insert or replace into "{table}" ({cols}) select {cols} from "{view}"').fetchall()
    finally:
        con.unregister(view)
