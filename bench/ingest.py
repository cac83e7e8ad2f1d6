"""Ingest benchmark: ML-1M end to end (read, normalise, 5-core, positions, loo split).

Prints seconds, interactions/s and peak resident memory of the ingesting process, plus the
ratio against the floor of merely parsing the source file with pyarrow, measured in this run.

    python bench/ingest.py [--variant 1m] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from factory.warehouse import Warehouse
from factory.datasets.movielens import load_movielens, _read_atomic
from factory.datasets.embedded import movielens_files
from factory.datasets.ingest import NormaliseOptions, ingest
variant, path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
if mode == "parse":
    n = _read_atomic(movielens_files(variant)["inter"]).num_rows
else:
    n = ingest(Warehouse(path), f"ml-{variant}", load_movielens(variant),
               NormaliseOptions(core=5))["interactions"]
secs = time.perf_counter() - t0
print(json.dumps({"secs": secs, "n": n,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(variant: str, mode: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, variant, f"{tmp}/w.duckdb", mode],
            capture_output=True, text=True, check=True,
        ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="1m")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    run(args.variant, "parse")  # warm the data cache (first fetch downloads the wheel)
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for mode in ("parse", "ingest"):
            r = run(args.variant, mode)
            if mode not in best or r["secs"] < best[mode]["secs"]:
                best[mode] = r
    ing, parse = best["ingest"], best["parse"]
    print(f"ML-{args.variant} ingest: {ing['n']:,} interactions kept")
    print(f"  ingest   {ing['secs']:.2f} s  {ing['n'] / ing['secs']:,.0f} interactions/s"
          f"  peak RSS {ing['rss_mb']:.0f} MB")
    print(f"  parse    {parse['secs']:.2f} s  (pyarrow read of the source file alone)"
          f"  peak RSS {parse['rss_mb']:.0f} MB")
    print(f"  ratio ingest/parse: {ing['secs'] / parse['secs']:.1f}x  (best of {args.repeat})")


if __name__ == "__main__":
    main()
