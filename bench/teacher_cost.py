"""What a kept GVM chain costs: online, provider batch, and n samples per request.

    python bench/teacher_cost.py                          # 200 ml-100k users x 4 samples
    python bench/teacher_cost.py --users 943 --modes online,batch,n2,n4

Runs the real `factory gvm` pipeline (jobs.gvm.run_gvm) on ml-100k once per mode, each in a
fresh copy of one warehouse, against the simulated teacher (`factory testing serve`'s
responder: GVM chains that recommend real titles, 10% malformed) over local HTTP, priced with
the README's example table plus `batch_discount = 0.5` (OpenAI's batch price). Modes: `online`
(one request per sample), `batch` (`--mode batch`: the files/batches endpoints, polled every
0.05 s), `nK` (`--n-per-request K`). Per mode it prints the requests (batch lines included,
parse-retry redraws included), input and output tokens, cost, the chains kept (parsed and not
pruned), the cost per kept chain, and input tokens (all, and of the first draws alone: redraws
of malformed answers are single requests whatever n) and cost per kept chain as ratios to
online. The simulated teacher gives choice i of an n-request the answer sample i gets alone,
and batch lines the answers online requests get, so every mode keeps the same chains.
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

PRICES = ('version = "bench"\nbatch_discount = 0.5\n[models."simulated-teacher"]\n'
          'input_per_mtok = 0.15\noutput_per_mtok = 0.60\n')


def options(mode: str, url: str, prices: Path, concurrency: int) -> TeacherOptions:
    if mode == "batch":
        return TeacherOptions(url=url, model=MODEL_ID, concurrency=concurrency, mode="batch",
                              poll_s=0.05, price_table=prices)
    n = 1 if mode == "online" else int(mode.removeprefix("n"))
    return TeacherOptions(url=url, model=MODEL_ID, concurrency=concurrency, n_per_request=n,
                          price_table=prices)


def run(wh: Warehouse, opts: TeacherOptions, users: int, samples: int) -> dict:
    run_id = run_gvm(wh, "ml-100k", teacher=opts, split="loo", users=users, samples=samples,
                     n_items=20, max_history=20, prune_threshold=0.85, prune_scope="global",
                     cluster="kmeans", k_min=2, k_max=10, min_cluster_size=20, exemplars=10,
                     encoder=None)
    with wh.read() as con:
        counts = json.loads(con.execute("select counts from job_runs where run_id = ?",
                                        [run_id]).fetchone()[0])
        kept, = con.execute("select count(*) from gvm_chains where run_id = ? and"
                            " status = 'ok' and not pruned", [run_id]).fetchone()
        # the first draws alone (redraws of malformed answers are always single requests)
        first, = con.execute("select sum(input_tokens) from llm_calls where key in"
                             " (select work_key from gvm_chains where run_id = ?)",
                             [run_id]).fetchone()
    return {**counts, "kept": kept, "first_input": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--samples", type=int, default=4, help="--answers-per-user")
    ap.add_argument("--modes", default="online,batch,n4",
                    help="online, batch, nK (--n-per-request K); the first is the baseline")
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    modes = args.modes.split(",")
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
            for mode in modes:
                wh = Warehouse(Path(tmp) / f"{mode}.duckdb")
                shutil.copy(base.path, wh.path)
                server.reset()
                counts = run(wh, options(mode, server.url, prices, args.concurrency),
                             args.users, args.samples)
                rows.append((mode, server.count(), counts))
        print(f"GVM, ml-100k, {args.users} users x {args.samples} samples, simulated teacher, "
              "prices $0.15 / $0.60 per M input / output tokens, batch at 0.5x")
        base_mode = rows[0][0]
        print(f"{'mode':>6} {'requests':>8} {'input tok':>10} {'output tok':>10} "
              f"{'cost $':>8} {'kept':>5} {'$/kept':>9} {'input':>7} {'1st draws':>9} "
              f"{'$/kept':>7}   (ratios to {base_mode})")
        first = rows[0][2]
        first_per_kept = (first["cost_usd"] or 0.0) / max(first["kept"], 1)
        for mode, sent, c in rows:
            cost = c["cost_usd"] or 0.0
            per_kept = cost / max(c["kept"], 1)
            print(f"{mode:>6} {sent:>8,} {c['input_tokens']:>10,} "
                  f"{c['output_tokens']:>10,} {cost:>8.4f} {c['kept']:>5,} {per_kept:>9.6f} "
                  f"{c['input_tokens'] / first['input_tokens']:>7.2f} "
                  f"{c['first_input'] / first['first_input']:>9.2f} "
                  f"{per_kept / (first_per_kept or 1):>7.2f}")


if __name__ == "__main__":
    main()
