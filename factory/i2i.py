"""Item-to-item (I2I) pair mining as set-based SQL in DuckDB (TwiSTAR 4.3, E.1.3).

Definitions (the Python reference in `factory.i2i_reference` computes exactly these):

* S_u is user u's training sequence (the split's train part only), positions re-numbered
  0..n_u-1; N is the number of training users, n_i the number of training users with item i.
* User u *supports* the pair (i, j) when i sits at position p and j at q with
  directed: 0 < q - p <= W ("j after i", TwiSTAR's reading), symmetric: 0 < |q - p| <= W;
  W = window (0 = the whole sequence, 1 = adjacent items only). U_ij is the set of
  supporting users, support = |U_ij|; pairs with support < min_count are dropped.
* Scores of a kept pair:
  - count      support
  - penalised  sum over U_ij of 1 / (alpha + n_u): co-occurrence where long sequences weigh
               less; this is what the public TwiSTAR code calls "swing"
  - swing      Swing (Wang et al. 2020, Alibaba): sum over unordered user pairs {u, v} in
               U'_ij of w_u w_v / (alpha + |I'_u & I'_v|), w_u = (5 + |I'_u|)^-0.35 (Alink's
               user weights). Swing is quadratic in the users of a pair, so it runs on a
               capped graph: each item keeps its `swing_max_users` users of highest priority
               md5("<seed>:<user_id>") (one priority per user for all items, so capped user
               sets still intersect); I'_u, U'_ij are u's items and (i, j)'s supporters there.
  - pmi        ln(support * N / (n_i * n_j))  (log lift)
  - cond       support / n_i  (share of i's users who support i -> j)
* Scores are rounded to 12 decimals so that summation order never decides a rank; the rank
  within a source orders by score desc, support desc, item_j asc; top_k = 0 keeps all.

The work runs in a scratch DuckDB file (bounded by `memory_limit`, spilling to disk), in
contiguous ranges of source items of about `chunk_occurrences` co-occurrences each: each range
is aggregated (in an array where its key range allows), then ranked on its own and streamed
out, so memory stays bounded whatever the log's size.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from factory.errors import FactoryError, first_line

SCORES = ("count", "penalised", "swing", "pmi", "cond")
#: Alink's Swing user weights: w_u = (SWING_USER_ALPHA + |I_u|) ** -SWING_USER_BETA
SWING_USER_ALPHA = 5.0
SWING_USER_BETA = 0.35
#: group keys spanning up to 2**PERFECT_HT_BITS values aggregate into an array (DuckDB's
#: perfect hash aggregate; default 12 bits): per chunk, bits(source range) + bits(items)
PERFECT_HT_BITS = 22
#: co-occurrences aggregated per chunk: small hash tables are faster and bound memory
CHUNK_OCCURRENCES = 8_000_000


@dataclass(frozen=True)
class MineParams:
    """What a mining run computes; recorded with every run (defaults follow TwiSTAR E.1.3:
    co-occurrence anywhere in the sequence, j after i, length-penalised as in its code)."""

    split: str = "loo"
    window: int = 0
    directed: bool = True
    min_count: int = 2
    top_k: int = 10
    score: str = "penalised"
    alpha: float = 1.0
    swing_max_users: int = 100
    seed: int = 0

    def check(self) -> None:
        if self.score not in SCORES:
            raise FactoryError(f"unknown score {self.score!r} (choose from {', '.join(SCORES)})")
        if self.window < 0:
            raise FactoryError("--window must be 0 (whole sequence) or a positive step count")
        if self.min_count < 1:
            raise FactoryError("--min-count must be at least 1")
        if self.top_k < 0:
            raise FactoryError("--top-k must be 0 (keep all) or positive")
        if self.alpha <= 0:
            raise FactoryError("--alpha must be positive")
        if self.swing_max_users < 2:
            raise FactoryError("--swing-max-users must be at least 2")

    def record(self) -> dict[str, Any]:
        """Parameters as stored; Swing-only settings are left out of other scores' runs."""
        out = asdict(self)
        if self.score == "swing":
            out["swing_user_alpha"] = SWING_USER_ALPHA
            out["swing_user_beta"] = SWING_USER_BETA
        else:
            del out["swing_max_users"], out["seed"]
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()


