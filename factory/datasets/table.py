"""Generic interactions/items tables (CSV, TSV, Parquet, JSON lines) with column mapping."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv, parquet
from pyarrow import json as pajson

from factory.datasets.raw import RawDataset
from factory.datasets.textio import require_file
from factory.errors import FactoryError


@dataclass
class ColumnMap:
    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    rating: str | None = "rating"
    title: str | None = "title"
    categories: str | None = "categories"
    categories_sep: str = "|"
    brand: str | None = "brand"
    description: str | None = "description"
    price: str | None = "price"
    time_unit: str = "s"  # unit of integer timestamps: s | ms


def read_table(path: str | Path) -> pa.Table:
    p = require_file(path)
    suffix = "".join(p.suffixes[-2:]).lower() if p.suffix == ".gz" else p.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return parquet.read_table(p)
        if suffix in (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".json.gz"):
            return pajson.read_json(p)
        if suffix in (".csv", ".tsv", ".csv.gz", ".tsv.gz", ".txt"):
            delim = "\t" if ".tsv" in suffix or suffix == ".txt" else ","
            return csv.read_csv(p, parse_options=csv.ParseOptions(delimiter=delim))
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise FactoryError(f"{p}: cannot read table: {first}") from exc
    raise FactoryError(f"{p}: unknown table format (use .csv, .tsv, .parquet or .jsonl)")


def _column(table: pa.Table, name: str, path: str | Path, what: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise FactoryError(
            f"{path}: no column {name!r} for {what} (columns: {', '.join(table.column_names)})"
        )
    return table[name]


def _as_text(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.cast(col, pa.string())


def _epoch_seconds(col: pa.ChunkedArray, unit: str, path: str | Path) -> pa.ChunkedArray:
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        secs = pc.cast(col, pa.float64())
        if unit == "ms":
            secs = pc.divide(secs, 1000.0)
        return pc.cast(pc.floor(secs), pa.int64())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            return pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise FactoryError(f"{path}: time column holds text that is not a timestamp") from exc
    raise FactoryError(f"{path}: time column has unsupported type {t}")


def load_table(interactions: str | Path, items: str | Path | None, cols: ColumnMap) -> RawDataset:
    inter = read_table(interactions)
    n = inter.num_rows
    if n == 0:
        raise FactoryError(f"{interactions}: no rows")
    rating = (
        pc.cast(_column(inter, cols.rating, interactions, "rating"), pa.float64())
        if cols.rating and cols.rating in inter.column_names else pa.nulls(n, pa.float64())
    )
    raw_inter = pa.table({
        "user_id": _as_text(_column(inter, cols.user, interactions, "user")),
        "item_id": _as_text(_column(inter, cols.item, interactions, "item")),
        "ts": _epoch_seconds(_column(inter, cols.time, interactions, "time"), cols.time_unit,
                             interactions),
        "rating": rating,
        "ord": pa.array(np.arange(n, dtype=np.int64)),
    })

    if items is None:
        item_ids = pc.unique(raw_inter["item_id"])
        m = len(item_ids)
        raw_items = pa.table({
            "item_id": item_ids, "title": pa.nulls(m, pa.string()),
            "categories": pa.nulls(m, pa.list_(pa.string())), "brand": pa.nulls(m, pa.string()),
            "description": pa.nulls(m, pa.string()), "price": pa.nulls(m, pa.float64()),
            "attrs": pa.nulls(m, pa.string()),
        })
    else:
        raw_items = _map_items(read_table(items), items, cols)
    return RawDataset(
        source="table",
        interactions=raw_inter,
        items=raw_items,
        params={"interactions": str(interactions), "items": str(items) if items else None,
                "columns": cols.__dict__},
    )


def _map_items(tab: pa.Table, path: str | Path, cols: ColumnMap) -> pa.Table:
    m = tab.num_rows
    used = {cols.item}

    def optional(name: str | None, typ: pa.DataType) -> pa.ChunkedArray | pa.Array:
        if name and name in tab.column_names:
            used.add(name)
            return pc.cast(tab[name], typ)
        return pa.nulls(m, typ)

    cats: pa.ChunkedArray | pa.Array
    if cols.categories and cols.categories in tab.column_names:
        used.add(cols.categories)
        col = tab[cols.categories]
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            cats = pc.cast(col, pa.list_(pa.string()))
        else:
            cats = pc.split_pattern(pc.cast(col, pa.string()), cols.categories_sep)
    else:
        cats = pa.nulls(m, pa.list_(pa.string()))
    title = optional(cols.title, pa.string())
    brand = optional(cols.brand, pa.string())
    desc = optional(cols.description, pa.string())
    price = optional(cols.price, pa.float64())
    rest = [c for c in tab.column_names if c not in used]
    attrs = (
        [json.dumps(r, default=str) for r in tab.select(rest).to_pylist()] if rest else [None] * m
    )
    return pa.table({
        "item_id": _as_text(_column(tab, cols.item, path, "item")),
        "title": title, "categories": cats, "brand": brand, "description": desc,
        "price": price, "attrs": pa.array(attrs, pa.string()),
    })
