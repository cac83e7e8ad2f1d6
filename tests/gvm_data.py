"""A small outdoor-gear dataset for GVM job tests: a catalog small enough to embed in seconds.

40 users with 8 seeded purchases each over 30 products (titles, categories, brands), ingested
through the ordinary table loader, so the leave-one-out split is the real one.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from factory.datasets.ingest import NormaliseOptions, ingest
from factory.datasets.table import ColumnMap, load_table
from factory.gvm.sequences import item_info, item_text, sample_sequences
from factory.warehouse import Warehouse

KINDS = ["tent", "sleeping bag", "trail shoes", "headlamp", "water filter", "camp stove",
         "trekking poles", "rain jacket", "backpack", "cooler"]
BRANDS = ["Alpine Co", "RiverRun", "Summit Works"]


def write_toy(directory: Path) -> tuple[Path, Path]:
    rng = random.Random(7)
    items = [{"item_id": f"i{n:02d}", "title": f"{BRANDS[n % 3]} {KINDS[n % 10]} model {n}",
              "categories": f"Outdoors|{KINDS[n % 10].title()}", "brand": BRANDS[n % 3]}
             for n in range(30)]
    inter = []
    for u in range(40):
        for t, item in enumerate(rng.sample(items, 8)):
            inter.append({"user_id": f"u{u:02d}", "item_id": item["item_id"],
                          "timestamp": 1_600_000_000 + u * 1000 + t, "rating": 5})
    paths = directory / "inter.csv", directory / "items.csv"
    for path, rows in zip(paths, (inter, items), strict=True):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return paths


def toy_warehouse(path: Path, name: str = "toy") -> Warehouse:
    wh = Warehouse(path)
    inter, items = write_toy(path.parent)
    ingest(wh, name, load_table(inter, items, ColumnMap()), NormaliseOptions(core=5))
    return wh


def oracle(wh: Warehouse, dataset: str) -> dict[tuple[str, ...], str]:
    """History titles -> the validation item's text, for every user of the dataset."""
    with wh.read() as con:
        seqs = sample_sequences(con, dataset, "loo", 10**6, seed=0)
        info = item_info(con, dataset)
    return {tuple(info[i]["title"] for i in s.history): item_text(info[s.target]) for s in seqs}
