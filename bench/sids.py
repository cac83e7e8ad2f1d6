"""Semantic IDs: speed (issue 18) and code spread (issue 12), on MovieLens item texts.

Speed (`--part speed`, ml-1m by default): `factory sids` end to end against its two
unavoidable parts measured alone, each in a fresh process so that imports and the model load
count the same everywhere:

  sids cold      `factory sids --dataset ml-1m` on a copy of the warehouse with an empty
                 embedding cache (what a first run does)
  sids warm      the same again, every vector now in the cache (what a re-run does)
  encode alone   load the default MiniLM and `model.encode` the job's distinct item texts
                 (process wall, as for sids)
  k-means alone  `residual_kmeans` + strict collision resolution on the job's vectors
                 (timed inside the process: no imports)

The four are interleaved `--repeats` times and the medians compared in this one run (the
machine is shared, absolute seconds drift; the ratio is the figure): the issue's goal is
sids cold / (encode alone + k-means alone) <= 2. The same ratio in CPU seconds (user +
system of each process) is printed too: on a busy machine it says how much work each step
did, where wall time also counts waiting. The job's own phase seconds (job_runs.counts)
show where its time went. The run also checks that cold and warm give the same SIDs.

Spread (`--part spread`): the pre-issue-12 quantiser (sklearn k-means on raw residuals)
against spherical k-means on centred residual directions (the default) and its --balanced
variant: per dataset, K and method the largest code's share at each level, perplexity per
level, and the collision rate before `strict` moves items to a free last-level code.

    python bench/sids.py [--part speed|spread|all] [--warehouse PATH] [--repeats 3]
                         [--datasets ml-100k,ml-1m] [--k 256,64] [--levels 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
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

ENCODE_ALONE = """
import json, sys, time
t = time.perf_counter()
from sentence_transformers import SentenceTransformer
from factory.embeddings import default_encoder_path
texts = json.load(open(sys.argv[1]))
SentenceTransformer(str(default_encoder_path())).encode(
    texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
print(time.perf_counter() - t)
"""

KMEANS_ALONE = """
import sys, time
import numpy as np
from jobs.sids import residual_kmeans, resolve_strict
x = np.load(sys.argv[1])
t = time.perf_counter()
codes, books, residual = residual_kmeans(x, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
resolve_strict(codes, books, residual)
print(time.perf_counter() - t)
"""


def ensure(wh: Warehouse, dataset: str) -> None:
    have = 0
    if wh.path.exists():
        with wh.read() as con:
            have = con.execute("select count(*) from datasets where name = ?",
                               [dataset]).fetchone()[0]
    if not have:
        ingest(wh, dataset, load_movielens(dataset.removeprefix("ml-")),
               NormaliseOptions(core=5, label_threshold=3.0))


def item_texts(wh: Warehouse, dataset: str) -> list[str]:
    """The texts `factory sids` embeds with its default --text-fields, in item order."""
    ensure(wh, dataset)
    with wh.read() as con:
        rows = con.execute("select item_id, title, categories from items where dataset = ?"
                           " order by item_id", [dataset]).fetchall()
    return [item_text({"title": t, "categories": c}, ["title", "categories"]) or i
            for i, t, c in rows]


CPU: dict[str, list[float]] = {}   # CPU seconds (user + system) of each step's process


def _timed(cmd: list[str], name: str) -> tuple[float, str]:
    """Wall seconds and stdout of a fresh process; its CPU seconds go to CPU[name] (on a
    shared machine CPU time says how much work a step did, wall time how long it waited)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.setdefault(name, []).append(after.ru_utime - before.ru_utime
                                    + after.ru_stime - before.ru_stime)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def _sids(path: Path, dataset: str, levels: int, k: int, seed: int,
          name: str) -> tuple[float, list, dict]:
    wall, _ = _timed([sys.executable, "-m", "factory", "--warehouse", str(path), "sids",
                      "--dataset", dataset, "--levels", str(levels), "--codebook-size",
                      str(k), "--seed", str(seed)], name)
    with Warehouse(path, reader=True).read() as con:
        sids = con.execute("select item_id, sid from item_sids where dataset = ?"
                           " order by item_id", [dataset]).fetchall()
        (counts,) = con.execute("select counts from job_runs where job = 'sids'"
                                " order by started_at desc limit 1").fetchone()
    return wall, sids, json.loads(counts).get("phase_seconds", {})


def speed(work: Path, dataset: str, levels: int, k: int, seed: int, repeats: int) -> None:
    base = work / "base.duckdb"
    texts = item_texts(Warehouse(base), dataset)
    distinct = list(dict.fromkeys(texts))
    (work / "texts.json").write_text(json.dumps(distinct))
    print(f"{dataset}: {len(texts):,} items, {len(distinct):,} distinct texts; K={k}, "
          f"L={levels}; {repeats} interleaved repeats, each step in a fresh process",
          flush=True)
    times: dict[str, list[float]] = {"sids cold": [], "sids warm": [], "encode alone": [],
                                     "k-means alone": []}
    inside: dict[str, list[float]] = {}     # the job's own phase seconds (job_runs.counts)
    same = True
    for r in range(repeats):
        path = work / f"run{r}.duckdb"
        shutil.copy(base, path)
        wall, cold_sids, cold_phases = _sids(path, dataset, levels, k, seed, "sids cold")
        times["sids cold"].append(wall)
        # every vector is cached now
        wall, warm_sids, warm_phases = _sids(path, dataset, levels, k, seed, "sids warm")
        times["sids warm"].append(wall)
        for name, phases in (("cold", cold_phases), ("warm", warm_phases)):
            for phase, secs in phases.items():
                inside.setdefault(f"{name} {phase}", []).append(secs)
        same = same and cold_sids == warm_sids
        if r == 0:      # the vectors k-means alone clusters: the job's own, from its cache
            import numpy as np

            np.save(work / "x.npy", Embedder(Warehouse(path)).embed(texts))
        path.unlink()
        times["encode alone"].append(_timed(
            [sys.executable, "-c", ENCODE_ALONE, str(work / "texts.json")], "encode alone")[0])
        times["k-means alone"].append(float(_timed(     # k-means itself, not its imports
            [sys.executable, "-c", KMEANS_ALONE, str(work / "x.npy"), str(levels), str(k),
             str(seed)], "k-means alone")[1]))
        print("  repeat " + str(r + 1) + ": " + ", ".join(
            f"{name} {v[-1]:.1f}s (CPU {CPU[name][-1]:.1f}s)" for name, v in times.items()),
            flush=True)
        print("    inside the job: " + ", ".join(
            f"{name} {v[-1]:.1f}s" for name, v in inside.items()), flush=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    parts = med["encode alone"] + med["k-means alone"]
    print(f"medians: sids cold {med['sids cold']:.1f}s, sids warm {med['sids warm']:.1f}s "
          f"(process wall: imports, model load, warehouse), encode alone "
          f"{med['encode alone']:.1f}s (imports, model load, encode), k-means alone "
          f"{med['k-means alone']:.1f}s")
    cpu = {name: statistics.median(v) for name, v in CPU.items()}
    print(f"CPU seconds: sids cold / (encode alone + k-means alone) = "
          f"{cpu['sids cold'] / (cpu['encode alone'] + cpu['k-means alone']):.2f}; "
          f"sids warm / k-means alone = {cpu['sids warm'] / cpu['k-means alone']:.2f}")
    if inside:
        print("inside the job (medians): " + ", ".join(
            f"{name} {statistics.median(v):.1f}s" for name, v in inside.items()))
    print(f"sids cold / (encode alone + k-means alone) = {med['sids cold'] / parts:.2f} "
          f"(goal <= 2); sids warm / k-means alone = "
          f"{med['sids warm'] / med['k-means alone']:.2f}; "
          f"cold and warm SIDs identical: {'yes' if same else 'NO'}")


def spread(wh: Warehouse, datasets: list[str], ks: list[int], levels: int, seed: int) -> None:
    print(f"{'dataset':8} {'items':>6} {'K':>4} {'method':24} {'largest code per level':>24}"
          f" {'perplexity per level':>22} {'collide':>8} {'s':>5}")
    for dataset in datasets:
        x = Embedder(wh).embed(item_texts(wh, dataset), label=f"embedding {dataset}")
        for k in ks:
            for name, method, balanced in METHODS:
                t = time.perf_counter()
                codes, _, _ = residual_kmeans(x, levels, k, seed, method=method,
                                              balanced=balanced)
                secs = time.perf_counter() - t
                st = level_stats(codes, k)
                share = " ".join(f"{s['largest_share']:6.1%}" for s in st)
                perp = " ".join(f"{s['perplexity']:6.1f}" for s in st)
                print(f"{dataset:8} {len(x):>6} {k:>4} {name:24} {share:>24} {perp:>22}"
                      f" {colliding_items(codes) / len(x):8.1%} {secs:5.1f}", flush=True)
            if warning := codebook_warning(len(x), k):
                print(f"  warning: {warning}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("speed", "spread", "all"), default="all")
    ap.add_argument("--warehouse", type=Path, help="spread: a warehouse to use (and fill)")
    ap.add_argument("--datasets", default="ml-100k,ml-1m", help="spread: datasets")
    ap.add_argument("--speed-dataset", default="ml-1m")
    ap.add_argument("--k", default="256,64", help="spread: codebook sizes; speed: the first")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="speed: interleaved repeats")
    args = ap.parse_args()
    ks = [int(v) for v in args.k.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("speed", "all"):
            speed(Path(tmp), args.speed_dataset, args.levels, ks[0], args.seed, args.repeats)
        if args.part in ("spread", "all"):
            wh = Warehouse(args.warehouse or Path(tmp) / "spread.duckdb")
            spread(wh, args.datasets.split(","), ks, args.levels, args.seed)


if __name__ == "__main__":
    main()
