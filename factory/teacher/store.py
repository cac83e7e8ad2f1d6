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

from factory.teacher.cost import Pricing
from factory.teacher.keys import redact
from factory.teacher.request import Reply, join_reasoning, split_reasoning

LLM_CALL_COLUMNS = (
    "key", "model", "backend", "sample", "draw", "request", "status", "response", "text",
    "finish_reason", "input_tokens", "output_tokens", "latency_s", "attempts", "error",
    "cost_usd", "price_version", "run_id", "reasoning", "mode", "batch_id", "group_key",
    "choice", "logprobs",
)
#: llm_call_rows columns copied as they come (request and response are split on the way in)
_STORED = tuple(c for c in LLM_CALL_COLUMNS if c not in ("request", "response"))
#: the split of migration 054: each prompt once (llm_prompts), the answer once (`text`)
_SPLIT = ("select *, sha256(llm_messages(request)) as prompt_key,"
          " llm_content_in_text(response, text) as cit from {source}")
_STORE_PROMPTS = (
    "insert into llm_prompts select prompt_key, any_value(llm_messages(request))::json,"
    " json_extract_string(any_value(llm_messages(request)), '$[#-1].content')"
    " from _llm_split s where prompt_key is not null"
    " and not exists (select 1 from llm_prompts p where p.prompt_key = s.prompt_key)"
    " group by prompt_key")
_UPSERT_ROWS = (
    f"insert into llm_call_rows ({', '.join(_STORED)}, prompt_key, request, content_in_text,"
    " response, created_at)"
    f" select {', '.join(_STORED)}, prompt_key, llm_request_ref(request, prompt_key), cit,"
    " case when cit then llm_with_content(response, text, null) else response end,"
    " coalesce({created}, current_timestamp) from _llm_split"
    " on conflict (key) do update set "
    + ", ".join(f"{c} = excluded.{c}" for c in _STORED[1:] + (
        "prompt_key", "request", "content_in_text", "response", "created_at"))
    + " where llm_call_rows.status <> 'ok' or excluded.status = 'ok'"
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
    """Successful llm_calls rows among `keys`: one keyed join of all of them (an Arrow table
    of keys against the primary key), however many there are."""
    keys = pa.table({"key": pa.array(list(keys), pa.string())})
    if not keys.num_rows:
        return {}
    con.register("_lookup_keys", keys)
    try:
        rows = con.execute(
            "select c.key, text, finish_reason, input_tokens, output_tokens, reasoning, logprobs"
            " from llm_call_rows c semi join _lookup_keys k on c.key = k.key"
            " where status = 'ok'").fetchall()
    finally:
        con.unregister("_lookup_keys")
    return {k: CachedAnswer(t or "", f, i, o, r, json.loads(lp) if lp else None)
            for k, t, f, i, o, r, lp in rows}


def write_calls(con: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]]) -> None:
    """Upsert llm_calls rows (the last row per key wins within a batch; ok is never lost)."""
    if not rows:
        return
    last = list({r["key"]: r for r in rows}.values())
    table = pa.table({c: [r.get(c) for r in last] for c in LLM_CALL_COLUMNS})
    con.register("_llm_calls_batch", table)
    try:
        store_calls(con, "_llm_calls_batch")
    finally:
        con.unregister("_llm_calls_batch")


def store_calls(con: duckdb.DuckDBPyConnection, source: str, created: str = "null") -> None:
    """Upsert the rows of relation `source` (llm_calls columns, unique keys) into llm_prompts
    and llm_call_rows; `created`: its column giving created_at (else now)."""
    con.execute(f"create or replace temp table _llm_split as {_SPLIT.format(source=source)}"
                ).fetchall()
    try:
        con.execute(_STORE_PROMPTS).fetchall()
        con.execute(_UPSERT_ROWS.format(created=created)).fetchall()
    finally:
        con.execute("drop table if exists _llm_split").fetchall()


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


def answer_fields(reply: Reply, pricing: Pricing, key: str | None) -> dict[str, Any]:
    """The llm_calls columns of a successful reply (an HTTP answer or a batch output line):
    the answer, its thinking from either source, tokens, cost; redacted of `key`."""
    cost = pricing.cost(reply.input_tokens, reply.output_tokens)
    inline = split_reasoning(reply.text)[0]      # two substring tests without a tag
    reasoning = join_reasoning(reply.reasoning, inline) if inline else reply.reasoning
    return {"status": "ok", "response": redact(reply.raw, key), "text": reply.text,
            "reasoning": reasoning, "finish_reason": reply.finish_reason,
            "input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens,
            "latency_s": reply.latency_s, "cost_usd": cost,
            "price_version": pricing.version if cost is not None else None,
            "logprobs": None if reply.logprobs is None
            else json.dumps(reply.logprobs, ensure_ascii=False)}


def json_or_none(body: str | None, key: str | None) -> str | None:
    """An error body as JSON when it is JSON, else wrapped in {"body": ...}; redacted."""
    if not body:
        return None
    try:
        json.loads(body)
        return redact(body, key)
    except ValueError:
        return json.dumps({"body": redact(body, key)})
