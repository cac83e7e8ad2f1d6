"""Named splits stored as data: every interaction a split uses gets a part (train/valid/test).

Later jobs select a split by name and read `split_interactions where part = 'train'`, so the
rule that made the split lives here once and the result can be inspected with SQL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


def require_loo(con: duckdb.DuckDBPyConnection, dataset: str, split: str, why: str) -> None:
    """Refuse, before any work is paid for, a split that is not leave-one-out where `why`
    needs one target per user and part."""
    kind = con.execute("select kind from splits where dataset = ? and name = ?",
                       [dataset, split]).fetchone()
    if kind is not None and kind[0] != "loo":
        raise FactoryError(f"split {split!r} of {dataset!r} is {kind[0]}; {why} needs a "
                           "leave-one-out split (--split loo)")


def _epoch(value: str) -> int:
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise FactoryError(f"not a date: {value!r} (use YYYY-MM-DD)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


def kcore(con: duckdb.DuckDBPyConnection, table: str, k: int) -> int:
    """Iteratively delete users and items with fewer than `k` rows of `table`; the rounds."""
    rounds = 0
    while k > 1:
        removed = con.execute(
            f"delete from {table} where user_id in ("
            f"  select user_id from {table} group by user_id having count(*) < $k)"
            f" or item_id in (select item_id from {table} group by item_id having count(*) < $k)",
            {"k": k},
        ).fetchone()[0]
        if not removed:
            break
        rounds += 1
    return rounds


def _month_window(con: duckdb.DuckDBPyConnection, dataset: str, window: int, train: int,
                  valid: int) -> tuple[int, int, int, int]:
    """Whole calendar months before the month of the last interaction (that month, usually
    partial, is left out, as ThinkRec's own ML-1M code does): (start, train end, valid end, end)."""
    max_ts = con.execute(
        "select max(ts) from interactions where dataset = ?", [dataset]).fetchone()[0]
    cut = con.execute(
        "select epoch(e - to_months($w))::bigint, epoch(e - to_months($w - $t))::bigint,"
        " epoch(e - to_months($w - $t - $v))::bigint, epoch(e)::bigint"
        " from (select date_trunc('month', to_timestamp($m) at time zone 'UTC') as e)",
        {"m": max_ts, "w": window, "t": train, "v": valid},
    ).fetchone()
    lo, t_end, v_end, end = (int(x) for x in cut)
    return lo, t_end, v_end, end


def make_temporal_split(
    con: duckdb.DuckDBPyConnection,
    dataset: str,
    name: str,
    *,
    start: str | None = None,
    train_end: str | None = None,
    valid_end: str | None = None,
    end: str | None = None,
    window_months: int | None = None,
    train_months: int | None = None,
    valid_months: int | None = None,
    core: int = 1,
    heldout: str = "time",
    replace: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Temporal cut-offs (ThinkRec 4.1): [start, train_end) train, the rest up to `end`
    (exclusive) held out. `heldout='time'` makes [train_end, valid_end) valid and the rest
    test; `'halves'` orders the held-out interactions by time and gives the first half to
    valid, the second to test (ThinkRec's Book and Yelp). `core` filters users and items with
    fewer interactions *inside* the window, iteratively. Give dates, or whole calendar months
    (`window_months`, `train_months`, `valid_months`) ending before the last interaction's
    month."""
    if heldout not in ("time", "halves"):
        raise FactoryError("--heldout must be time or halves")
    if name == "loo":
        raise FactoryError("'loo' is the leave-one-out split every job defaults to; "
                           "name a temporal split otherwise")
    if window_months is not None:
        if any(d is not None for d in (start, train_end, valid_end, end)):
            raise FactoryError("--window-months counts back from the last interaction; give "
                               "either months or dates (--start/--train-end/--valid-end/--end)")
        if train_months is None or (valid_months is None and heldout == "time"):
            raise FactoryError("--window-months needs --train-months and --valid-months")
        valid_months = valid_months if heldout == "time" else 0
        if train_months + valid_months >= window_months:
            raise FactoryError("train + valid months must leave some months for test")
        lo, t_end, v_end, hi = _month_window(con, dataset, window_months, train_months,
                                             valid_months)
    else:
        if train_end is None or (valid_end is None and heldout == "time"):
            raise FactoryError("a temporal split needs --train-end" + (
                " and --valid-end dates" if heldout == "time" else " (--heldout halves)"))
        lo = _epoch(start) if start else None
        t_end = _epoch(train_end)
        v_end = _epoch(valid_end) if valid_end else None
        hi = _epoch(end) if end else None
    bounds = [b for b in (lo, t_end, v_end if heldout == "time" else None, hi) if b is not None]
    if bounds != sorted(set(bounds)):
        raise FactoryError("temporal cut-offs must be increasing: "
                           "start < train end < valid end < end")
    _clear(con, dataset, name, replace)
    con.execute(
        "create or replace temp table _window as select user_id, item_id, position, ts"
        " from interactions where dataset = $d and ($lo is null or ts >= $lo)"
        " and ($hi is null or ts < $hi)",
        {"d": dataset, "lo": lo, "hi": hi},
    )
    inside = con.execute("select count(*) from _window").fetchone()[0]
    rounds = kcore(con, "_window", core)
    if inside and not con.execute("select count(*) from _window").fetchone()[0]:
        con.execute("drop table _window")
        raise FactoryError(f"the {core}-core filter leaves none of the window's {inside:,} "
                           "interactions; lower --core")
    con.execute(
        "insert into split_parts select $d, $name, user_id, position,"
        " case when ts < $t then 'train'"
        "      when $halves then case when h <= n // 2 then 'valid' else 'test' end"
        "      when ts < $v then 'valid' else 'test' end"
        " from (select *, count(*) filter (where ts >= $t) over () as n,"
        "        row_number() over (partition by ts >= $t order by ts, user_id, position) as h"
        "       from _window)",
        {"name": name, "t": t_end, "v": v_end, "d": dataset, "halves": heldout == "halves"},
    )
    con.execute("drop table _window")
    params = {"start": lo, "train_end": t_end, "valid_end": v_end, "end": hi, "core": core,
              "core_rounds": rounds, "heldout": heldout, **(extra or {})}
    counts = _record(con, dataset, name, "temporal", params)
    if not counts:
        raise FactoryError("the cut-offs select no interactions")
    if "train" not in counts:
        raise FactoryError("no interaction falls before the train end: the split would have "
                           "nothing to train on")
    return counts


def describe_cutoffs(params: dict[str, Any]) -> str:
    """`2001-06-01 .. 2002-04-01 | 2002-09-01 .. 2003-02-01` from a temporal split's params."""
    def day(ts: int | None) -> str:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d") if ts else "..."

    held = "halves" if params.get("heldout") == "halves" else day(params.get("valid_end"))
    return (f"train {day(params.get('start'))} to {day(params.get('train_end'))}, valid/test "
            f"split at {held}, end {day(params.get('end'))}")


# -- the papers' protocols, by name ------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """A paper's split protocol: dates and filtering, with where it comes from."""

    start: str
    train_end: str
    valid_end: str | None
    end: str | None
    core: int
    heldout: str
    source: str


PRESETS: dict[str, Preset] = {
    # the last 20 whole months; ThinkRec's code drops Feb 2003 (the partial last month) and
    # filters nothing: its train/valid/test are 33,891 / 10,401 / 7,331, as in Table 1
    "thinkrec-ml1m": Preset("2001-06-01", "2002-04-01", "2002-09-01", "2003-02-01", 1, "time",
                            "ThinkRec 4.1 (ML1M): last 20 months, 10 train, 10 valid+test"),
    "thinkrec-book": Preset("2017-01-01", "2017-11-01", None, "2018-01-01", 20, "halves",
                            "ThinkRec 4.1 (Book): 2017, 10 months train, 2 valid+test, 20-core"),
    "thinkrec-yelp": Preset("2010-01-01", "2020-01-01", None, None, 20, "halves",
                            "ThinkRec 4.1 (Yelp): 2010-2022, 10 years train, 2 valid+test, "
                            "20-core"),
}

#: which preset `--preset thinkrec` means for a dataset, by the source it was ingested from
_BY_SOURCE = {("thinkrec", "movielens-1m"): "thinkrec-ml1m"}


def resolve_preset(con: duckdb.DuckDBPyConnection, dataset: str, preset: str) -> str | None:
    """The full preset name for `preset` on `dataset` (`thinkrec` -> `thinkrec-ml1m` for an
    ML-1M ingest), or None when the dataset has no such protocol."""
    if preset in PRESETS:
        return preset
    source = con.execute("select source from datasets where name = ?", [dataset]).fetchone()
    return _BY_SOURCE.get((preset, source[0] if source else None))


def make_preset_split(con: duckdb.DuckDBPyConnection, dataset: str, preset: str,
                      name: str | None = None, replace: bool = False) -> tuple[str, dict]:
    """Make the split a paper's protocol defines; returns (split name, counts)."""
    full = resolve_preset(con, dataset, preset)
    if full is None:
        names = ", ".join(sorted(PRESETS))
        raise FactoryError(f"no {preset!r} protocol is known for {dataset!r}; "
                           f"name one of: {names}")
    p = PRESETS[full]
    name = name or full.split("-")[0]
    counts = make_temporal_split(
        con, dataset, name, start=p.start, train_end=p.train_end, valid_end=p.valid_end,
        end=p.end, core=p.core, heldout=p.heldout, replace=replace,
        extra={"preset": full, "protocol": p.source})
    return name, counts


def thinkrec_split(con: duckdb.DuckDBPyConnection, dataset: str,
                   split: str | None) -> tuple[str, str | None]:
    """The split a ThinkRec job uses when none is named: `thinkrec` if it exists, made from
    the paper's protocol when the dataset has one, else `loo`. Returns (split, a line to
    print when the split was made here)."""
    if split is not None:
        return split, None
    if con.execute("select 1 from splits where dataset = ? and name = 'thinkrec'",
                   [dataset]).fetchone():
        return "thinkrec", None
    if resolve_preset(con, dataset, "thinkrec") is not None:
        name, counts = make_preset_split(con, dataset, "thinkrec")
        sizes = " / ".join(f"{counts.get(p, {}).get('interactions', 0):,}"
                           for p in ("train", "valid", "test"))
        return name, (f"split 'thinkrec' of {dataset} made from ThinkRec's protocol "
                      f"(train/valid/test {sizes})")
    return "loo", None
