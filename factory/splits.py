"""Named splits stored as data: every interaction a split uses gets a part (train/valid/test).

Later jobs select a split by name and read `split_interactions where part = 'train'`, so the
rule that made the split lives here once and the result can be inspected with SQL.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import duckdb

from factory.errors import FactoryError


def _record(
    con: duckdb.DuckDBPyConnection, dataset: str, name: str, kind: str, params: dict[str, Any]
) -> dict[str, Any]:
    rows = con.execute(
        "select part, count(*), count(distinct user_id) from split_parts"
        " where dataset = ? and split = ? group by part order by part",
        [dataset, name],
    ).fetchall()
    counts = {part: {"interactions": n, "users": u} for part, n, u in rows}
    con.execute(
        "insert into splits (dataset, name, kind, params, counts) values (?, ?, ?, ?, ?)",
        [dataset, name, kind, json.dumps(params), json.dumps(counts)],
    )
    return counts


def _clear(con: duckdb.DuckDBPyConnection, dataset: str, name: str, replace: bool) -> None:
    exists = con.execute(
        "select 1 from splits where dataset = ? and name = ?", [dataset, name]
    ).fetchone()
    if exists and not replace:
        raise FactoryError(f"split {name!r} of {dataset!r} exists; pass --replace to rebuild it")
    con.execute("delete from split_parts where dataset = ? and split = ?", [dataset, name])
    con.execute("delete from splits where dataset = ? and name = ?", [dataset, name])


def make_loo_split(
    con: duckdb.DuckDBPyConnection, dataset: str, name: str = "loo", replace: bool = False
) -> dict[str, Any]:
    """Leave-one-out (TwiSTAR, SCoTER): last item test, second-last validation, rest train.

    Users with fewer than 3 interactions have nothing to hold out and go wholly to train.
    """
    _clear(con, dataset, name, replace)
    con.execute(
        "insert into split_parts select dataset, ?, user_id, position,"
        " case when n >= 3 and position = n - 1 then 'test'"
        "      when n >= 3 and position = n - 2 then 'valid' else 'train' end"
        " from (select dataset, user_id, position, count(*) over (partition by user_id) as n"
        "       from interactions where dataset = ?)",
        [name, dataset],
    )
    return _record(con, dataset, name, "loo", {})


def _epoch(value: str) -> int:
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise FactoryError(f"not a date: {value!r} (use YYYY-MM-DD)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


def make_temporal_split(
    con: duckdb.DuckDBPyConnection,
    dataset: str,
    name: str,
    *,
    start: str | None = None,
    train_end: str | None = None,
    valid_end: str | None = None,
    window_months: int | None = None,
    train_months: int | None = None,
    valid_months: int | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """Temporal cut-offs (ThinkRec 4.1): [start, train_end) train, [train_end, valid_end) valid,
    [valid_end, ...) test. Give dates, or months counted back from the last interaction
    (ML-1M in ThinkRec: --window-months 20 --train-months 10 --valid-months 5)."""
    if window_months is not None:
        if train_months is None or valid_months is None:
            raise FactoryError("--window-months needs --train-months and --valid-months")
        if train_months + valid_months >= window_months:
            raise FactoryError("train + valid months must leave some months for test")
        max_ts = con.execute(
            "select max(ts) from interactions where dataset = ?", [dataset]
        ).fetchone()[0]
        cut = con.execute(
            "select epoch(s)::bigint, epoch(s + to_months($t))::bigint,"
            " epoch(s + to_months($t + $v))::bigint"
            " from (select to_timestamp($m) - to_months($w) as s)",
            {"m": max_ts, "w": window_months, "t": train_months, "v": valid_months},
        ).fetchone()
        lo, t_end, v_end = (int(x) for x in cut)
    else:
        if train_end is None or valid_end is None:
            raise FactoryError("a temporal split needs --train-end and --valid-end dates")
        lo = _epoch(start) if start else None
        t_end, v_end = _epoch(train_end), _epoch(valid_end)
    if lo is not None and lo >= t_end or t_end >= v_end:
        raise FactoryError("temporal cut-offs must be increasing: start < train end < valid end")
    _clear(con, dataset, name, replace)
    con.execute(
        "insert into split_parts select dataset, $name, user_id, position,"
        " case when ts < $t then 'train' when ts < $v then 'valid' else 'test' end"
        " from interactions where dataset = $d and ($lo is null or ts >= $lo)",
        {"name": name, "t": t_end, "v": v_end, "d": dataset, "lo": lo},
    )
    params = {"start": lo, "train_end": t_end, "valid_end": v_end}
    counts = _record(con, dataset, name, "temporal", params)
    if not counts:
        raise FactoryError("the cut-offs select no interactions")
    return counts
