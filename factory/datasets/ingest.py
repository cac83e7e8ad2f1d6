"""Normalise a raw dataset and store it, all in one transaction.

Order of operations (each recorded in `datasets.normalisation`):
rows without user/item dropped -> duplicate (user, item) pairs collapsed to the earliest ->
iterative k-core -> optional truncation to each user's most recent N -> chronological
positions with the source order as the tie-break -> binary labels -> the default `loo` split.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import duckdb

from factory.datasets.raw import RawDataset
from factory.errors import FactoryError
from factory.runs import finish_run, start_run
from factory.splits import kcore, make_loo_split
from factory.warehouse import Warehouse

#: tables keyed by dataset that must keep their history when a dataset is replaced
_KEEP_ON_REPLACE = {"job_runs"}


@dataclass
class NormaliseOptions:
    core: int = 5
    max_len: int | None = None
    label_threshold: float | None = None


def dataset_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return con.execute("select 1 from datasets where name = ?", [name]).fetchone() is not None


def _delete_dataset(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """Remove every row of `name` from every base table that has a `dataset` column."""
    tables = con.execute(
        "select distinct c.table_name from information_schema.columns c"
        " join information_schema.tables t using (table_schema, table_name)"
        " where c.column_name = 'dataset' and t.table_type = 'BASE TABLE'"
        " and c.table_schema = 'main'"
    ).fetchall()
    for (table,) in tables:
        if table not in _KEEP_ON_REPLACE:
            con.execute(f'delete from "{table}" where dataset = ?', [name])
    con.execute("delete from datasets where name = ?", [name])


def _count(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    return int(con.execute(sql).fetchone()[0])


def _normalise(con: duckdb.DuckDBPyConnection, opts: NormaliseOptions) -> dict[str, Any]:
    notes: dict[str, Any] = {"raw_interactions": _count(con, "select count(*) from _raw_inter")}
    null_ts = _count(
        con, "select count(*) from _raw_inter where ts is null "
        "and user_id is not null and item_id is not null"
    )
    if null_ts:
        raise FactoryError(f"{null_ts} interactions have no timestamp; order cannot be known")
    con.execute(
        "create temp table _work as select * from _raw_inter"
        " where user_id is not null and item_id is not null and user_id <> '' and item_id <> ''"
    )
    notes["dropped_missing_ids"] = notes["raw_interactions"] - _count(
        con, "select count(*) from _work"
    )
    before = _count(con, "select count(*) from _work")
    con.execute(
        "create temp table _dedup as select * from _work"
        " qualify row_number() over (partition by user_id, item_id order by ts, ord) = 1"
    )
    notes["duplicates_removed"] = before - _count(con, "select count(*) from _dedup")

    rounds = kcore(con, "_dedup", opts.core)
    notes["core"] = opts.core
    notes["core_rounds"] = rounds
    notes["after_core"] = _count(con, "select count(*) from _dedup")
    if notes["after_core"] == 0:
        raise FactoryError(
            f"no interactions left after {opts.core}-core filtering; try a smaller --core"
        )

    if opts.max_len:
        con.execute(
            "create temp table _kept as select * from _dedup qualify row_number() over"
            " (partition by user_id order by ts desc, ord desc) <= ?",
            [opts.max_len],
        )
        notes["truncated"] = notes["after_core"] - _count(con, "select count(*) from _kept")
    else:
        con.execute("create temp table _kept as select * from _dedup")
        notes["truncated"] = 0
    notes["max_len"] = opts.max_len
    notes["label_threshold"] = opts.label_threshold
    notes["tie_break"] = "source order"
    return notes


def ingest(
    wh: Warehouse, name: str, raw: RawDataset, opts: NormaliseOptions, replace: bool = False,
    read_seconds: float = 0.0,
) -> dict[str, Any]:
    """Store `raw` as dataset `name`. Atomic: on any error the warehouse is unchanged.
    `read_seconds`: how long reading `raw` took, counted in the run's time."""
    started = time.perf_counter()
    with wh.write() as con:
        if dataset_exists(con, name) and not replace:
            raise FactoryError(f"dataset {name!r} already exists; pass --replace to overwrite it")
        params = {**raw.params, "name": name, **asdict(opts)}
        run_id = start_run(con, "ingest", name, params)
        con.register("_raw_inter", raw.interactions)
        con.register("_raw_items", raw.items)
        notes = {**raw.notes, **_normalise(con, opts)}
        if replace:
            _delete_dataset(con, name)

        con.execute(
            "insert into interactions select ?, user_id, item_id, ts, rating,"
            " case when ? is null or rating is null then null else rating > ? end,"
            " (row_number() over (partition by user_id order by ts, ord) - 1)::integer"
            " from _kept",
            [name, opts.label_threshold, opts.label_threshold],
        )
        con.execute(
            "insert into items select ?, k.item_id, r.title, r.categories, r.brand,"
            " r.description, r.price, r.attrs"
            " from (select distinct item_id from _kept) k"
            " left join (select * from _raw_items qualify row_number() over"
            "   (partition by item_id order by title nulls last) = 1) r using (item_id)",
            [name],
        )
        if raw.users is not None:
            con.register("_raw_users", raw.users)
            con.execute(
                "insert into users select ?, u.user_id, any_value(r.attrs)"
                " from (select distinct user_id from _kept) u"
                " left join _raw_users r using (user_id) group by u.user_id",
                [name],
            )
        else:
            con.execute(
                "insert into users select distinct ?, user_id, null from _kept", [name]
            )
        stats = con.execute(
            "select count(distinct user_id), count(distinct item_id), count(*)"
            " from interactions where dataset = ?",
            [name],
        ).fetchone()
        notes["items_without_title"] = con.execute(
            "select count(*) from items where dataset = ? and (title is null or trim(title) = '')",
            [name],
        ).fetchone()[0]
        con.execute(
            "insert into datasets (name, source, params, normalisation, n_users, n_items,"
            " n_interactions, run_id) values (?, ?, ?, ?, ?, ?, ?, ?)",
            [name, raw.source, json.dumps(params, default=str), json.dumps(notes, default=str),
             stats[0], stats[1], stats[2], run_id],
        )
        split_counts = make_loo_split(con, name, "loo")
        for tmp in ("_work", "_dedup", "_kept"):
            con.execute(f"drop table if exists {tmp}")
        for view in ("_raw_inter", "_raw_items", "_raw_users"):
            with contextlib.suppress(duckdb.Error):
                con.unregister(view)
        summary = {
            "dataset": name, "users": stats[0], "items": stats[1], "interactions": stats[2],
            **notes, "split_loo": split_counts,
        }
        finish_run(con, run_id, "succeeded", summary)
        # current_timestamp is the transaction's start, so both ends would read the same
        con.execute("update job_runs set started_at = started_at - to_microseconds(?),"
                    " finished_at = finished_at + to_microseconds(?) where run_id = ?",
                    [round(read_seconds * 1e6), round((time.perf_counter() - started) * 1e6),
                     run_id])
    summary["run_id"] = run_id
    return summary
