"""GVM with several samples per request: requests, tokens and cost, n=1 vs --n-per-request.

    python bench/n_per_request.py                        # 200 ml-100k users x 4 samples
    python bench/n_per_request.py --users 943 --n 1,2,4

Runs the real `factory gvm` pipeline (jobs.gvm.run_gvm) on ml-100k, once per n, each in a
fresh copy of one warehouse, against the simulated teacher (`factory testing serve`'s
responder: GVM chains that recommend real titles, 10% malformed) over local HTTP, priced with
the README's example table. Per n it prints the requests sent (parse-retry redraws included),
input and output tokens, cost, the chains kept (parsed and not pruned) and the cost per kept
chain, with input tokens (all, and of the first draws alone: redraws of malformed answers
are single requests whatever n) and cost as a ratio to n=1. The simulated teacher gives
choice i of an n-request the answer sample i gets alone, so every mode keeps the same chains.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from factory.console import console  # noqa: E402
from factory.datasets.ingest import NormaliseOptions, ingest  # noqa: E402
from factory.datasets.movielens import load_movielens  # noqa: E402
from factory.gvm.phases import catalog  # noqa: E402
from factory.teacher import TeacherOptions  # noqa: E402
from factory.testing.openai_server import OpenAIServer  # noqa: E402
from factory.testing.simulated import MODEL_ID, SimulatedTeacher, WarehouseCatalogue  # noqa: E402
from factory.warehouse import Warehouse  # noqa: E402
from jobs.gvm import encoder_for, run_gvm  # noqa: E402

PRICES = 'version = "bench"\n[models."simulated-teacher"]\ninput_per_mtok = 0.15\n' \
         'output_per_mtok = 0.60\n'


def run(wh: Warehouse, url: str, users: int, samples: int, n: int, prices: Path,
        concurrency: int) -> dict:
    opts = TeacherOptions(url=url, model=MODEL_ID, concurrency=concurrency, n_per_request=n,
                          price_table=prices)
    run_id = run_gvm(wh, "ml-100k", teacher=opts, split="loo", users=users, samples=samples,
                     n_items=20, max_history=20, prune_threshold=0.85, prune_scope="global",
                     cluster="kmeans", k_min=2, k_max=10, min_cluster_size=20, exemplars=10,
                     encoder=None)
    with wh.read() as con:
        counts = json.loads(con.execute("select counts from job_runs where run_id = ?",
                                        [run_id]).fetchone()[0])
        kept, = con.execute("select count(*) from gvm_chains where run_id = ? and"
                            " status = 'ok' and not pruned", [run_id]).fetchone()
        groups, = con.execute("select count(distinct group_key) from llm_calls").fetchone()
        # the first draws alone (redraws of malformed answers are always single requests)
        first, = con.execute("select sum(input_tokens) from llm_calls where key in"
                             " (select work_key from gvm_chains where run_id = ?)",
                             [run_id]).fetchone()
    return {**counts, "kept": kept, "n_requests": groups, "first_input": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--samples", type=int, default=4, help="--answers-per-user")
    ap.add_argument("--n", default="1,4", help="--n-per-request values to compare")
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",")]
    console.quiet = True  # the jobs' progress bars and summaries; the table goes to stdout

    with tempfile.TemporaryDirectory() as tmp:
        base = Warehouse(Path(tmp) / "base.duckdb")
        ingest(base, "ml-100k", load_movielens("100k"), NormaliseOptions(core=5))
        _, encode = encoder_for(base, None, "catalog")
        catalog(base, "ml-100k", encode)            # embedded once; each copy reads the cache
        prices = Path(tmp) / "prices.toml"
        prices.write_text(PRICES)
        teacher = SimulatedTeacher(catalogue=WarehouseCatalogue(base.path))
        rows = []
        with OpenAIServer(teacher, model_ids=(MODEL_ID,)) as server:
            for n in ns:
                wh = Warehouse(Path(tmp) / f"n{n}.duckdb")
                shutil.copy(base.path, wh.path)
                server.reset()
                counts = run(wh, server.url, args.users, args.samples, n, prices,
                             args.concurrency)
                rows.append((n, server.count(), counts))
        print(f"GVM, ml-100k, {args.users} users x {args.samples} samples, simulated teacher, "
              "prices $0.15 / $0.60 per M input / output tokens")
        print(f"{'n':>3} {'requests':>8} {'n-requests':>10} {'input tok':>10} "
              f"{'output tok':>10} {'cost $':>8} {'kept':>5} {'$/kept':>9} {'input vs n=1':>12} "
              f"{'1st draws vs n=1':>16} {'cost vs n=1':>11}")
        first = rows[0][2]
        for n, sent, c in rows:
            cost = c["cost_usd"] or 0.0
            print(f"{n:>3} {sent:>8,} {c['n_requests']:>10,} {c['input_tokens']:>10,} "
                  f"{c['output_tokens']:>10,} {cost:>8.4f} {c['kept']:>5,} "
                  f"{cost / max(c['kept'], 1):>9.6f} "
                  f"{c['input_tokens'] / first['input_tokens']:>12.2f} "
                  f"{c['first_input'] / first['first_input']:>16.2f} "
                  f"{cost / (first['cost_usd'] or 1):>11.2f}")


if __name__ == "__main__":
    main()
