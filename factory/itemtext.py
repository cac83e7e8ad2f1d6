"""Item text as the TwiSTAR and ThinkRec prompts show it.

TwiSTAR (E.1) describes an item by its title and category; ThinkRec summarises the whole
metadata into keywords (B.1) and renders history items as "title (evaluation: yes/no) with
description: keywords" (sec. 3.2.1). One place builds these strings, so the teacher's
prompts and the fine-tuning exports show an item the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

ITEM_COLUMNS = "item_id, title, categories, brand, description, attrs"


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str | None
    categories: Sequence[str] | None = None
    brand: str | None = None
    description: str | None = None
    attrs: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Item:
        item_id, title, categories, brand, description, attrs = row
        return cls(str(item_id), _clean(title), categories, _clean(brand), _clean(description),
                   json.loads(attrs) if isinstance(attrs, str) else attrs)

    @property
    def category(self) -> str:
        return ", ".join(c for c in (self.categories or []) if c and c.strip())

    def text(self) -> str | None:
        """TwiSTAR's t_i: title and category; None when the item has no title."""
        if not self.title:
            return None
        return f"{self.title} ({self.category})" if self.category else self.title

    def profile(self) -> str | None:
        """Everything the metadata says, one field a line, for keyword extraction (B.1);
        None when there is no text to summarise."""
        lines = []
        if self.title:
            lines.append(f"Title: {self.title}")
        if self.category:
            lines.append(f"Categories: {self.category}")
        if self.brand:
            lines.append(f"Brand: {self.brand}")
        for key, value in (self.attrs or {}).items():
            if value not in (None, "", [], {}):
                lines.append(f"{key.replace('_', ' ').capitalize()}: {value}")
        if self.description:
            lines.append(f"Description: {self.description}")
        if not (self.title or self.description):
            return None
        return "\n".join(lines)


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def load_items(con: duckdb.DuckDBPyConnection, dataset: str,
               item_ids: Iterable[str] | None = None) -> dict[str, Item]:
    """Items of a dataset by id (all of them, or those listed)."""
    if item_ids is None:
        rows = con.execute(f"select {ITEM_COLUMNS} from items where dataset = ?",
                           [dataset]).fetchall()
    else:
        rows = con.execute(
            f"select {ITEM_COLUMNS} from items where dataset = ? and item_id in"
            " (select unnest(?::varchar[]))", [dataset, list(item_ids)]).fetchall()
    return {str(r[0]): Item.from_row(r) for r in rows}


def item_noun(con: duckdb.DuckDBPyConnection, dataset: str) -> str:
    """What the prompts call an item: "movie" for MovieLens, else "item" (--noun overrides,
    e.g. "book" for Amazon Books as in ThinkRec's prompts)."""
    row = con.execute("select source from datasets where name = ?", [dataset]).fetchone()
    return "movie" if row and str(row[0]).startswith("movielens") else "item"


def plural(noun: str) -> str:
    return noun if noun.endswith("s") else f"{noun}s"


@dataclass(frozen=True)
class HistoryEntry:
    item_id: str
    title: str
    label: bool
    keywords: Sequence[str] | None

    def to_json(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "title": self.title, "label": self.label,
                "keywords": list(self.keywords) if self.keywords else None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HistoryEntry:
        return cls(d["item_id"], d["title"], bool(d["label"]), d.get("keywords"))


def render_history(entries: Sequence[HistoryEntry], features: bool = False) -> str:
    """ThinkRec 3.2.1: `i_t with feature emb (evaluation: i_l) with description: i_k`, joined
    by "; ". `features` adds the <ItemID> placeholder where a CoLLM-style trainer inserts the
    item's collaborative embedding; the teacher prompts (B.3) go without. A user's first
    interaction has no history: "none"."""
    parts = []
    for e in entries:
        text = f'"{e.title}"'
        if features:
            text += " with feature <ItemID>"
        text += f" (evaluation: {'yes' if e.label else 'no'})"
        if e.keywords:
            text += f" with description: {', '.join(e.keywords)}"
        parts.append(text)
    return "; ".join(parts) or "none"


def latest_keywords(con: duckdb.DuckDBPyConnection, dataset: str) -> dict[str, list[str]]:
    """The most recent kept keyword list of every item that has one."""
    rows = con.execute(
        "select item_id, keywords from item_keywords where dataset = ? and verdict = 'kept'"
        " qualify row_number() over (partition by item_id order by created_at desc) = 1",
        [dataset]).fetchall()
    return {str(i): list(k) for i, k in rows}
