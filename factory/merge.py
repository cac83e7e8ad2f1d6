"""Fold shard warehouses into the main one, idempotently.

A cluster job runs one shard per task (`--shard i/N`), each on its own copy of the main
warehouse (`cp factory.duckdb shard-3.duckdb; factory --warehouse shard-3.duckdb JOB --shard
3/16`). Merging copies, table by table, the rows of every table that has a primary key:

- a key the main warehouse lacks is inserted;
- a key it has is left alone, except that a row whose `status` is not 'ok' is replaced by
  the shard's 'ok' row (a failure that a shard later got right);
- tables without a primary key (interactions, split_parts: inputs, identical in every copy)
  are not merged.

So merging the same shard twice changes nothing, and the order of shards does not matter
except between two failures of the same key.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from factory.errors import FactoryError
from factory.teacher.store import primary_key
from factory.warehouse import Warehouse


def _columns(con: duckdb.DuckDBPyConnection, database: str, table: str) -> list[str]:
    return [c for (c,) in con.execute(
        "select column_name from duckdb_columns() where database_name = ? and table_name = ?"
        " and schema_name = 'main' order by column_index", [database, table]).fetchall()]


def merge_shard(con: duckdb.DuckDBPyConnection, alias: str) -> dict[str, int]:
    """Rows inserted or upgraded per table, from the attached database `alias`."""
    tables = [t for (t,) in con.execute(
        "select table_name from duckdb_tables() where database_name = current_database()"
        " and schema_name = 'main' order by table_name").fetchall()]
    changed: dict[str, int] = {}
    for table in tables:
        key = primary_key(con, table)
        theirs = set(_columns(con, alias, table))
        if not key or not theirs:
            continue
        cols = [c for c in _columns(con, con.execute("select current_database()").fetchone()[0],
                                    table) if c in theirs]
        names = ", ".join(f'"{c}"' for c in cols)
        conflict = ", ".join(f'"{c}"' for c in key)
        if "status" in cols:
            updates = ", ".join(f'"{c}" = excluded."{c}"' for c in cols if c not in key)
            action = (f"do update set {updates} where \"{table}\".status <> 'ok'"
                      " and excluded.status = 'ok'")
        else:
            action = "do nothing"
        count = con.execute(
            f'insert into "{table}" ({names}) select {names} from {alias}.main."{table}"'
            f" on conflict ({conflict}) {action}").fetchone()
        if count and count[0]:
            changed[table] = int(count[0])
    return changed


def merge_warehouses(wh: Warehouse, shards: list[Path]) -> dict[str, dict[str, int]]:
    """Merge each shard file into `wh`; returns {shard: {table: rows changed}}."""
    main = wh.path.resolve()
    for shard in shards:
        if not shard.is_file():
            raise FactoryError(f"no shard warehouse at {shard}")
        if shard.resolve() == main:
            raise FactoryError(f"{shard} is the main warehouse itself")
    results: dict[str, dict[str, int]] = {}
    for shard in shards:
        with Warehouse(shard).read():      # brings an older shard file up to this schema
            pass
        with wh.write() as con:
            path = str(shard.resolve()).replace("'", "''")
            con.execute(f"attach '{path}' as shard (read_only)").fetchall()   # detached on close
            results[str(shard)] = merge_shard(con, "shard")
    return results
