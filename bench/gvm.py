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

`--failing USERSxSAMPLES` (issue 18; the issue measured 60x4) runs instead, each in a fresh
warehouse with an empty embedding cache, `gvm` and `gvm compare` (two templates) against a
teacher none of whose answers parses (the server's canned sentences), and the catalogue
embedded alone. Before issue 18 `gvm compare` embedded the whole catalogue whatever the
answers, and a gvm run from before the "no answer parsed" fix did the same; the table gives
the embedding share of such a run (catalogue alone / (run + catalogue alone)) against the
share now (the run's own embedding seconds / its wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def failing(cell: str, latency: float, concurrency: int) -> None:
    """Every answer unparseable: what embedding costs a run now, and what it cost before."""
    from factory.gvm.phases import catalog
    from factory.templates import get_template
    from jobs.gvm_compare import run_compare

    users, samples = (int(x) for x in cell.split("x"))
    with tempfile.TemporaryDirectory() as tmp, OpenAIServer(latency=latency) as server:
        base = Path(tmp) / "base.duckdb"
        ingest(Warehouse(base), "ml-100k", load_movielens("100k"), NormaliseOptions(core=5))
        opts = TeacherOptions(url=server.url, model="bench-teacher", concurrency=concurrency)
        rows = []
        for job in ("gvm", "gvm compare"):
            path = Path(tmp) / f"{job.replace(' ', '-')}.duckdb"
            shutil.copy(base, path)
            wh = Warehouse(path)
            spied = _spy_embedding()
            started = time.perf_counter()
            if job == "gvm":
                run_gvm(wh, "ml-100k", teacher=opts, split="loo", users=users,
                        samples=samples, n_items=20, max_history=20, prune_threshold=0.85,
                        prune_scope="global", cluster="kmeans", k_min=2, k_max=10,
                        min_cluster_size=20, exemplars=10, encoder=None)
            else:
                with wh.read() as con:
                    chosen = {n: get_template(con, n, "ml-100k")
                              for n in ("two-step", "three-step")}
                run_compare(wh, "ml-100k", chosen, job_name="gvm-compare", teacher=opts,
                            split="loo", users=users, samples=samples, n_items=20,
                            max_history=20, held_out=False, encoder=None, extra={})
            rows.append((job, time.perf_counter() - started, *spied()))
        path = Path(tmp) / "catalogue.duckdb"
        shutil.copy(base, path)
        started = time.perf_counter()
        _, encode = encoder_for(Warehouse(path), None, "catalog")
        ids, _ = catalog(Warehouse(path), "ml-100k", encode)
        alone = time.perf_counter() - started
    print(f"no answer parses, {users} users x {samples} answers, server latency "
          f"{latency * 1000:.0f} ms; each in a fresh warehouse (empty embedding cache)")
    print(f"catalogue alone: {len(ids):,} ml-100k items, model load + encode "
          f"{alone:.1f}s")
    print(f"{'job':12} {'wall s':>7} {'embed calls':>11} {'encoded':>7} {'embed s':>7} "
          f"{'share now':>9} {'share before (+catalogue)':>26}")
    for job, wall, calls, encoded, secs in rows:
        print(f"{job:12} {wall:>7.1f} {calls:>11} {encoded:>7} {secs:>7.1f} "
              f"{secs / wall:>9.1%} {alone / (wall + alone):>26.1%}", flush=True)


def _spy_embedding():
    """Count Embedder.embed calls, texts encoded and seconds inside embed() from now on;
    returns a function that reads the counts and removes the spy."""
    from factory.embeddings import Embedder

    real = Embedder.embed
    seen = {"calls": 0, "encoded": 0, "seconds": 0.0}

    def embed(self, texts, label="embedding"):
        started, before = time.perf_counter(), self.stats.encoded
        try:
            return real(self, texts, label)
        finally:
            seen["calls"] += 1
            seen["encoded"] += self.stats.encoded - before
            seen["seconds"] += time.perf_counter() - started

    Embedder.embed = embed

    def done() -> tuple[int, int, float]:
        Embedder.embed = real
        return seen["calls"], seen["encoded"], seen["seconds"]

    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="50x2,100x2,100x4,200x4", help="users x samples, ...")
    ap.add_argument("--latency", type=float, default=0.05, help="server seconds per request")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--failing", metavar="USERSxSAMPLES", help="only the no-answer-parses "
                    "comparison (issue 18: 60x4)")
    args = ap.parse_args()
    if args.failing:
        console.quiet = True
        failing(args.failing, args.latency, args.concurrency)
        return
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
