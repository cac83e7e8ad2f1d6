"""Step-embedding benchmark (SCoTER 3.3.1): `embed-steps` against the bare encoder, and
reading H matrices back the way training does.

1. Throughput: the whole `embed-steps` job (read chains from DuckDB, hash every step text,
   look it up in the embedding cache, encode the misses, store them, write the H file, its
   checksum, the index and the manifest) on N chains of K steps with a cold cache, as a
   share of `SentenceTransformer.encode` on the same texts in the same process (model load
   included in both). Target: at least 90%.
2. Reading: sequences/s when shuffled training batches gather their H matrices by user id
   from the memory-mapped cache, against reading the same rows into memory in one go.

    python bench/embed_steps.py [--sequences 2000] [--k 5] [--read-sequences 100000]
                                [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from factory.warehouse import Warehouse  # noqa: E402

WORDS_TEXT = ("user prefers recent action thrillers sequels franchise director cast drama "
         "comedy romance stable interest shift towards documentaries classic noir genre "
         "rating pattern repeated purchases accessories complementary gear outdoor hiking "
         "skincare moisturizing brand loyalty price sensitive seasonal gifts family animated "
         "science fiction space adventure award winning critically acclaimed")


def step_texts(n: int, k: int, seed: int) -> list[list[str]]:
    """n chains of k distinct, sentence-like step texts of 30-60 words."""
    rng = random.Random(seed)
    words = WORDS_TEXT.split()
    return [[f"Step {j + 1} of chain {i}: " + " ".join(rng.choices(words, k=rng.randint(30, 60)))
             + "." for j in range(k)] for i in range(n)]


def chain_warehouse(path: Path, chains: list[list[str]]) -> str:
    """A warehouse holding one teacher chain set with these chains; returns its --chains."""
    k = len(chains[0])
    names = [f"Step {j + 1}" for j in range(k)]
    wh = Warehouse(path)
    with wh.write() as con:
        con.execute("insert into datasets (name, source) values ('bench', 'synthetic')")
        con.execute("insert into job_runs (run_id, job, dataset, params, status) values"
                    " ('teach-bench', 'distill-teach', 'bench', ?, 'succeeded')",
                    [json.dumps({"chain_set": "teacher-bench"})])
        con.executemany(
            "insert into chains (chain_set, dataset, split, part, user_id, source, template,"
            " template_steps, history, verdict, steps, work_key, run_id, prompt_name,"
            " prompt_hash, backend, model, sample, draws, cached, status) values"
            " ('teacher-bench', 'bench', 'loo', 'train', ?, 'teacher', 'bench', ?, [], 'kept',"
            " ?, ?, 'teach-bench', 'p', 'h', 'b', 'm', 0, 1, false, 'ok')",
            [[f"u{i:07d}", names, steps, f"w{i}"] for i, steps in enumerate(chains)])
    return "teacher:teach-bench"


class _Timed:
    """Seconds spent in one method of a class, summed over calls (bench instrumentation)."""

    def __init__(self, cls: type, name: str):
        self.cls, self.name, self.seconds = cls, name, 0.0
        self.original = getattr(cls, name)

    def __enter__(self) -> _Timed:
        original, timer = self.original, self

        def timed(*args: object, **kwargs: object) -> object:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - t0

        setattr(self.cls, self.name, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self.cls, self.name, self.original)


def bench_throughput(n: int, k: int, batch_size: int, repeat: int) -> None:
    from sentence_transformers import SentenceTransformer

    from factory.embeddings import Embedder, default_encoder_path
    from jobs.embed_steps import build_step_cache

    chains = step_texts(n, k, seed=0)
    flat = [t for c in chains for t in c]
    model = SentenceTransformer(str(default_encoder_path()), device="cpu")
    raw, job, inside = [], [], []
    for _ in range(repeat):  # alternate, so both see the same machine load
        t0 = time.perf_counter()
        model.encode(flat, batch_size=batch_size, convert_to_numpy=True,
                     normalize_embeddings=True, show_progress_bar=False)
        raw.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            wh = Warehouse(Path(tmp) / "bench.duckdb")
            spec = chain_warehouse(wh.path, chains)
            with _Timed(Embedder, "_load") as load, _Timed(Embedder, "_encode") as encode:
                t0 = time.perf_counter()
                build_step_cache(wh, dataset="bench", chains=spec, encoder=None,
                                 dtype="float16", whole_chain=False, batch_size=batch_size,
                                 out=None, replace=False)
                total = time.perf_counter() - t0
            job.append(total - load.seconds)       # model loading is not throughput
            inside.append(encode.seconds)
    print(f"step embedding: {n:,} chains x {k} steps = {len(flat):,} texts, cold cache, "
          f"{repeat} alternating runs (model loading excluded)")
    print(f"  model.encode  best {min(raw):.2f} s  {len(flat) / min(raw):,.0f} texts/s")
    print(f"  embed-steps   best {min(job):.2f} s  {len(flat) / min(job):,.0f} texts/s")
    shares = sorted(r / j for r, j in zip(raw, job, strict=True))
    print(f"  share of raw encode throughput: {min(raw) / min(job):.1%} best vs best, "
          f"{shares[len(shares) // 2]:.1%} median run (target >= 90%); run by run: "
          + ", ".join(f"{r / j:.0%}" for r, j in zip(raw, job, strict=True)))
    outside = [j - e for j, e in zip(job, inside, strict=True)]
    print(f"  embed-steps outside the encoder (DuckDB, hashing, cache, files, index): "
          f"{min(outside):.2f} s = {min(o / j for o, j in zip(outside, job, strict=True)):.1%}"
          " of the job")


def bench_reading(n: int, k: int, d: int, batch: int) -> None:
    from factory.step_cache import CacheWriter, open_cache

    rng = np.random.default_rng(0)
    users = [f"u{i:07d}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "steps"
        writer = CacheWriter(out, {"cache_id": "bench", "K": k, "D": d, "dtype": "float16",
                                   "encoder": "synthetic"})
        part = writer.part("train", users)
        for start in range(0, n, 8192):
            rows = min(8192, n - start)
            part.write(start, rng.standard_normal((rows, k, d), dtype=np.float32))
        writer.commit({})
        cache = open_cache(out, verify=False)
        order = list(users)
        random.Random(0).shuffle(order)
        cache.rows("train", order[:1])           # build the user -> row index once
        t0 = time.perf_counter()
        total = 0.0
        for start in range(0, n, batch):
            total += float(cache.gather("train", order[start:start + batch])[:, 0, 0].sum())
        gather = time.perf_counter() - t0
        t0 = time.perf_counter()
        whole = np.load(out / "train.H.npy")      # everything into memory in one go
        rows = cache.rows("train", order)
        for start in range(0, n, batch):
            total += float(whole[rows[start:start + batch]][:, 0, 0].sum())
        one_go = time.perf_counter() - t0
    size = n * k * d * 2 / 2**20
    print(f"reading H: {n:,} sequences x {k} x {d} float16 ({size:,.0f} MiB), shuffled "
          f"batches of {batch}, warm page cache")
    print(f"  batch gather (memory map, by user id)  {n / gather:,.0f} sequences/s")
    print(f"  one read into memory, then batches     {n / one_go:,.0f} sequences/s")
    print(f"  batch gather / one read: {one_go / gather:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=2000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64, help="encoder batch size")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--read-sequences", type=int, default=100_000)
    ap.add_argument("--read-batch", type=int, default=256, help="training batch size")
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: "
                    "torch's]; 1 on a CPU shared with other work, where OpenMP threads spin "
                    "against each other and wall times swing several-fold")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    bench_throughput(args.sequences, args.k, args.batch_size, args.repeat)
    bench_reading(args.read_sequences, args.k, 384, args.read_batch)


if __name__ == "__main__":
    main()
