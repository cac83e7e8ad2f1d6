"""The compact teacher cache (migration 090): llm_calls is a view over llm_call_rows +
llm_prompts. Rows written by the engine (split in Python), rows converted from an old file
and rows merged from an old shard (split in SQL) must read back as what was written."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from factory.errors import FactoryError
from factory.merge import merge_warehouses
from factory.teacher.request import Request, Sampling
from factory.teacher.store import (
    LLM_CALL_COLUMNS,
    cached_answers,
    split_request,
    split_response,
    store_calls,
    write_calls,
)
from factory.testing.warehouses import schema_before
from factory.warehouse import Warehouse

COMPACT = 90                  # the migration that made llm_calls a view


def body(*contents: str | None) -> str:
    return json.dumps({"id": "c1", "object": "chat.completion", "choices": [
        {"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": "stop"}
        for i, c in enumerate(contents)], "usage": {"prompt_tokens": 9, "completion_tokens": 3}})


def calls() -> list[dict]:
    """Rows of every shape the cache holds: samples sharing a prompt, a quote/unicode-laden
    prompt, answers that are and are not the body's content, failures, another layout."""
    tricky = [{"role": "system", "content": 'say "no" ,"model": é\n'},
              {"role": "user", "content": "explain \"this\" ,\"model\": ü " * 20}]
    plain = [{"role": "user", "content": "hi"}]
    reqs = [Request.build("m", tricky, Sampling(temperature=0.5), s) for s in range(3)]
    reqs += [Request.build("m", plain, Sampling(), 0),
             Request.build("m", plain, Sampling(), 0, draw=1)]
    texts = ["the answer", "zweite \"Antwort\" ü", "third", "x", None]
    responses = [body(texts[0]), body(texts[1]), body("other than text"), body("x", "y"), None]
    rows = [{"key": r.key, "model": "m", "backend": "openai", "sample": r.sample,
             "draw": r.draw, "request": r.canonical_json(),
             "status": "ok" if t is not None else "failed", "response": resp, "text": t,
             "finish_reason": "stop", "input_tokens": 9, "output_tokens": 3, "latency_s": 0.1,
             "attempts": 1, "error": None if t is not None else "HTTP 500", "cost_usd": 0.001,
             "run_id": "r1"} for r, t, resp in zip(reqs, texts, responses, strict=True)]
    rows.append({**rows[0], "key": "legacy", "request": json.dumps(
        {"model": "m", "messages": plain}), "sample": 7})
    return rows


def stored(con: duckdb.DuckDBPyConnection) -> tuple[list, list]:
    """The stored rows, bodies parsed (the SQL split may order a body's keys otherwise)."""
    cols = [c for c in LLM_CALL_COLUMNS if c not in ("request", "response")]
    return ([(*r[:-1], r[-1] and json.loads(r[-1])) for r in con.execute(
                f"select {', '.join(cols)}, prompt_key, request::varchar, content_in_text,"
                " response from llm_call_rows order by key").fetchall()],
            con.execute("select prompt_key, messages::json, prompt from llm_prompts"
                        " order by prompt_key").fetchall())


def old_warehouse(path: Path) -> Warehouse:
    """A warehouse file as a factory from before migration 090 left it."""
    schema_before(path, COMPACT)
    return Warehouse(path)


def fill_old(path: Path, rows: list[dict]) -> None:
    con = duckdb.connect(str(path))
    con.register("_rows", pa.Table.from_pylist([{c: r.get(c) for c in LLM_CALL_COLUMNS}
                                                for r in rows]))
    con.execute(f"insert into llm_calls ({', '.join(LLM_CALL_COLUMNS)})"
                f" select {', '.join(LLM_CALL_COLUMNS)} from _rows")
    con.close()


def assert_reads_back(wh: Warehouse, rows: list[dict]) -> None:
    """llm_calls gives back each row's request byte for byte and its body as JSON."""
    with wh.read() as con:
        back = {k: (q, r, t, p) for k, q, r, t, p in con.execute(
            "select key, request, response, text, prompt from llm_calls").fetchall()}
        found = cached_answers(con, [r["key"] for r in rows] + ["missing"])
    assert set(back) == {r["key"] for r in rows}
    for r in rows:
        request, response, text, prompt = back[r["key"]]
        assert request == r["request"]
        assert (json.loads(response) if response else None) == (
            json.loads(r["response"]) if r["response"] else None)
        assert text == r["text"]
        assert prompt == json.loads(r["request"])["messages"][-1]["content"]
    assert set(found) == {r["key"] for r in rows if r["status"] == "ok"}


def test_python_and_sql_splits_store_the_same_rows(tmp_path: Path) -> None:
    """The write path splits in Python, old files and old shards in SQL: same stored rows."""
    rows = calls()
    a, b = Warehouse(tmp_path / "a.duckdb"), Warehouse(tmp_path / "b.duckdb")
    with a.write() as con:
        write_calls(con, rows)
    with b.write() as con:
        con.register("_src", pa.Table.from_pylist(
            [{**{c: r.get(c) for c in LLM_CALL_COLUMNS}, "created_at": None} for r in rows]))
        store_calls(con, "_src", created="created_at")
    with a.read() as ca, b.read() as cb:
        assert stored(ca) == stored(cb)
        in_text = dict(ca.execute("select key, content_in_text from llm_call_rows").fetchall())
        assert ca.execute("select count(*) from llm_prompts").fetchone()[0] == 2
    # the answer is left in the body when it is not the body's only content
    assert [in_text[r["key"]] for r in rows] == [True, True, False, False, False, True]
    assert_reads_back(a, rows)