def load_training(
    con: duckdb.DuckDBPyConnection, dataset: str, split: str
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """The split's train part as dense integers: (u, i, p), users (u, user_id), items
    (i, item_id). Integer codes follow the id order, so `order by i` is `order by item_id`."""
    con.execute(
        "create or replace temp table _train as select user_id, item_id,"
        " (row_number() over (partition by user_id order by position) - 1)::integer as p"
        " from split_interactions where dataset = ? and split = ? and part = 'train'",
        [dataset, split],
    )
    con.execute(
        "create or replace temp table _users as select user_id,"
        " (row_number() over (order by user_id) - 1)::integer as u"
        " from (select distinct user_id from _train)"
    )
    con.execute(
        "create or replace temp table _items as select item_id,"
        " (row_number() over (order by item_id) - 1)::integer as i"
        " from (select distinct item_id from _train)"
    )
    train = con.sql(
        "select u, i, p from _train join _users using (user_id) join _items using (item_id)"
    ).to_arrow_table()
    users = con.sql("select u, user_id from _users").to_arrow_table()
    items = con.sql("select i, item_id from _items").to_arrow_table()
    return train, users, items


def _scalar(con: duckdb.DuckDBPyConnection, sql: str) -> Any:
    """First value of a one-row query, with the result fully consumed."""
    return con.execute(sql).fetchall()[0][0]


def _pair_condition(window: int, directed: bool, a: str = "a", b: str = "b") -> str:
    """SQL for 'b's item is a partner of a's item' on the same user's positions."""
    gap = f"{b}.p - {a}.p" if directed else f"abs({b}.p - {a}.p)"
    cond = f"{b}.p > {a}.p" if directed else f"{b}.p <> {a}.p"
    return cond + (f" and {gap} <= {window}" if window else "")


class Miner:
    """One mining computation in a scratch DuckDB file; use as a context manager."""

    def __init__(self, params: MineParams, memory_limit: str = "2GB",
                 threads: int | None = None, chunk_occurrences: int = CHUNK_OCCURRENCES):
        params.check()
        self.p = params
        self.chunk_occurrences = chunk_occurrences
        self._tmp = tempfile.TemporaryDirectory(prefix="factory-i2i-")
        config: dict[str, Any] = {
            "memory_limit": memory_limit,
            "temp_directory": str(Path(self._tmp.name) / "spill"),
            "preserve_insertion_order": False,
        }
        if threads:
            config["threads"] = threads
        try:
            self.con = duckdb.connect(str(Path(self._tmp.name) / "mine.duckdb"), config=config)
        except duckdb.Error as exc:
            self._tmp.cleanup()
            raise FactoryError(f"cannot start the miner: {str(exc).splitlines()[0]}") from None
        self.con.execute("set enable_progress_bar = false")  # ours is on stderr already
        self.con.execute(f"set perfect_ht_threshold = {PERFECT_HT_BITS}")
        self.stats: dict[str, Any] = {}

    def __enter__(self) -> Miner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.con.close()
        self._tmp.cleanup()

    # -- stages ------------------------------------------------------------------------
    def load(self, train: pa.Table, users: pa.Table, items: pa.Table) -> int:
        """Store the inputs; returns the number of chunks the pair stage will take."""
        con, p = self.con, self.p
        con.register("_in_train", train)
        con.register("_in_users", users)
        con.register("_in_items", items)
        con.execute("create table items as select i, item_id from _in_items")
        con.execute(
            "create table ulen as select u, count(*)::integer as n from _in_train group by u"
        )
        multi = _scalar(con, "select count(*) from ulen where n >= 2")
        if not multi:
            raise FactoryError(
                "no training sequence has two or more items, so nothing co-occurs "
                "(check the split, or the dataset's --core)"
            )
        con.execute(
            "create table t as select t.u, t.i, t.p, 1.0 / ($alpha + ulen.n) as w"
            " from _in_train t join ulen using (u)", {"alpha": p.alpha},
        )
        con.execute("create table ipop as select i, count(*)::integer as n from t group by i")
        if p.score == "swing":
            con.execute("create table users as select u, user_id from _in_users")
        for name in ("_in_train", "_in_users", "_in_items"):
            con.unregister(name)
        # Chunks are contiguous ranges of source items holding about chunk_occurrences
        # co-occurrences each: balanced work, and small key ranges that DuckDB can aggregate
        # in a perfect hash table (an array) instead of a hash table.
        partners = "n - 1 - t.p" if not p.window else f"least({p.window}, n - 1 - t.p)"
        con.execute(
            f"create table chunks as select chunk, min(i) as lo, max(i) as hi from ("
            f"  select i, ((sum(k) over (order by i rows unbounded preceding) - k)"
            f"   // {self.chunk_occurrences})::bigint as chunk"
            f"  from (select t.i, sum({partners})::bigint as k from t join ulen using (u)"
            f"        group by t.i)"
            f") group by chunk order by chunk"
        )
        self.ranges = con.execute("select lo, hi from chunks order by chunk").fetchall()
        occurrences = int(_scalar(con, "select sum(n * (n - 1) / 2) from ulen") if not p.window
                          else _scalar(con, f"select sum({partners}) from t join ulen using (u)"))
        self.stats.update(
            users=int(_scalar(con, "select count(*) from ulen")),
            users_with_pairs=int(multi),
            training_items=int(_scalar(con, "select count(*) from ipop")),
            interactions=int(_scalar(con, "select count(*) from t")),
            co_occurrences=occurrences * (1 if p.directed else 2),
        )
        return len(self.ranges)

    def count_pairs(self, tick: Callable[[], None] = lambda: None) -> None:
        """Supports and penalised sums of every kept pair, a chunk of source items at a time.

        Directed: one row per ordered occurrence (a before b). Symmetric: each unordered pair
        once (a.i < b.i), mirrored at the end, which halves the rows to aggregate."""
        con, p = self.con, self.p
        con.execute("create table pairs (i integer, j integer, support integer, pen double)")
        if p.directed:
            join = _pair_condition(p.window, True)
        else:
            join = "a.i < b.i" + (f" and abs(a.p - b.p) <= {p.window}" if p.window else "")
        pen = "sum(a.w)" if p.score == "penalised" else "null"  # only penalised needs it
        for lo, hi in self.ranges:
            con.execute(
                f"insert into pairs select a.i, b.i, count(*), {pen}"
                f" from t a join t b on a.u = b.u and {join}"
                f" where a.i between {lo} and {hi} group by a.i, b.i having count(*) >= $m",
                {"m": p.min_count},
            )
            tick()
        if not p.directed:
            con.execute("insert into pairs select j, i, support, pen from pairs")
        self.stats["pairs_before_top_k"] = int(_scalar(con, "select count(*) from pairs"))

    def swing(self, tick: Callable[[], None] = lambda: None) -> None:
        """Swing scores of the kept pairs on the capped graph (see the module docstring)."""
        con, p = self.con, self.p
        con.execute(
            "create table cap as select t.u, t.i, t.p from t join ("
            "  select u, md5($seed || ':' || user_id) as h from users) using (u)"
            " qualify row_number() over (partition by t.i order by h, t.u) <= $m",
            {"seed": str(p.seed), "m": p.swing_max_users},
        )
        # one weight per user pair sharing a capped item: w_u w_v / (alpha + |I'_u & I'_v|)
        con.execute(
            "create table uw as select u, pow($ua + count(*), -$ub) as w from cap group by u",
            {"ua": SWING_USER_ALPHA, "ub": SWING_USER_BETA},
        )
        con.execute(
            "create table uu as select o.u, o.v, wu.w * wv.w / ($alpha + o.ov) as wt from ("
            "  select a.u, b.u as v, count(*) as ov from cap a join cap b"
            "  on a.i = b.i and a.u < b.u group by a.u, b.u"
            ") o join uw wu on wu.u = o.u join uw wv on wv.u = o.v",
            {"alpha": p.alpha},
        )
        con.execute(
            f"create table occ as select a.i, b.i as j, a.u from cap a join cap b"
            f" on a.u = b.u and {_pair_condition(p.window, p.directed)}"
            f" semi join pairs on pairs.i = a.i and pairs.j = b.i"
        )
        con.execute("create table sw (i integer, j integer, s double)")
        for lo, hi in self.ranges:
            # the supporter pairs of each item pair first (materialised, so that the
            # optimiser cannot start from the user-pair table and explode)
            con.execute(
                "insert into sw with xy as materialized ("
                "  select x.i, x.j, x.u, y.u as v from occ x join occ y"
                "  on x.i = y.i and x.j = y.j and x.u < y.u"
                f"  where x.i between {lo} and {hi} and y.i between {lo} and {hi})"
                " select xy.i, xy.j, sum(uu.wt) from xy join uu on uu.u = xy.u and uu.v = xy.v"
                " group by xy.i, xy.j",
            )
            tick()
        self.stats["swing_capped_edges"] = int(_scalar(con, "select count(*) from cap"))

    def results(self, batch_rows: int = 500_000,
                tick: Callable[[], None] = lambda: None) -> Iterator[pa.RecordBatch]:
        """(item_i, item_j, support, score, rank) for the kept pairs, top-k per source;
        `tick()` after each chunk's batches were taken (and stored by the caller)."""
        p = self.p
        n_users = self.stats["users"]
        score = {
            "count": "pairs.support::double",
            "penalised": "pairs.pen",
            "swing": "coalesce(sw.s, 0.0)",
            "pmi": f"ln(pairs.support * {n_users}::double / (pi.n::double * pj.n))",
            "cond": "pairs.support::double / pi.n",
        }[p.score]
        joins = {
            "swing": " left join sw on sw.i = pairs.i and sw.j = pairs.j",
            "pmi": " join ipop pi on pi.i = pairs.i join ipop pj on pj.i = pairs.j",
            "cond": " join ipop pi on pi.i = pairs.i",
        }.get(p.score, "")
        top = f" qualify rank <= {p.top_k}" if p.top_k else ""
        # rank on integers a chunk of sources at a time (small sorts), then attach the ids
        for lo, hi in self.ranges:
            yield from self.con.sql(
                "select ii.item_id as item_i, ij.item_id as item_j, support, score, rank from ("
                "  select i, j, support, score, row_number() over"
                "   (partition by i order by score desc, support desc, j)::integer as rank from"
                f"  (select pairs.i, pairs.j, pairs.support, round({score}, 12) as score"
                f"   from pairs{joins} where pairs.i between {lo} and {hi}){top}"
                ") r join items ii on ii.i = r.i join items ij on ij.i = r.j"
            ).to_arrow_reader(batch_rows)
            tick()


def mine(
    train: pa.Table, users: pa.Table, items: pa.Table, params: MineParams, *,
    memory_limit: str = "2GB", threads: int | None = None,
    on_chunk: Callable[[int, int, str], None] | None = None,
    chunk_occurrences: int = CHUNK_OCCURRENCES,
) -> Iterator[tuple[pa.RecordBatch, dict[str, Any]]]:
    """Mine pairs from dense-coded training interactions; yields result batches with the
    running statistics. `on_chunk(done, total, stage)` reports progress over all chunked
    stages, ranking and storing included (the long tail after counting on ml-1m)."""
    with Miner(params, memory_limit=memory_limit, threads=threads,
               chunk_occurrences=chunk_occurrences) as miner:
        try:
            chunks = miner.load(train, users, items)
            total = chunks * (3 if params.score == "swing" else 2)
            done = 0

            def ticker(stage: str) -> Callable[[], None]:
                def tick() -> None:
                    nonlocal done
                    done += 1
                    if on_chunk:
                        on_chunk(done, total, stage)
                return tick

            miner.count_pairs(ticker("counting pairs"))
            if params.score == "swing":
                miner.swing(ticker("swing scores"))
            miner.stats["chunks"] = chunks
            for batch in miner.results(tick=ticker("ranking and storing")):
                yield batch, miner.stats
        except duckdb.OutOfMemoryException as exc:
            raise FactoryError(out_of_memory(exc, memory_limit, threads)) from None


def out_of_memory(exc: BaseException, memory_limit: str, threads: int | None) -> str:
    """One line for a miner that hit its DuckDB memory limit. DuckDB's own hint says `SET
    memory_limit`, which a factory user cannot type: name the options instead. (An error of
    the caller's, e.g. storing a batch, never reaches the generator, so this is the miner's.)"""
    detail = first_line(exc)
    detail = detail.removeprefix("Out of Memory Error: ")
    threads_hint = f" (now {threads})" if threads else ""
    return (f"mining ran out of memory at --memory-limit {memory_limit} ({detail}); raise "
            f"--memory-limit or lower --threads{threads_hint}")


def resolve_i2i_run(con: duckdb.DuckDBPyConnection, dataset: str, i2i_run: str | None,
                    split: str | None = None) -> str:
    """The mining run a job reads pairs from: `i2i_run` (an id, a unique prefix, or latest),
    by default the dataset's latest finished one, of `split` when given."""
    from factory.runs import LATEST, resolve_run

    if i2i_run is not None and i2i_run.strip() != LATEST:
        run_id = resolve_run(con, "mine-i2i", dataset, i2i_run,
                             within="select run_id from i2i_runs", option="--i2i-run",
                             first=f"factory mine-i2i --dataset {dataset}")
        row = con.execute("select split from i2i_runs where run_id = ?", [run_id]).fetchone()
        if split is not None and row is not None and row[0] != split:
            raise FactoryError(f"--i2i-run {run_id} mined split {row[0]!r}, not {split!r}")
        return run_id
    row = con.execute("select arg_max(run_id, finished_at) from i2i_runs where dataset = ?"
                      " and (? is null or split = ?)", [dataset, split, split]).fetchone()
    if row is None or row[0] is None:
        on = f" on split {split!r}" if split else ""
        raise FactoryError(f"no I2I pairs for {dataset!r}{on}: run `factory mine-i2i "
                           f"--dataset {dataset}" + (f" --split {split}`" if split else "`")
                           + " first")
    return row[0]
