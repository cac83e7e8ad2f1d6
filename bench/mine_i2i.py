"""I2I mining benchmark: the DuckDB miner against a pure-Python dictionary miner.

Two inputs: the ML-1M loo training part (ingested into a temporary warehouse), and a generated
log of ~10M interactions with long-tailed item popularity (Zipf) and user lengths (log-normal).
Each engine runs in its own process over the same training sequences and the same parameters
(the job's defaults unless given: directed, whole sequence, penalised, min-count 2; all pairs
are kept so that every pair is compared). Prints wall time, CPU time (user + system, all
threads; the fairer figure on a busy machine), peak RSS and the ratios, and checks that both
produce the same pairs, supports, ranks and scores (to 1e-9).

    python bench/mine_i2i.py                     # ML-1M, Python on every user (minutes, GBs)
    python bench/mine_i2i.py --python-users 1000 # Python baseline on a 1000-user subset
    python bench/mine_i2i.py --log-only          # only the generated 10M log
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import pyarrow as pa, pyarrow.parquet as pq
from factory.i2i import MineParams, mine
from factory.i2i_reference import mine_reference
engine, inputs, out, params, limit, threads = sys.argv[1:7]
params = MineParams(**json.loads(params))
train = pq.read_table(f"{inputs}/train.parquet")
users = pq.read_table(f"{inputs}/users.parquet")
items = pq.read_table(f"{inputs}/items.parquet")
t0 = time.perf_counter()
ru = resource.getrusage(resource.RUSAGE_SELF)
cpu0 = ru.ru_utime + ru.ru_stime
if engine == "duckdb":
    batches = [b for b, _ in mine(train, users, items, params, memory_limit=limit,
                                  threads=int(threads))]
    result = pa.Table.from_batches(batches)
else:
    uid = dict(zip(users["u"].to_pylist(), users["user_id"].to_pylist()))
    iid = dict(zip(items["i"].to_pylist(), items["item_id"].to_pylist()))
    seqs = {}
    for u, _, i in sorted(zip(*(train[c].to_pylist() for c in ("u", "p", "i")))):
        seqs.setdefault(uid[u], []).append(iid[i])
    rows = mine_reference(seqs, params)
    result = pa.table({k: [r[n] for r in rows] for n, k in
                       enumerate(["item_i", "item_j", "support", "score", "rank"])})
secs = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
cpu = ru.ru_utime + ru.ru_stime - cpu0
pq.write_table(result, out)
print(json.dumps({"secs": secs, "cpu": cpu, "pairs": result.num_rows,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(engine: str, inputs: Path, out: Path, params: dict, limit: str, threads: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, engine, str(inputs), str(out), json.dumps(params), limit,
         str(threads)], capture_output=True, text=True,
    )
    if proc.returncode:
        raise SystemExit(f"{engine} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ml1m_inputs(tmp: Path, python_users: int | None) -> tuple[Path, Path | None, str]:
    """Train part of ML-1M (full) and, with python_users, an every-k-th-user subset."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from factory.datasets.ingest import NormaliseOptions, ingest
    from factory.datasets.movielens import load_movielens
    from factory.i2i import load_training
    from factory.warehouse import Warehouse

    wh = Warehouse(tmp / "wh.duckdb")
    ingest(wh, "ml-1m", load_movielens("1m"), NormaliseOptions(core=5))
    with wh.read() as con:
        train, users, items = load_training(con, "ml-1m", "loo")
    full = tmp / "ml1m"
    full.mkdir()
    for name, table in (("train", train), ("users", users), ("items", items)):
        pq.write_table(table, full / f"{name}.parquet")
    if not python_users or python_users >= users.num_rows:
        return full, None, f"all {users.num_rows:,} users"
    step = users.num_rows / python_users
    keep = pa.array(sorted({int(k * step) for k in range(python_users)}), pa.int32())
    sub = tmp / "ml1m_subset"
    sub.mkdir()
    pq.write_table(train.filter(pc.is_in(train["u"], keep)), sub / "train.parquet")
    pq.write_table(users, sub / "users.parquet")
    pq.write_table(items, sub / "items.parquet")
    return full, sub, f"{len(keep):,} of {users.num_rows:,} users (every {step:.1f}th)"