def test_an_old_file_is_converted_in_place(tmp_path: Path) -> None:
    rows = calls()
    wh = old_warehouse(tmp_path / "old.duckdb")
    fill_old(wh.path, rows)
    assert (COMPACT, "llm_calls_compact") in wh.migrate()
    assert_reads_back(wh, rows)
    with wh.write() as con:               # and it is written as a new one from then on
        write_calls(con, [{**rows[0], "key": "new", "sample": 9}])
    assert_reads_back(wh, [*rows, {**rows[0], "key": "new", "sample": 9}])


def test_an_old_shard_merges_into_a_new_warehouse(tmp_path: Path) -> None:
    rows = calls()
    shard = old_warehouse(tmp_path / "shard.duckdb")
    fill_old(shard.path, rows)
    main = Warehouse(tmp_path / "main.duckdb")
    failed_here = {**rows[0], "status": "failed", "text": None, "response": None}
    with main.write() as con:             # a failure here is upgraded by the shard's answer
        write_calls(con, [failed_here])
    merged = merge_warehouses(main, [shard.path])
    assert merged[str(shard.path)]["llm_call_rows"] == len(rows)   # the failure upgraded too
    assert_reads_back(main, rows)
    with duckdb.connect(str(shard.path), read_only=True) as con:   # the shard is unchanged
        assert con.execute("select count(*) from llm_calls").fetchone()[0] == len(rows)
        assert con.execute("select max(version) from schema_migrations").fetchone()[0] < COMPACT


@pytest.mark.parametrize("request_text", [
    '{"model":"m","messages":[]}',                      # another layout: kept whole
    '{"draw":0,"model":"m","messages":[]}',             # messages after model: kept whole
])
def test_requests_of_another_layout_are_kept_whole(request_text: str) -> None:
    assert split_request(request_text) == (request_text, None, "")


def test_a_body_that_is_not_json_is_kept_whole() -> None:
    assert split_response("not json", "t") == ("not json", False)
    assert split_response('{"choices": []}', "t") == ('{"choices": []}', False)


def scans(con: duckdb.DuckDBPyConnection, sql: str, tmp_path: Path) -> dict[str, int]:
    """Rows each table scan of `sql` passed on (DuckDB's profile of one run)."""
    out = tmp_path / "profile.json"
    con.execute("pragma enable_profiling = 'json'")
    con.execute(f"pragma profiling_output = '{out}'")
    con.execute(sql).fetchall()
    con.execute("pragma disable_profiling")
    found: dict[str, int] = {}

    def walk(node: dict) -> None:
        table = node.get("extra_info", {}).get("Table")
        if table:
            name = table.split(".")[-1]
            found[name] = found.get(name, 0) + node["intermediate_rows"]
        for child in node.get("children", []):
            walk(child)

    for node in json.loads(out.read_text())["operator"]:
        walk(node)
    return found


def test_traces_of_a_few_rows_read_only_their_answers(tmp_path: Path) -> None:
    """A traces query that filters the job's rows reaches llm_call_rows and llm_prompts by
    key (the few answers it shows), not by joining every stored call and prompt."""
    wh = Warehouse(tmp_path / "w.duckdb")
    sampling = Sampling(temperature=0.7)
    reqs = [Request.build("m", [{"role": "user", "content": f"item {i // 4}"}], sampling, i % 4)
            for i in range(4000)]
    with wh.write() as con:
        write_calls(con, [{"key": r.key, "model": "m", "backend": "openai", "sample": r.sample,
                           "draw": 0, "request": r.canonical_json(), "status": "ok",
                           "response": body(f"answer {i}"), "text": f"answer {i}",
                           "attempts": 1, "run_id": "r"} for i, r in enumerate(reqs)])
        con.register("_jobs", pa.Table.from_pylist([
            {"dataset": "d", "item_id": f"i{i}", "description": f"answer {i}",
             "work_key": r.key, "call_key": r.key, "run_id": "r", "prompt_name": "p",
             "prompt_hash": "h", "backend": "openai", "model": "m", "sample": r.sample,
             "draws": 1, "cached": False, "status": "ok"} for i, r in enumerate(reqs)]))
        con.execute("insert into item_descriptions by name select * from _jobs")
    with wh.read() as con:
        got = scans(con, "select prompt, response, cost_usd from traces"
                         " where job = 'describe-items' and item_id = 'i17'", tmp_path)
        assert con.execute("select prompt, response from traces where item_id = 'i17'"
                           ).fetchall() == [("item 4", "answer 17")]
    assert got.get("llm_call_rows", 0) <= 1 and got.get("llm_prompts", 0) <= 1, got


def test_an_old_shard_of_another_type_is_refused_by_name(tmp_path: Path) -> None:
    """A column of the old llm_calls table with another type is named, as a table's is
    (the split failed half-way with 'Current transaction is aborted')."""
    shard = old_warehouse(tmp_path / "shard.duckdb")
    fill_old(shard.path, calls())
    with duckdb.connect(str(shard.path)) as con:
        con.execute("alter table llm_calls alter column input_tokens type varchar")
        con.execute("update llm_calls set input_tokens = 'abc'")
    main = Warehouse(tmp_path / "main.duckdb")
    with main.write():
        pass
    with pytest.raises(FactoryError, match=r"column llm_calls\.input_tokens is VARCHAR there "
                                           "but INTEGER here; nothing was merged from it"):
        merge_warehouses(main, [shard.path])
    with main.read() as con:
        assert con.execute("select count(*) from llm_calls").fetchone()[0] == 0
