"""Tiny Amazon review/meta files in the exact public formats (2014 and 2018)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

# 4 users x 5 items, every user reviews every item: survives 3-core and 4-core.
USERS = ["A1", "A2", "A3", "A4"]
ITEMS = ["B001", "B002", "B003", "B004", "B005"]


def _reviews() -> list[dict]:
    rows = []
    for u, user in enumerate(USERS):
        for i, item in enumerate(ITEMS):
            rows.append({
                "reviewerID": user, "asin": item, "reviewerName": f"name {user}",
                "helpful": [0, 0], "reviewText": "fine", "overall": float(1 + (u + i) % 5),
                "summary": "ok", "unixReviewTime": 1_400_000_000 + 86400 * (i + u),
                "reviewTime": "05 13, 2014",
            })
    return rows


def write_2014(tmp: Path) -> tuple[Path, Path]:
    reviews = tmp / "reviews_Sports_and_Outdoors_5.json.gz"
    meta = tmp / "meta_Sports_and_Outdoors.json.gz"
    with gzip.open(reviews, "wt", encoding="utf-8") as fh:
        for r in _reviews():
            fh.write(json.dumps(r) + "\n")
    with gzip.open(meta, "wt", encoding="utf-8") as fh:
        for k, item in enumerate(ITEMS):
            rec = {
                "asin": item, "title": f"Trail Shoe {k} & Co",
                "price": 10.5 + k, "imUrl": "http://x/y.jpg",
                "related": {"also_bought": ["B999"]}, "salesRank": {"Sports & Outdoors": 100 + k},
                "categories": [["Sports & Outdoors", "Running"], ["Sports & Outdoors", "Shoes"]],
                "brand": "Acme", "description": "It's a shoe with \"grip\".",
            }
            fh.write(repr(rec) + "\n")  # Python literal, as the 2014 dump: single quotes
        fh.write(repr({"asin": "B999", "title": "never reviewed"}) + "\n")
    return reviews, meta


def write_2018(tmp: Path) -> tuple[Path, Path]:
    reviews = tmp / "Sports_and_Outdoors_5.json.gz"
    meta = tmp / "meta_Sports_and_Outdoors.json.gz"
    with gzip.open(reviews, "wt", encoding="utf-8") as fh:
        for r in _reviews():
            r = {k: v for k, v in r.items() if k not in ("helpful",)}
            r["verified"] = True
            r["style"] = {"Size:": " 10"}
            fh.write(json.dumps(r) + "\n")
    with gzip.open(meta, "wt", encoding="utf-8") as fh:
        for k, item in enumerate(ITEMS):
            rec = {
                "category": ["Sports & Outdoors", "Outdoor Recreation", "Camping &amp; Hiking"],
                "tech1": "", "description": ["Light tent.", "Two doors."], "fit": "",
                "title": f"Tent {k} &amp; Poles", "also_buy": [], "image": [],
                "tech2": "", "brand": "Camp Co", "feature": [], "rank": "12 in Sports",
                "also_view": [], "main_cat": "Sports &amp; Outdoors", "similar_item": "",
                "date": "", "price": f"${20 + k}.99", "asin": item,
            }
            fh.write(json.dumps(rec) + "\n")
    return reviews, meta
