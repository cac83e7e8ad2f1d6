"""Fold shard warehouses into the main one, idempotently.

A cluster job runs one shard per task (`--shard i/N`), each on its own copy of the main
warehouse (`cp factory.duckdb shard-3.duckdb; factory --warehouse shard-3.duckdb JOB --shard
3/16`). Merging copies, table by table, the rows of every table that has a primary key:

- a key the main warehouse lacks is inserted;
- a key it has is left alone, except that a row whose `status` is not 'ok' is replaced by
  the shard's 'ok' row (a failure that a shard later got right);
- runs (job_runs, train_runs) are never imported half done as finished: a shard whose run
  is still running (its process alive) is refused ("wait for it"); a run whose process died
  is imported as 'died', with its paid answers (llm_calls, job rows); merging again after
  the shard's run finished replaces 'died' with how it ended;
- tables without a primary key (interactions, split_parts: inputs, identical in every copy)
  are not merged, nor is schema_migrations.

Shards are attached read-only and never upgraded: an older shard merges by the columns both
have. Each shard merges in one transaction, after every shard passed the checks (a DuckDB
file, no column of another type, no live run), so a failure leaves the main warehouse as it
was. Merging the same shard twice changes nothing, and the order of shards does not matter
except between two failures of the same key.
"""

from __future__ import annotations

import time
from pathlib import Path

import duckdb

from factory.errors import FactoryError, first_line
from factory.runs import FINISHED, death, liveness
from factory.teacher.journal import import_journals
from factory.teacher.store import LLM_CALL_COLUMNS, store_calls
from factory.warehouse import Warehouse

#: tables of runs: their status goes running -> died -> one of FINISHED, never back
RUN_TABLES = ("job_runs", "train_runs")
#: never merged: the main warehouse's own schema version
SKIP_TABLES = ("schema_migrations",)
ALIAS = "shard"


def _columns(con: duckdb.DuckDBPyConnection, database: str, table: str) -> dict[str, str]:
    """Column name -> type, in table order."""
    return dict(con.execute(
        "select column_name, data_type from duckdb_columns() where database_name = ?"
        " and table_name = ? and schema_name = 'main' order by column_index",
        [database, table]).fetchall())


def _primary_key(con: duckdb.DuckDBPyConnection, database: str, table: str) -> list[str]:
    row = con.execute(
        "select constraint_column_names from duckdb_constraints() where database_name = ?"
        " and table_name = ? and schema_name = 'main' and constraint_type = 'PRIMARY KEY'",
        [database, table]).fetchone()
    return list(row[0]) if row else []


def _main(con: duckdb.DuckDBPyConnection) -> str:
    return con.execute("select current_database()").fetchone()[0]


def _tables(con: duckdb.DuckDBPyConnection, alias: str) -> list[tuple[str, list[str], list[str]]]:
    """(table, key, columns both have) for every keyed table of the main warehouse that the
    shard has too."""
    main = _main(con)
    found = []
    for (table,) in con.execute(
            "select table_name from duckdb_tables() where database_name = ?"
            " and schema_name = 'main' order by table_name", [main]).fetchall():
        if table in SKIP_TABLES:
            continue
        key = _primary_key(con, main, table)
        theirs = _columns(con, alias, table)
        if not key or not theirs:
            continue
        cols = [c for c in _columns(con, main, table) if c in theirs]
        if all(k in cols for k in key):
            found.append((table, key, cols))
    return found


