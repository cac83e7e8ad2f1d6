"""The contract between a loader and ingest: raw Arrow tables in source order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

INTERACTION_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("item_id", pa.string()),
    ("ts", pa.int64()),
    ("rating", pa.float64()),
    ("ord", pa.int64()),  # position in the source file: the stable tie-break for equal times
])

ITEM_SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("title", pa.string()),
    ("categories", pa.list_(pa.string())),
    ("brand", pa.string()),
    ("description", pa.string()),
    ("price", pa.float64()),
    ("attrs", pa.string()),  # JSON text
])

USER_SCHEMA = pa.schema([("user_id", pa.string()), ("attrs", pa.string())])


@dataclass
class RawDataset:
    source: str
    interactions: pa.Table
    items: pa.Table
    users: pa.Table | None = None
    params: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)  # loader tallies, e.g. skipped lines

    def __post_init__(self) -> None:
        self.interactions = self.interactions.select(INTERACTION_SCHEMA.names).cast(
            INTERACTION_SCHEMA
        )
        self.items = self.items.select(ITEM_SCHEMA.names).cast(ITEM_SCHEMA)
        if self.users is not None:
            self.users = self.users.select(USER_SCHEMA.names).cast(USER_SCHEMA)
