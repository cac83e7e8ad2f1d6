"""Parse failures of the embedded SmolLM2 with and without `--structured` (issue 17).

    python bench/structured.py                       # 20 items (keywords), 20 users (GVM)
    python bench/structured.py --n 10 --gvm-max-tokens 1024 --jobs gvm

Runs the real jobs, `factory keywords` (jobs.keywords.run_keywords, --limit N) and `factory
gvm` (jobs.gvm.run_gvm, N users x 1 answer, whose Generate phase is what is counted), with the
embedded SmolLM2-135M-Instruct in-process (transformers, CPU) on ml-100k in a fresh warehouse,
once in free text (--no-structured) and once constrained to the prompts' answer shapes
(--structured, llguidance). The jobs' own sampling is kept (keywords: temperature 0.3, 96
tokens; GVM: SCoTER's 0.7 / top-p 0.9) except GVM's budget: 8,192 tokens per answer would
take hours on CPU, so both modes get --gvm-max-tokens, and all N items go in one batch
(--concurrency). One table: per job and mode, items,
kept, rejected by the parser (after 3 draws), truncated, requests sent, the share of answers
the parser refused (or that were cut), the share of items left without a value, and seconds.
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

from factory.console import console  # noqa: E402
from factory.datasets.ingest import NormaliseOptions, ingest  # noqa: E402
from factory.datasets.movielens import load_movielens  # noqa: E402
from factory.teacher import Sampling, TeacherOptions  # noqa: E402
from factory.teacher.engine import PARSER_GAVE_UP  # noqa: E402
from factory.warehouse import Warehouse  # noqa: E402
from jobs.gvm import run_gvm  # noqa: E402
from jobs.keywords import run_keywords  # noqa: E402


def tally(wh: Warehouse, table: str, run_id: str) -> tuple[int, ...]:
    """(items, kept, rejected, truncated, requests) of one run's rows in a job's table."""
    with wh.read() as con:
        return con.execute(
            f"select count(*), count(*) filter (where status = 'ok'),"
            f" count(*) filter (where starts_with(error, ?)),"
            f" count(*) filter (where status = 'truncated'), sum(draws)"
            f" from {table} where run_id = ?", [PARSER_GAVE_UP, run_id]).fetchone()


def keywords(wh: Warehouse, opts: TeacherOptions, n: int) -> tuple[int, ...]:
    report, _ = run_keywords(wh, "ml-100k", opts.with_(limit=n))
    return tally(wh, "item_keywords", report.run_id)


def gvm(wh: Warehouse, opts: TeacherOptions, n: int, max_tokens: int) -> tuple[int, ...]:
    opts = opts.with_(sampling=opts.sampling.merged(Sampling(max_tokens=max_tokens)))
    run_id = run_gvm(wh, "ml-100k", teacher=opts, split="loo", users=n, samples=1, n_items=20,
                     max_history=20, prune_threshold=0.85, prune_scope="global",
                     cluster="kmeans", k_min=2, k_max=10, min_cluster_size=5, exemplars=5,
                     encoder=None)
    assert run_id is not None
    return tally(wh, "gvm_chains", run_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="items (keywords) and users (GVM)")
    ap.add_argument("--gvm-max-tokens", type=int, default=1536)
    ap.add_argument("--jobs", default="keywords,gvm")
    ap.add_argument("--concurrency", type=int, default=20, help="in-process batch size")
    ap.add_argument("--modes", default="free,structured", help="free text, structured or both")
    args = ap.parse_args()
    console.quiet = True      # the jobs' bars and summaries; the table goes to stdout
    print(f"{'job':<9} {'mode':<11} {'items':>5} {'kept':>5} {'rejected':>8} "
          f"{'truncated':>9} {'requests':>8} {'bad answers':>11} {'items lost':>10} "
          f"{'seconds':>8}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        wh = Warehouse(Path(tmp) / "bench.duckdb")
        ingest(wh, "ml-100k", load_movielens("100k"), NormaliseOptions(core=5))
        for job in args.jobs.split(","):
            for structured in [m == "structured" for m in args.modes.split(",")]:
                # one batch generates for many minutes before any answer: not a stall
                opts = TeacherOptions(structured=structured, sampling=Sampling(seed=0),
                                      concurrency=args.concurrency, stall_timeout=6 * 3600)
                started = time.perf_counter()
                if job == "keywords":
                    counts = keywords(wh, opts, args.n)
                else:
                    counts = gvm(wh, opts, args.n, args.gvm_max_tokens)
                seconds = time.perf_counter() - started
                items, kept, rejected, truncated, requests = counts
                mode = "structured" if structured else "free text"
                print(f"{job:<9} {mode:<11} {items:>5} {kept:>5} {rejected:>8} {truncated:>9}"
                      f" {requests:>8} {(requests - kept) / requests:>11.0%}"
                      f" {(items - kept) / items:>10.0%} {seconds:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
