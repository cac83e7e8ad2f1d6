"""TwiSTAR's second stage on MovieLens through the real commands: M_fast (a backbone of
train/) -> top-50 candidates -> hard samples (4.3, E.1.3) -> planner labels (4.4, App. B);
prints the hard-sample share and the Path 1/2/3 shares next to the paper's planner decisions
on Beauty (6.5: fast_rec 62.3%, fast_rec+rank 27.1%, think_and_rec 10.6%; those are the
learned planner's choices, our shares are the pseudo-labels it learns from).

    python bench/twistar.py --dataset ml-100k --backbone sasrec --max-minutes 2
    python bench/twistar.py --dataset ml-1m --backbone tiger --max-minutes 60 --device cuda

Each step is a `factory` command in a subprocess, timed; the warehouse stays in --work.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def factory(wh: Path, *args: str) -> str:
    """Run one factory command; its output, or exit with the command's error."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "factory", "--warehouse", str(wh), *args],
                          capture_output=True, text=True)
    print(f"  {time.perf_counter() - t:7.1f}s  factory {' '.join(args)}", flush=True)
    if done.returncode != 0:
        sys.exit(f"failed: factory {' '.join(args)}\n{done.stderr.strip()[-2000:]}")
    return done.stdout


def sql(wh: Path, query: str) -> list[dict]:
    out = factory(wh, "sql", query, "--format", "json")  # JSON lines
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml-1m", choices=["ml-1m", "ml-100k"])
    p.add_argument("--backbone", default="tiger", choices=["tiger", "sasrec", "hstu"],
                   help="M_fast [tiger, as TwiSTAR 4.2]")
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--max-minutes", type=float, default=20.0, help="M_fast's training budget")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--k1", type=int, default=10)
    p.add_argument("--k2", type=int, default=50)
    p.add_argument("--work", type=Path, help="keep the warehouse here")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-twistar-"))
    work.mkdir(parents=True, exist_ok=True)
    wh, name = work / "bench.duckdb", args.dataset
    start = time.perf_counter()
    have = wh.exists() and bool(sql(wh, f"select 1 from datasets where name = '{name}'"))
    if not have:
        factory(wh, "ingest", "movielens", "--variant", name.removeprefix("ml-"))
    export = ["export", "cache", "--dataset", name, "--history", str(args.history), "--replace"]
    if args.backbone == "tiger":
        factory(wh, "sids", "--dataset", name, "--collisions", "extra-level")
        export.append("--sids")
    factory(wh, *export)
    factory(wh, "train", "--dataset", name, "--history", str(args.history), "--backbone",
            args.backbone, "--protocol", "masked", "--epochs", str(args.epochs), "--max-minutes",
            str(args.max_minutes), "--device", args.device, "--predict", "--top-k",
            str(args.k2), *(["--beam", str(args.k2)] if args.backbone == "tiger" else []))
    factory(wh, "twistar", "candidates", "--dataset", name, "--from-train", "latest")
    factory(wh, "twistar", "hard-samples", "--dataset", name, "--k2", str(args.k2))
    factory(wh, "twistar", "planner-labels", "--dataset", name, "--k1", str(args.k1), "--k2",
            str(args.k2), "--flip", "0.2", "--seed", "0", "--parts", "valid,test")
    recall = sql(wh, "select part, round(avg((hit_rank is not null and hit_rank <= 10)::int),"
                     " 4) as r10, round(avg((hit_rank is not null)::int), 4) as r_k2, count(*)"
                     f" as n from twistar_candidates where dataset = '{name}' group by 1"
                     " order by 1")
    hard = sql(wh, "select part, count(*) as hard from twistar_hard_samples where dataset ="
                   f" '{name}' group by 1 order by 1")
    paths = sql(wh, "select part, path, count(*) as n, sum(flipped::int) as flipped from"
                    f" twistar_planner_labels where dataset = '{name}' group by all order by all")
    total = {r["part"]: r["n"] for r in recall}
    print(f"\n{name}, M_fast {args.backbone} (history {args.history}, masked, budget "
          f"{args.max_minutes:g} min), K1 {args.k1}, K2 {args.k2}; "
          f"{time.perf_counter() - start:.0f}s in all")
    print(f"{'part':<6} {'rows':>6} {'R@10':>7} {'R@K2':>7} {'hard share':>10}")
    hard_by = {r["part"]: r["hard"] for r in hard}
    for r in recall:
        print(f"{r['part']:<6} {r['n']:>6} {r['r10']:>7.4f} {r['r_k2']:>7.4f} "
              f"{hard_by.get(r['part'], 0) / r['n']:>10.3f}")
    print(f"\n{'part':<6} {'Path 1':>8} {'Path 2':>8} {'Path 3':>8}  (pseudo-labels, flipped "
          "included)")
    for part in sorted({r["part"] for r in paths}):
        n = {r["path"]: r["n"] for r in paths if r["part"] == part}
        print(f"{part:<6} " + " ".join(f"{n.get(k, 0) / total[part]:>8.3f}" for k in (1, 2, 3)))
    print("paper 6.5 (Beauty, the learned planner's test decisions):    0.623    0.271    0.106")
    print(f"files: {work}")


if __name__ == "__main__":
    main()
