"""GVM: wall time per phase, how it scales with users x samples, embedding de-duplication.

    python bench/gvm.py                                  # ml-100k, grid 50x2,100x2,100x4,200x4
    python bench/gvm.py --grid 100x4,400x4 --latency 0.2 --concurrency 64

Runs the real `factory gvm` pipeline (jobs.gvm.run_gvm) on ml-100k in a fresh warehouse,
with the real sentence encoder, against the local OpenAI-compatible test server answering
with the deterministic GVM teacher (fixed latency per request, 10% malformed answers).
Per configuration it prints the seconds of each phase (stored in the run's counts), and the
time per chain as a ratio to the smallest configuration, the baseline measured in the same
run (1.0 = linear scaling). Embedding: texts the pipeline asked for vs texts encoded (the
rest were duplicates or came from the content-addressed cache). Last, the largest
configuration again with the same seed: every answer and vector from the caches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from factory.console import console  # noqa: E402
from factory.datasets.ingest import NormaliseOptions, ingest  # noqa: E402
from factory.datasets.movielens import load_movielens  # noqa: E402
from factory.gvm.phases import catalog  # noqa: E402
from factory.gvm.sequences import item_info, item_text, sample_sequences  # noqa: E402
from factory.teacher import Sampling, TeacherOptions  # noqa: E402
from factory.testing.openai_server import OpenAIServer  # noqa: E402
from factory.testing.simulated import GvmTeacher  # noqa: E402
from factory.warehouse import Warehouse  # noqa: E402
from jobs.gvm import encoder_for, run_gvm  # noqa: E402

PHASES = ("sample", "generate", "prune", "catalog", "validate", "mine", "abstract")


def run(wh: Warehouse, server: OpenAIServer, users: int, samples: int, seed: int,
        concurrency: int) -> tuple[float, dict]:
    opts = TeacherOptions(url=server.url, model="bench-teacher", concurrency=concurrency,
                          sampling=Sampling(seed=seed))
    started = time.perf_counter()
    run_id = run_gvm(wh, "ml-100k", teacher=opts, split="loo", users=users, samples=samples,
                     n_items=20, max_history=20, prune_threshold=0.85, prune_scope="global",
                     cluster="kmeans", k_min=2, k_max=10, min_cluster_size=20, exemplars=10,
                     encoder=None)
    wall = time.perf_counter() - started
    with wh.read() as con:
        counts = json.loads(con.execute("select counts from job_runs where run_id = ?",
                                        [run_id]).fetchone()[0])
    return wall, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="50x2,100x2,100x4,200x4", help="users x samples, ...")
    ap.add_argument("--latency", type=float, default=0.05, help="server seconds per request")
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    grid = [tuple(int(x) for x in cell.split("x")) for cell in args.grid.split(",")]
    console.quiet = True  # the jobs' progress bars and summaries; the table goes to stdout

    with tempfile.TemporaryDirectory() as tmp:
        wh = Warehouse(Path(tmp) / "bench.duckdb")
        ingest(wh, "ml-100k", load_movielens("100k"), NormaliseOptions(core=5))
        with wh.read() as con:
            seqs = sample_sequences(con, "ml-100k", "loo", 10**6, seed=0)
            info = item_info(con, "ml-100k")
        oracle = {tuple(info[i]["title"] for i in s.history): item_text(info[s.target])
                  for s in seqs}
        started = time.perf_counter()
        embedder, encode = encoder_for(wh, None, "catalog")
        catalog(wh, "ml-100k", encode)
        print(f"catalog: {len(info):,} items embedded once in "
              f"{time.perf_counter() - started:.1f}s (later runs read the cache)")

        server = OpenAIServer(GvmTeacher(oracle, malformed=0.1), latency=args.latency)
        with server:
            print(f"server latency {args.latency * 1000:.0f} ms, concurrency "
                  f"{args.concurrency}; seconds per phase:", flush=True)
            head = (f"{'users x samples':>15} {'chains':>6} " +
                    " ".join(f"{p:>8}" for p in PHASES) +
                    f" {'total':>7} {'ms/chain':>8} {'vs base':>7} {'seen':>6} {'encoded':>7}")
            print(head)
            base = None
            for seed, (users, samples) in enumerate(grid, start=1):
                wall, counts = run(wh, server, users, samples, seed, args.concurrency)
                g = counts["gvm"]
                chains = users * samples
                per = wall / chains * 1000
                base = base or per
                emb = g["embeddings"]
                print(f"{users:>7} x {samples:<5} {chains:>6} " +
                      " ".join(f"{g['seconds'].get(p, 0.0):>8.2f}" for p in PHASES) +
                      f" {wall:>7.1f} {per:>8.1f} {per / base:>7.2f} {emb['seen']:>6,}"
                      f" {emb['encoded']:>7,}", flush=True)
            users, samples = grid[-1]
            first_wall = wall
            sent = server.count()
            wall, counts = run(wh, server, users, samples, len(grid), args.concurrency)
            emb = counts["gvm"]["embeddings"]
            print(f"re-run of {users} x {samples} with the same seed: {wall:.1f}s "
                  f"({wall / first_wall:.2f} of the first run), "
                  f"{server.count() - sent} requests sent, {emb['encoded']} texts encoded "
                  f"of {emb['seen']:,} seen")


if __name__ == "__main__":
    main()
