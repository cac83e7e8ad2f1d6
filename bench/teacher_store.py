"""The teacher's warehouse store, before and after migration 090, in one run.

Before: llm_calls one table, a connection and IN-list query per 2,000-key look-up chunk;
after: llm_calls a view over llm_call_rows + llm_prompts, one keyed join per look-up.

    python bench/teacher_store.py [--rows 20000] [--lookup 100000] [--stored N] [--repeats 3]

Prints write rows/s (1,000-row flushes, each its own connection and transaction as the
engine does, into llm_calls and a job table; and 10,000-row ones, what the engine's
flushes grow to when answers come faster than small flushes store them), bytes per stored
call, flush time at the start and end of the fill, look-up + replay of --lookup cached work
items (rendering and hashing included), and `traces` against a plain table query; then
projections to 1M calls.
Synthetic rows: 4 samples per prompt, ~2 KB of messages, ~4 KB answers in an OpenAI body.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from factory.teacher.request import Request, Sampling
from factory.teacher.store import (
    LLM_CALL_COLUMNS,
    cached_answers,
    upsert,
    write_calls,
)
from factory.testing.warehouses import schema_before
from factory.warehouse import Warehouse

OLD_VERSION = 90          # the first migration of the compact layout
FLUSH = 1000
SAMPLES = 4
_WORDS = ["".join(random.Random(i).choices(string.ascii_lowercase, k=2 + i % 8))
          for i in range(4000)]
_OLD_UPSERT = (
    f"insert into llm_calls ({', '.join(LLM_CALL_COLUMNS)}, created_at)"
    f" select {', '.join(LLM_CALL_COLUMNS)}, current_timestamp from _b on conflict (key) do"
    " update set " + ", ".join(f"{c} = excluded.{c}" for c in LLM_CALL_COLUMNS[1:])
    + " where llm_calls.status <> 'ok' or excluded.status = 'ok'")


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(_WORDS, k=n))


def messages(p: int, rng: random.Random) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You explain recommendations. " + words(rng, 20)},
            {"role": "user", "content": f"user {p}: " + words(rng, 300)}]


def calls(start: int, n: int, answer_words: int) -> tuple[list[dict[str, Any]], list[Request]]:
    """llm_calls rows for work items start..start+n (SAMPLES per prompt)."""
    rows, reqs, rng = [], [], random.Random(start)
    sampling = Sampling(temperature=0.7, max_tokens=2048)
    for i in range(start, start + n):
        req = Request.build("m", messages(i // SAMPLES, random.Random(i // SAMPLES)), sampling,
                            i % SAMPLES)
        text = words(rng, answer_words)
        raw = json.dumps({"id": f"c{i}", "object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": "stop"}], "usage": {"prompt_tokens": 600, "completion_tokens": 900}})
        rows.append({"key": req.key, "model": "m", "backend": "openai", "sample": req.sample,
                     "draw": 0, "request": req.canonical_json(), "status": "ok", "response": raw,
                     "text": text, "finish_reason": "stop", "input_tokens": 600,
                     "output_tokens": 900, "latency_s": 0.2, "attempts": 1, "run_id": "r"})
        reqs.append(req)
    return rows, reqs


def job_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"dataset": "d", "item_id": r["key"][:12], "description": r["text"][:200],
             "work_key": r["key"], "call_key": r["key"], "run_id": "r", "prompt_name": "p",
             "prompt_hash": "h", "backend": "openai", "model": "m", "sample": r["sample"],
             "draws": 1, "cached": False, "status": "ok"} for r in rows]


def old_write(con: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]]) -> None:
    con.register("_b", pa.Table.from_pylist([{c: r.get(c) for c in LLM_CALL_COLUMNS}
                                            for r in rows]))
    con.execute(_OLD_UPSERT).fetchall()
    con.unregister("_b")


def warehouse(path: Path, old: bool) -> Warehouse:
    """A warehouse at the layout before 090 (old) or current."""
    if old:
        schema_before(path, OLD_VERSION)
    wh = Warehouse(path)
    wh._migrated = old        # the old file is used as it is, never upgraded
    return wh


def fill(wh: Warehouse, old: bool, n: int, answer_words: int, flush: int = FLUSH,
         start: int = 0) -> list[float]:
    """Flush n rows `flush` at a time as the engine does; returns each flush's seconds."""
    times = []
    for first in range(start, start + n, flush):
        rows, _ = calls(first, min(flush, start + n - first), answer_words)
        t = time.perf_counter()
        with wh.write() as con:
            (old_write if old else write_calls)(con, rows)
            upsert(con, "item_descriptions", job_rows(rows))
        times.append(time.perf_counter() - t)
    return times


def old_lookup(wh: Warehouse, keys: list[str]) -> int:
    """Before: a read connection and an IN-list query per 2,000-key chunk."""
    found = 0
    for s in range(0, len(keys), 2000):
        with wh.read() as con:
            found += len(con.execute(
                "select key, text, finish_reason, input_tokens, output_tokens, reasoning,"
                " logprobs from llm_calls where status = 'ok' and key in"
                " (select unnest(?::varchar[]))", [keys[s:s + 2000]]).fetchall())
    return found