def check_shard(con: duckdb.DuckDBPyConnection, alias: str, shard: Path) -> dict[str, str]:
    """Refuse a shard whose columns have other types than here, or that holds a live run;
    returns {run_id: how it died} for its dead 'running' runs, to import as 'died'."""
    main = _main(con)
    checked = [(table, cols) for table, _, cols in _tables(con, alias)]
    if _old_layout(con, alias):      # its llm_calls table is checked against our view's types
        theirs = _columns(con, alias, "llm_calls")
        checked.append(("llm_calls", [c for c in _columns(con, main, "llm_calls")
                                      if c in theirs]))
    for table, cols in checked:
        ours, theirs = _columns(con, main, table), _columns(con, alias, table)
        for c in cols:
            if ours[c] != theirs[c]:
                raise FactoryError(
                    f"cannot merge {shard}: column {table}.{c} is {theirs[c]} there but "
                    f"{ours[c]} here; nothing was merged from it")
    if not _columns(con, alias, "job_runs"):
        return {}
    running = liveness(con, "status = 'running'", database=alias)
    ended = dict(con.execute(
        "select run_id, status from job_runs where run_id in (select unnest(?::varchar[]))",
        [[r.run_id for r in running]]).fetchall()) if running else {}
    dead = {}
    for r in running:
        if ended.get(r.run_id) in FINISHED:    # the main warehouse knows how it ended
            continue
        why = death(r)
        if why is None:
            age = "-" if r.heartbeat_age_s is None else f"{r.heartbeat_age_s:.0f}s ago"
            raise FactoryError(
                f"cannot merge {shard}: its run {r.run_id} ({r.job}, host {r.host or '?'} "
                f"pid {r.pid or '?'}, last sign of life {age}) is still running; wait for it "
                "to finish, then merge again (a run silent for FACTORY_RUN_STALE_S seconds "
                "counts as dead)")
        dead[r.run_id] = why
    return dead


def merge_shard(con: duckdb.DuckDBPyConnection, alias: str,
                dead: dict[str, str] | None = None) -> dict[str, int]:
    """Rows inserted or upgraded per table, from the attached database `alias`; runs in
    `dead` (run_id -> how it died) are stored as 'died'."""
    changed: dict[str, int] = {}
    finished = ", ".join(f"'{s}'" for s in FINISHED)
    for table, key, cols in _tables(con, alias):
        names = ", ".join(f'"{c}"' for c in cols)
        conflict = ", ".join(f'"{c}"' for c in key)
        updates = ", ".join(f'"{c}" = excluded."{c}"' for c in cols if c not in key)
        if table in RUN_TABLES and "status" in cols and updates:
            action = (f"do update set {updates} where (\"{table}\".status in ('running', 'died')"
                      f" and excluded.status in ({finished})) or (\"{table}\".status = 'running'"
                      " and excluded.status = 'died')")
        elif "status" in cols and updates:
            action = (f"do update set {updates} where \"{table}\".status <> 'ok'"
                      " and excluded.status = 'ok'")
        else:
            action = "do nothing"
        count = con.execute(
            f'insert into "{table}" ({names}) select {names} from "{alias}".main."{table}"'
            f" on conflict ({conflict}) {action}").fetchone()
        if count and count[0]:
            changed[table] = int(count[0])
    old_calls = _old_llm_calls(con, alias)
    if old_calls:
        changed["llm_call_rows"] = changed.get("llm_call_rows", 0) + old_calls
    for run_id, why in (dead or {}).items():
        con.execute("update job_runs set status = 'died', error = ?,"
                    " finished_at = coalesce(finished_at, heartbeat_at, current_timestamp)"
                    " where run_id = ? and status = 'running'",
                    [f"died ({why}; found by merge)", run_id]).fetchall()
    if dead and "train_runs" in {t for t, _, _ in _tables(con, alias)}:
        con.execute(
            "update train_runs t set status = 'died', error = j.error,"
            " finished_at = coalesce(t.finished_at, j.finished_at)"
            " from job_runs j where j.run_id = t.run_id and t.status = 'running'"
            " and j.status = 'died'").fetchall()
    return changed


def _old_layout(con: duckdb.DuckDBPyConnection, alias: str) -> bool:
    """Whether the shard keeps llm_calls as a table (from before migration 090)."""
    return bool(con.execute(
        "select 1 from duckdb_tables() where database_name = ? and schema_name = 'main'"
        " and table_name = 'llm_calls'", [alias]).fetchall()) and bool(
        _columns(con, _main(con), "llm_call_rows"))


