"""Warehouse side of the teacher: cache look-ups and batched upserts.

Rows go in through Arrow (one statement per batch, not one per row). In `llm_calls` a
successful row is never replaced by a failed one (a --refresh that fails keeps the old answer).
"""

from __future__ import annotations

import hashlib
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
#: the split of migration 090: each prompt once (llm_prompts), the answer once (`text`)
_SPLIT = (
    f"select {', '.join(_STORED)}, sha256(llm_messages(request)) as prompt_key,"
    " llm_request_ref(request, sha256(llm_messages(request))) as request,"
    " llm_content_in_text(response, text) as content_in_text,"
    " case when llm_content_in_text(response, text)"
    " then llm_with_content(response, text, null) else response end as response,"
    " llm_messages(request) as messages, {created} as created_at from {source}")
_STORE_PROMPTS = (
    "insert into llm_prompts select prompt_key, any_value(messages)::json,"
    " json_extract_string(any_value(messages), '$[#-1].content')"
    " from _llm_split where prompt_key is not null group by prompt_key on conflict do nothing")
_UPSERT_ROWS = (
    f"insert into llm_call_rows ({', '.join(_STORED)}, prompt_key, request, content_in_text,"
    " response, created_at)"
    f" select {', '.join(_STORED)}, prompt_key, request, content_in_text, response,"
    " coalesce({created}, current_timestamp) from {source}"
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
    """Upsert llm_calls rows (the last row per key wins within a batch; ok is never lost).

    The split of migration 090 is done here in Python (a substring, a sha256 and one JSON
    round trip per row: ~4x cheaper than the same in SQL on the write path); `store_calls`
    does it in SQL for rows already in DuckDB (an old shard). Both give the same rows."""
    if not rows:
        return
    last = list({r["key"]: r for r in rows}.values())
    prompts: dict[str, tuple[str, str | None]] = {}
    columns: dict[str, list[Any]] = {c: [r.get(c) for r in last] for c in _STORED}
    refs, keys, cits, responses = [], [], [], []
    for r in last:
        request, key, messages = split_request(r["request"])
        if key is not None and key not in prompts:
            prompts[key] = (messages, _last_content(messages))
        response, cit = split_response(r.get("response"), r.get("text"))
        refs.append(request)
        keys.append(key)
        cits.append(cit)
        responses.append(response)
    columns.update(prompt_key=keys, request=refs, content_in_text=cits, response=responses)
    con.register("_llm_rows_batch", pa.table(columns))
    con.register("_llm_prompts_batch", pa.table({
        "prompt_key": list(prompts), "messages": [m for m, _ in prompts.values()],
        "prompt": [p for _, p in prompts.values()]}, schema=_PROMPT_SCHEMA))
    try:
        con.execute("insert into llm_prompts select * from _llm_prompts_batch"
                    " on conflict do nothing").fetchall()
        con.execute(_UPSERT_ROWS.format(source="_llm_rows_batch", created="null")).fetchall()
    finally:
        con.unregister("_llm_rows_batch")
        con.unregister("_llm_prompts_batch")


def split_request(request: str) -> tuple[str, str | None, str]:
    """(request with its messages replaced by their key, the key, the messages JSON text):
    the SQL macros llm_request_ref / llm_messages of migration 090, for a canonical request
    (sorted keys: draw, messages, model, ...); another layout is kept whole (key None)."""
    at, end = request.find(',"messages":'), request.find(',"model":')
    if not request.startswith('{"draw":') or at < 0 or end <= at:
        return request, None, ""
    messages = request[at + 12:end]
    key = hashlib.sha256(messages.encode()).hexdigest()
    return f'{request[:at + 12]}"{key}"{request[end:]}', key, messages


def split_response(response: str | None, text: str | None) -> tuple[str | None, bool]:
    """(raw body without choices[0].message.content when that is `text`, whether it was
    taken out): the answer is stored once, in `text`; the view puts it back."""
    if not response or text is None:
        return response, False
    try:
        body = json.loads(response)
        message = body["choices"][0]["message"]
        if len(body["choices"]) != 1 or message.get("content") != text:
            return response, False
    except (ValueError, LookupError, TypeError, AttributeError):
        return response, False
    del message["content"]
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")), True


def _last_content(messages: str) -> str | None:
    try:
        content = json.loads(messages)[-1].get("content")
    except (ValueError, LookupError, TypeError, AttributeError):
        return None
    return content if isinstance(content, str) else None


_PROMPT_SCHEMA = pa.schema([("prompt_key", pa.string()), ("messages", pa.string()),
                            ("prompt", pa.string())])


def store_calls(con: duckdb.DuckDBPyConnection, source: str, created: str = "null") -> int:
    """Upsert the rows of relation `source` (llm_calls columns, unique keys) into llm_prompts
    and llm_call_rows; `created`: its column giving created_at (else now). Returns the rows
    inserted or upgraded."""
    con.execute("create or replace temp table _llm_split as "
                + _SPLIT.format(source=source, created=created)).fetchall()
    try:
        con.execute(_STORE_PROMPTS).fetchall()
        (count,) = con.execute(_UPSERT_ROWS.format(source="_llm_split", created="created_at")
                               ).fetchone()
        return int(count)
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
