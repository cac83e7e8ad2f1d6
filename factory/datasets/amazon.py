"""Amazon review datasets, 2014 (McAuley et al.) and 2018 (Ni et al.) formats.

Reviews are JSON lines in both. 2014 metadata lines are Python dict literals (single quotes),
2018 metadata lines are JSON; each line is detected on its own. Metadata lines for items that
no review mentions are skipped before parsing, which matters for the multi-GB meta files.
"""

from __future__ import annotations

import ast
import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from factory.datasets.raw import RawDataset
from factory.datasets.textio import iter_lines
from factory.errors import FactoryError

_ASIN = re.compile(r"""["']asin["']\s*:\s*["']([^"']+)["']""")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def _parse_record(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        try:
            record = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise FactoryError(
                f"{path}:{lineno}: malformed line (neither JSON nor a Python dict literal)"
            ) from None
    if not isinstance(record, dict):
        raise FactoryError(f"{path}:{lineno}: expected an object, got {type(record).__name__}")
    return record


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        value = " ".join(str(v) for v in value if v)
    text = html.unescape(str(value)).strip()
    return text or None


def _categories(record: dict[str, Any]) -> list[str]:
    raw = record.get("categories", record.get("category")) or []
    flat: list[str] = []
    for entry in raw:
        for name in entry if isinstance(entry, list) else [entry]:
            name = html.unescape(str(name)).strip()
            if name and name not in flat:
                flat.append(name)
    return flat


def _price(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _NUMBER.search(value)
        if m:
            try:
                return float(m.group(0).replace(",", ""))
            except ValueError:
                return None
    return None


def _read_reviews(path: Path) -> tuple[pa.Table, dict[str, int]]:
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    ratings: list[float | None] = []
    for lineno, line in iter_lines(path):
        rec = _parse_record(path, lineno, line)
        missing = [k for k in ("reviewerID", "asin", "unixReviewTime") if k not in rec]
        if missing:
            raise FactoryError(f"{path}:{lineno}: review has no {', '.join(missing)}")
        try:
            ts = int(rec["unixReviewTime"])
            rating = float(rec["overall"]) if rec.get("overall") is not None else None
        except (TypeError, ValueError):
            raise FactoryError(f"{path}:{lineno}: unixReviewTime/overall is not a number") from None
        users.append(str(rec["reviewerID"]))
        items.append(str(rec["asin"]))
        times.append(ts)
        ratings.append(rating)
    if not users:
        raise FactoryError(f"{path}: no reviews in file")
    table = pa.table({
        "user_id": pa.array(users, pa.string()),
        "item_id": pa.array(items, pa.string()),
        "ts": pa.array(times, pa.int64()),
        "rating": pa.array(ratings, pa.float64()),
        "ord": pa.array(np.arange(len(users), dtype=np.int64)),
    })
    return table, {"review_lines": len(users)}


def _read_meta(path: Path, wanted: set[str]) -> tuple[pa.Table, dict[str, int]]:
    rows: dict[str, dict[str, Any]] = {}
    seen = skipped = 0
    fmt = None
    for lineno, line in iter_lines(path):
        seen += 1
        m = _ASIN.search(line)
        if m and m.group(1) not in wanted:
            skipped += 1
            continue
        rec = _parse_record(path, lineno, line)
        asin = rec.get("asin")
        if not asin:
            raise FactoryError(f"{path}:{lineno}: metadata line has no asin")
        if fmt is None:
            fmt = "2014" if "categories" in rec or "salesRank" in rec else "2018"
        if asin in rows:
            continue  # 2018 meta repeats some items; the first line wins
        extra = {k: rec[k] for k in ("main_cat", "date") if rec.get(k)}
        rows[asin] = {
            "item_id": str(asin),
            "title": _text(rec.get("title")),
            "categories": _categories(rec),
            "brand": _text(rec.get("brand")),
            "description": _text(rec.get("description")),
            "price": _price(rec.get("price")),
            "attrs": json.dumps(extra) if extra else None,
        }
    table = pa.Table.from_pylist(
        list(rows.values()),
        schema=pa.schema([
            ("item_id", pa.string()), ("title", pa.string()),
            ("categories", pa.list_(pa.string())), ("brand", pa.string()),
            ("description", pa.string()), ("price", pa.float64()), ("attrs", pa.string()),
        ]),
    )
    return table, {"meta_lines": seen, "meta_lines_skipped": skipped, "meta_format": fmt or "none"}


def load_amazon(reviews: str | Path, meta: str | Path | None) -> RawDataset:
    reviews = Path(reviews)
    interactions, notes = _read_reviews(reviews)
    if meta is not None:
        wanted = set(interactions["item_id"].to_pylist())
        items, meta_notes = _read_meta(Path(meta), wanted)
        notes.update(meta_notes)
    else:
        items = pa.table({"item_id": pa.array([], pa.string())})
        items = items.append_column("title", pa.array([], pa.string()))
    for name, typ in (("categories", pa.list_(pa.string())), ("brand", pa.string()),
                      ("description", pa.string()), ("price", pa.float64()),
                      ("attrs", pa.string()), ("title", pa.string())):
        if name not in items.column_names:
            items = items.append_column(name, pa.nulls(items.num_rows, typ))
    return RawDataset(
        source=f"amazon-{notes.get('meta_format', 'reviews')}",
        interactions=interactions,
        items=items,
        params={"reviews": str(reviews), "meta": str(meta) if meta else None},
        notes=notes,
    )
