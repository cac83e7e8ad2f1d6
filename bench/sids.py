"""Semantic-ID spread (issue 12): the pre-issue-12 quantiser (sklearn k-means on raw
residuals) against spherical k-means on centred residual directions (the default now) and
its --balanced variant, on ml-100k and ml-1m item texts embedded by the default MiniLM.

Per dataset, K and method: the largest code's share of items at each level, perplexity per
level, and the collision rate (items whose L codes another item also has, before `strict`
moves them to a free last-level code). Datasets are ingested into a scratch warehouse (or
the one given) from the MovieLens cache; embeddings go through the warehouse's cache.

    python bench/sids.py [--warehouse PATH] [--datasets ml-100k,ml-1m] [--k 256,64]
                         [--levels 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from factory.datasets.ingest import NormaliseOptions, ingest  # noqa: E402
from factory.datasets.movielens import load_movielens  # noqa: E402
from factory.embeddings import Embedder  # noqa: E402
from factory.warehouse import Warehouse  # noqa: E402
from jobs.sids import (  # noqa: E402
    codebook_warning,
    colliding_items,
    item_text,
    level_stats,
    residual_kmeans,
)

METHODS = (("old: euclidean", "euclidean", False), ("new: cosine", "cosine", False),
           ("new: cosine --balanced", "cosine", True))


def item_vectors(wh: Warehouse, dataset: str):
    with wh.read() as con:
        have = con.execute("select count(*) from datasets where name = ?", [dataset]).fetchone()[0]
    if not have:
        ingest(wh, dataset, load_movielens(dataset.removeprefix("ml-")),
               NormaliseOptions(core=5, label_threshold=3.0))
    with wh.read() as con:
        rows = con.execute("select item_id, title, categories from items where dataset = ?"
                           " order by item_id", [dataset]).fetchall()
    texts = [item_text({"title": t, "categories": c}, ["title", "categories"]) or i
             for i, t, c in rows]
    return Embedder(wh).embed(texts, label=f"embedding {dataset}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warehouse", type=Path)
    ap.add_argument("--datasets", default="ml-100k,ml-1m")
    ap.add_argument("--k", default="256,64")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    wh = Warehouse(args.warehouse or Path(tmp.name) / "bench.duckdb")
    print(f"{'dataset':8} {'items':>6} {'K':>4} {'method':24} {'largest code per level':>24}"
          f" {'perplexity per level':>22} {'collide':>8} {'s':>5}")
    for dataset in args.datasets.split(","):
        x = item_vectors(wh, dataset)
        for k in (int(v) for v in args.k.split(",")):
            for name, method, balanced in METHODS:
                t = time.perf_counter()
                codes, _, _ = residual_kmeans(x, args.levels, k, args.seed, method=method,
                                              balanced=balanced)
                secs = time.perf_counter() - t
                st = level_stats(codes, k)
                share = " ".join(f"{s['largest_share']:6.1%}" for s in st)
                perp = " ".join(f"{s['perplexity']:6.1f}" for s in st)
                print(f"{dataset:8} {len(x):>6} {k:>4} {name:24} {share:>24} {perp:>22}"
                      f" {colliding_items(codes) / len(x):8.1%} {secs:5.1f}", flush=True)
            if warning := codebook_warning(len(x), k):
                print(f"  warning: {warning}")


if __name__ == "__main__":
    main()
