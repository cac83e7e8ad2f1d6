"""I2I mining benchmark (issue 18): factory's miner against a scipy.sparse baseline.

Inputs: the ML-1M loo training part (ingested into a temporary warehouse) and a SYNTHETIC,
seeded log of ~10M interactions generated here: Zipf(1.05) item popularity over 300k items,
log-normal user lengths (median 8, long tail, cap 2,000), duplicates within a user dropped.
Configurations: symmetric count and directed penalised, whole sequence, min-count 2, top-k 10.

Variants, each run in its own process (peak memory = that process's ru_maxrss, the Python,
numpy, scipy, pyarrow and DuckDB imports and the input tables included; "inputs" is the RSS
once the inputs are read):

  factory  factory.i2i.mine with the job's engine choice (the sparse engine here): supports,
           scores, top-k ranks with tie-breaks and item ids, in bounded blocks
  scipy    the baseline, one scipy.sparse product in one piece (unbounded memory), then the
           diagonal (symmetric) and pairs below min-count dropped; no ranking, no ids, so a
           lower bound on the time of a scipy pipeline with the same output.
           Symmetric: X^T X (X users x items, float64 ones), the issue's measurement.
           Directed: the same dyadic-halves product as the sparse engine (L^T R, count +
           i * penalised sum in complex128), written out plainly
  sql      factory's SQL engine (the miner before issue 18), --sql-repeats times
  pairs    (directed, --pairs-repeats) the plain scipy way: every ordered pair enumerated
           with numpy, ~20M at a time, COO -> CSR summed; slow

Repeats are interleaved (factory, scipy, sql, factory, scipy, ...) so that load on a shared
machine hits every variant alike; medians are printed, and ratio = factory / scipy.

    python bench/mine_i2i.py                         # both inputs, 3 repeats
    python bench/mine_i2i.py --log-repeats 1 --sql-repeats 0
    python bench/mine_i2i.py --skip-log              # ML-1M only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, scipy.sparse as sp
from factory.i2i import MineParams, mine
variant, inputs, params, limit, threads = sys.argv[1:6]
params = MineParams(**json.loads(params))
train = pq.read_table(f"{inputs}/train.parquet")
users = pq.read_table(f"{inputs}/users.parquet")
items = pq.read_table(f"{inputs}/items.parquet")
def peak_mb():
    # VmHWM: ru_maxrss would keep the parent's peak across fork + exec
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 1024
rss_inputs = peak_mb()
t0 = time.perf_counter()
if variant in ("factory", "sql"):
    stats = {}
    rows = sum(b.num_rows for b, _ in mine(
        train, users, items, params, memory_limit=limit, threads=int(threads), stats=stats,
        engine="auto" if variant == "factory" else "sql"))
    kept, engine = stats["pairs_before_top_k"], stats["engine"]
else:
    engine = variant
    u = train["u"].to_numpy().astype(np.int64)
    i = train["i"].to_numpy().astype(np.int64)
    shape = (int(u.max()) + 1, max(items.num_rows, int(i.max()) + 1))
    if variant == "scipy" and not params.directed:
        X = sp.csr_matrix((np.ones(len(u)), (u, i)), shape=shape)
        C = (X.T @ X).tocsr()
        C.setdiag(0)
        C.eliminate_zeros()
        kept = int((C.data >= params.min_count).sum())
    elif variant == "scipy":
        # dyadic halves: at level l a sequence's positions p, q < n meet in group p >> (l+1)
        # iff bit l is the highest where they differ, p with bit l clear (left), q set
        order = np.lexsort((train["p"].to_numpy(), u))
        u, i = u[order], i[order]
        n_u = np.bincount(u)
        pos = np.arange(len(u)) - (np.cumsum(n_u) - n_u)[u]
        w = 1.0 / (params.alpha + n_u[u])
        rows_l, cols_l, data_l, rows_r, cols_r = [], [], [], [], []
        base, level = 0, 0
        while (1 << level) < n_u.max():
            groups = -(-n_u // (2 << level))
            gid = base + (np.cumsum(groups) - groups)[u] + (pos >> (level + 1))
            left = (pos >> level) & 1 == 0
            rows_l.append(i[left]); cols_l.append(gid[left]); data_l.append(1 + 1j * w[left])
            rows_r.append(gid[~left]); cols_r.append(i[~left])
            base += int(groups.sum())
            level += 1
        L = sp.csr_matrix((np.concatenate(data_l), (np.concatenate(rows_l),
                           np.concatenate(cols_l))), shape=(shape[1], base))
        R = sp.csr_matrix((np.ones(sum(map(len, rows_r)), complex),
                           (np.concatenate(rows_r), np.concatenate(cols_r))),
                          shape=(base, shape[1]))
        del rows_l, cols_l, data_l, rows_r, cols_r
        D = L @ R
        kept = int((D.data.real >= params.min_count).sum())
    else:
        # every ordered pair enumerated, a batch at a time, summed as COO -> CSR
        order = np.lexsort((train["p"].to_numpy(), u))
        u, i = u[order], i[order]
        n_u = np.bincount(u)
        n_e = n_u[u]
        pos = np.arange(len(u)) - (np.cumsum(n_u) - n_u)[u]
        w = 1.0 / (params.alpha + n_e)
        after = n_e - 1 - pos                     # partners after each interaction
        ends = np.cumsum(after)
        cut = np.searchsorted(ends, np.arange(20_000_000, ends[-1], 20_000_000))
        D = None
        for a, b in zip(np.r_[0, cut], np.r_[cut, len(u)]):
            cnt = after[a:b]
            first = np.repeat(np.arange(a, b), cnt)
            second = first + 1 + np.arange(len(first)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            d = sp.csr_matrix((1 + 1j * w[first], (i[first], i[second])),
                              shape=(shape[1], shape[1]))
            D = d if D is None else D + d
            del first, second, d
        kept = int((D.data.real >= params.min_count).sum())
    rows = kept
secs = time.perf_counter() - t0
print(json.dumps({"secs": secs, "kept": kept, "rows": rows, "engine": engine,
                  "rss_inputs": rss_inputs, "rss": peak_mb()}))
"""