def timed(fn: Callable[[], Any], repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000, help="calls written (~4 KB answers)")
    ap.add_argument("--lookup", type=int, default=100000, help="cached work items replayed")
    ap.add_argument("--stored", type=int, default=0,
                    help="calls stored in the look-up warehouse (default: --lookup); more "
                         "shows the look-up does not grow with the table")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if min(args.rows, args.lookup, args.repeats) < 1:
        ap.error("--rows, --lookup and --repeats must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-teacher-store-"))
    pa.table({"warm": ["pyarrow's first table costs ~0.5 s once"]})
    sampling = Sampling(temperature=0.7, max_tokens=2048)
    result: dict[str, dict[str, float]] = {}
    for old in (True, False):
        name = "before (090)" if old else "after"
        wh = warehouse(tmp / f"{'old' if old else 'new'}.duckdb", old)
        times = fill(wh, old, args.rows, 600)
        # answers faster than 1,000-row flushes store them pile up (up to the engine's
        # max_buffer, 10x its batch) and the next flush takes them all
        behind = fill(wh, old, args.rows, 600, flush=10 * FLUSH, start=args.rows)
        with wh.write() as con:
            con.execute("checkpoint").fetchall()
        size = wh.path.stat().st_size
        tenth = max(1, len(times) // 10)
        r = result[name] = {
            "rows/s": args.rows / sum(times), "rows/s behind": args.rows / sum(behind),
            "bytes/call": size / (2 * args.rows),
            "flush first 10% s": statistics.median(times[:tenth]),
            "flush last 10% s": statistics.median(times[-tenth:])}
        # look-up: --lookup items with short answers (their size is not what is measured)
        lw = warehouse(tmp / f"lookup-{'old' if old else 'new'}.duckdb", old)
        stored = max(args.stored, args.lookup)
        for start in range(0, stored, 20000):
            rows, _ = calls(start, min(20000, stored - start), 20)
            with lw.write() as con:
                (old_write if old else write_calls)(con, rows)
                upsert(con, "item_descriptions", job_rows(rows))

        def replay(lw: Warehouse = lw, old: bool = old) -> None:
            keys = [Request.build("m", messages(i // SAMPLES, random.Random(i // SAMPLES)),
                                  sampling, i % SAMPLES).key for i in range(args.lookup)]
            if old:
                assert old_lookup(lw, keys) == len(keys)
            else:
                with lw.read() as con:
                    assert len(cached_answers(con, keys)) == len(keys)
        r["lookup+replay s"] = timed(replay, 1)
        with wh.read() as con:          # the ~4 KB answers: what a join must read
            item = con.execute("select min(item_id) from item_descriptions").fetchone()[0]
            for label, sql in (
                    ("traces latest 20 s",
                     "select * from traces order by created_at desc limit 20"),
                    ("table latest 20 s",
                     "select * from item_descriptions order by created_at desc limit 20"),
                    ("traces one run s", "select count(*), sum(cost_usd) from traces"
                                         " where job = 'describe-items' and run_id = 'r'"),
                    ("table one run s", "select count(*) from item_descriptions"
                                        " where run_id = 'r'"),
                    ("traces one item s", "select * from traces where job = 'describe-items'"
                                          " and item_id = '{item}'"),
                    ("table one item s", "select * from item_descriptions"
                                         " where item_id = '{item}'")):
                sql = sql.format(item=item)
                r[label] = timed(lambda sql=sql, con=con: con.execute(sql).fetchall(),
                                 args.repeats)
    shutil.rmtree(tmp)
    cols = list(next(iter(result.values())))
    print(f"{args.rows:,} calls written in {FLUSH:,}-row flushes, then {args.rows:,} in "
          f"{10 * FLUSH:,}-row ones (behind); {args.lookup:,} looked up among "
          f"{max(args.stored, args.lookup):,} stored")
    print("| " + " | ".join(["layout", *cols]) + " |")
    print("|" + " --- |" * (len(cols) + 1))
    for name, r in result.items():
        print("| " + " | ".join([name, *(f"{r[c]:,.3f}" if r[c] < 100 else f"{r[c]:,.0f}"
                                         for c in cols)]) + " |")
    if args.rows < 20000:
        print(f"(projections from {2 * args.rows:,} calls: the file's fixed overhead weighs "
              "more in a small sample; use --rows 20000 or more)")
    for name, r in result.items():
        print(f"{name}: 1M calls ~{r['bytes/call'] * 1e6 / 1e9:.1f} GB; "
              f"look-up of 1M items ~{r['lookup+replay s'] * 1e6 / args.lookup:.0f} s "
              "(linear in the items; the join probes the key, it does not scan per chunk)")


if __name__ == "__main__":
    main()