def generated_inputs(tmp: Path, n: int, seed: int = 0) -> Path:
    """~n interactions: log-normal user lengths (median 8, long tail, cap 2,000), Zipf(1.05)
    item popularity over 300k items; duplicates within a user dropped."""
    import duckdb
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_users = int(n / 11.3)  # about 10% of the draws repeat an item within a user
    lengths = np.clip(rng.lognormal(np.log(8), 1.0, n_users).astype(np.int64), 2, 2000)
    total = int(lengths.sum())
    n_items = 300_000
    ranks = np.arange(1, n_items + 1, dtype=np.float64)
    pop = ranks ** -1.05
    pop /= pop.sum()
    item = rng.choice(n_items, size=total, p=pop).astype(np.int32)
    user = np.repeat(np.arange(n_users, dtype=np.int32), lengths)
    con = duckdb.connect()
    con.register("raw", pa.table({"u": user, "i": item, "k": np.arange(total)}))
    train = con.sql(
        "select u, i, (row_number() over (partition by u order by k) - 1)::integer as p"
        " from (select u, i, min(k) as k from raw group by u, i)"
    ).to_arrow_table()
    out = tmp / "log"
    out.mkdir()
    pq.write_table(train, out / "train.parquet")
    pq.write_table(pa.table({"u": np.arange(n_users, dtype=np.int32),
                             "user_id": [f"u{k}" for k in range(n_users)]}),
                   out / "users.parquet")
    pq.write_table(pa.table({"i": np.arange(n_items, dtype=np.int32),
                             "item_id": [f"i{k:06d}" for k in range(n_items)]}),
                   out / "items.parquet")
    return out


def agree(a: Path, b: Path) -> str:
    """Same pairs, supports and ranks; scores within 1e-9 relative."""
    import duckdb

    row = duckdb.connect().execute(
        f"select count(*), count(*) filter (where x.item_i is null or y.item_i is null"
        f"  or x.support <> y.support or x.rank <> y.rank"
        f"  or abs(x.score - y.score) > 1e-9 * greatest(1, abs(y.score))),"
        f"  max(abs(x.score - y.score))"
        f" from '{a}' x full join '{b}' y using (item_i, item_j)"
    ).fetchall()[0]
    verdict = "agree exactly" if row[1] == 0 else f"DISAGREE on {row[1]:,} pairs"
    return f"{verdict} ({row[0]:,} pairs, max score difference {row[2] or 0:.1e})"


def line(name: str, r: dict) -> str:
    return (f"  {name:<8} {r['secs']:8.2f} s wall {r['cpu']:8.2f} s CPU"
            f"   peak RSS {r['rss_mb']:6.0f} MB   {r['pairs']:,} pairs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python-users", type=int, default=None,
                    help="Run the Python baseline (and a matching DuckDB run) on this many "
                         "ML-1M users [default: all].")
    ap.add_argument("--log-size", type=int, default=10_000_000)
    ap.add_argument("--log-only", action="store_true")
    ap.add_argument("--python-log-users", type=int, default=20_000,
                    help="Users of the generated log for the Python check (0: skip).")
    ap.add_argument("--score", default="penalised")
    ap.add_argument("--window", type=int, default=0)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--memory-limit", default="2GB")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    params = {"score": args.score, "window": args.window, "directed": not args.symmetric,
              "top_k": args.top_k}
    print(f"parameters: {params} (other settings: the job's defaults); DuckDB "
          f"memory_limit {args.memory_limit}, {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if not args.log_only:
            full, sub, who = ml1m_inputs(tmp, args.python_users)
            print("ML-1M loo train part:")
            d = run("duckdb", full, tmp / "d.parquet", params, args.memory_limit, args.threads)
            print(line("duckdb", d))
            if sub is not None:
                print(f" subset for the Python baseline: {who}")
                d = run("duckdb", sub, tmp / "d.parquet", params, args.memory_limit,
                        args.threads)
                print(line("duckdb", d))
            py = run("python", sub or full, tmp / "p.parquet", params, "-", 1)
            print(line("python", py))
            print(f"  ratio: DuckDB {py['secs'] / d['secs']:.0f}x faster in wall time "
                  f"({py['cpu'] / d['cpu']:.0f}x less CPU time), "
                  f"{py['rss_mb'] / d['rss_mb']:.1f}x less peak memory ({who})")
            print(f"  results {agree(tmp / 'd.parquet', tmp / 'p.parquet')}")
        log = generated_inputs(tmp, args.log_size)
        import pyarrow.parquet as pq

        n = pq.read_metadata(log / "train.parquet").num_rows
        print(f"generated log: {n:,} interactions")
        d = run("duckdb", log, tmp / "d.parquet", params, args.memory_limit, args.threads)
        print(line("duckdb", d))
        if args.python_log_users:
            import pyarrow.compute as pc

            sub = tmp / "log_subset"
            sub.mkdir()
            train = pq.read_table(log / "train.parquet")
            pq.write_table(train.filter(pc.less(train["u"], args.python_log_users)),
                           sub / "train.parquet")
            for name in ("users", "items"):
                (sub / f"{name}.parquet").symlink_to(log / f"{name}.parquet")
            d = run("duckdb", sub, tmp / "d.parquet", params, args.memory_limit, args.threads)
            py = run("python", sub, tmp / "p.parquet", params, "-", 1)
            print(f" first {args.python_log_users:,} users: duckdb {d['secs']:.2f} s, "
                  f"python {py['secs']:.2f} s ({py['secs'] / d['secs']:.0f}x); results "
                  f"{agree(tmp / 'd.parquet', tmp / 'p.parquet')}")


if __name__ == "__main__":
    main()