def run(variant: str, inputs: Path, params: dict, limit: str, threads: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, variant, str(inputs), json.dumps(params), limit,
         str(threads)], capture_output=True, text=True,
    )
    if proc.returncode:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ml1m_inputs(tmp: Path) -> Path:
    """Train part of ML-1M's loo split (5-core), ingested into a temporary warehouse."""
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
    return full


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


def compare(name: str, inputs: Path, params: dict, args: argparse.Namespace,
            repeats: int) -> None:
    extra = {"sql": args.sql_repeats,
             "pairs": args.pairs_repeats if params["directed"] else 0}
    runs: dict[str, list[dict]] = {"factory": [], "scipy": [], "sql": [], "pairs": []}
    for r in range(max(repeats, *extra.values())):
        for v in ("factory", "scipy", "sql", "pairs"):
            if r < extra.get(v, repeats):
                runs[v].append(run(v, inputs, params, args.memory_limit, args.threads))
    print(f"  {name} ({params}), medians of {repeats} interleaved repeats:")
    med = {}
    for v, rs in runs.items():
        if not rs:
            continue
        med[v] = {k: statistics.median(r[k] for r in rs) for k in ("secs", "rss", "rss_inputs")}
        times = ", ".join(f"{r['secs']:.2f}" for r in rs)
        print(f"    {v:<8} {med[v]['secs']:7.2f} s  peak RSS {med[v]['rss']:6.0f} MB "
              f"(inputs read: {med[v]['rss_inputs']:4.0f} MB)  engine {rs[0]['engine']:<7} "
              f"{rs[0]['kept']:>11,} pairs >= min-count   runs: {times}")
    kept = {v: rs[0]["kept"] for v, rs in runs.items() if rs}
    same = "same" if len(set(kept.values())) == 1 else f"DIFFERENT {kept}"
    f, s = med["factory"], med["scipy"]
    print(f"    ratio factory/scipy: {f['secs'] / s['secs']:.2f}x time, "
          f"{f['rss'] / s['rss']:.2f}x peak memory; pairs >= min-count: {same}")
    for v, what in (("sql", "factory's SQL engine (before issue 18)"),
                    ("pairs", "scipy on enumerated pairs")):
        if v in med:
            print(f"    {what} / scipy: {med[v]['secs'] / s['secs']:.2f}x time, "
                  f"{med[v]['rss'] / s['rss']:.2f}x peak memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="Repeats on ML-1M.")
    ap.add_argument("--log-repeats", type=int, default=3, help="Repeats on the 10M log.")
    ap.add_argument("--sql-repeats", type=int, default=1,
                    help="Runs of the SQL engine per configuration (0: none).")
    ap.add_argument("--pairs-repeats", type=int, default=0,
                    help="Runs of the enumerated-pairs scipy baseline (directed only; slow).")
    ap.add_argument("--log-size", type=int, default=10_000_000)
    ap.add_argument("--skip-ml1m", action="store_true")
    ap.add_argument("--skip-log", action="store_true")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--min-count", type=int, default=2)
    ap.add_argument("--memory-limit", default="2GB")
    ap.add_argument("--threads", type=int, default=2, help="DuckDB threads (SQL engine).")
    args = ap.parse_args()
    configs = [("symmetric count", {"score": "count", "directed": False}),
               ("directed penalised", {"score": "penalised", "directed": True})]
    print(f"top-k {args.top_k}, min-count {args.min_count}, whole sequence; memory limit "
          f"{args.memory_limit}; SQL engine threads {args.threads}")
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        inputs = []
        if not args.skip_ml1m:
            inputs.append(("ML-1M loo train part", ml1m_inputs(tmp), args.repeats))
        if not args.skip_log:
            inputs.append(("generated (synthetic) log", generated_inputs(tmp, args.log_size),
                           args.log_repeats))
        for title, path, repeats in inputs:
            train = pq.read_table(path / "train.parquet")
            print(f"{title}: {train.num_rows:,} interactions, "
                  f"{len(set(train['u'].to_pylist())):,} users, "
                  f"{len(set(train['i'].to_pylist())):,} items")
            for name, score in configs:
                params = {**score, "top_k": args.top_k, "min_count": args.min_count}
                compare(name, path, params, args, repeats)


if __name__ == "__main__":
    main()