def _old_llm_calls(con: duckdb.DuckDBPyConnection, alias: str) -> int:
    """A shard from before migration 090 keeps llm_calls as a table: its rows are split into
    llm_prompts/llm_call_rows here, by the rules above (new keys, and 'ok' over a failure)."""
    if not _old_layout(con, alias):
        return 0
    theirs = _columns(con, alias, "llm_calls")
    cols = ", ".join(f'"{c}"' if c in theirs else f"null as {c}"
                     for c in (*LLM_CALL_COLUMNS, "created_at"))
    source = (f'(select {cols} from "{alias}".main.llm_calls s where not exists ('
              "select 1 from llm_call_rows c where c.key = s.key"
              " and (c.status = 'ok' or s.status <> 'ok')))")
    return store_calls(con, source, created="created_at")


def _probe(shard: Path, lock_timeout: float) -> None:
    """A DuckDB file with the factory schema that no process is writing to, or a FactoryError.
    Opened read-only: never upgraded, never written."""
    deadline = time.monotonic() + lock_timeout
    delay = 0.05
    while True:
        try:
            con = duckdb.connect(str(shard), read_only=True)
            break
        except duckdb.Error as exc:
            text = first_line(exc)
            if "lock" in text.lower():
                if time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                raise FactoryError(
                    f"cannot merge {shard}: another process is writing to it (a job still "
                    "running on it?); wait for it to finish, then merge again") from None
            if "not a valid duckdb database" in text.lower():
                raise FactoryError(f"cannot merge {shard}: not a DuckDB database file") from None
            raise FactoryError(f"cannot merge {shard}: {text}") from None
    try:
        known = con.execute("select 1 from duckdb_tables() where table_name = 'schema_migrations'"
                            " and schema_name = 'main'").fetchone()
    finally:
        con.close()
    if not known:
        raise FactoryError(f"cannot merge {shard}: a DuckDB file but not a factory warehouse "
                           "(no schema_migrations table)")


def _attach(con: duckdb.DuckDBPyConnection, shard: Path) -> None:
    path = str(shard.resolve()).replace("'", "''")
    try:
        con.execute(f"attach '{path}' as {ALIAS} (read_only)").fetchall()
    except duckdb.Error as exc:
        raise FactoryError(f"cannot merge {shard}: {first_line(exc)}") from None


def merge_warehouses(wh: Warehouse, shards: list[Path]) -> dict[str, dict[str, int]]:
    """Merge each shard file into `wh`; returns {shard: {table: rows changed}}. Every shard is
    checked before any is merged; each merges in one transaction."""
    main = wh.path.resolve()
    for shard in shards:
        if not shard.is_file():
            raise FactoryError(f"no shard warehouse at {shard}")
        if shard.resolve() == main:
            raise FactoryError(f"{shard} is the main warehouse itself")
    if len({s.resolve() for s in shards}) != len(shards):
        raise FactoryError("a shard is named twice")
    for shard in shards:
        _probe(shard, wh.lock_timeout)
    for shard in shards:
        with wh.write() as con:             # checks only: nothing is written here
            _attach(con, shard)
            check_shard(con, ALIAS, shard)
    results: dict[str, dict[str, int]] = {}
    for shard in shards:
        with wh.write() as con:             # one transaction per shard; detached on close
            _attach(con, shard)
            dead = check_shard(con, ALIAS, shard)
            try:
                results[str(shard)] = merge_shard(con, ALIAS, dead)
                journaled = import_journals(wh, con, shard)   # answers its dead runs held
                if journaled:
                    results[str(shard)]["llm_calls from journals"] = journaled
            except duckdb.Error as exc:
                done = f" ({len(results)} shard(s) before it were merged)" if results else ""
                raise FactoryError(f"cannot merge {shard}: {first_line(exc)}; nothing of it "
                                   f"was merged{done}") from None
    return results
