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

Two engines compute the same pairs, scores and ranks:

* `SparseMiner` (count, penalised, pmi and cond over the whole sequence, `window` 0): sparse
  matrix products in blocks of source items (scipy). Symmetric supports are X^T X (X: users x
  items). Directed ones ("j after i") split every sequence into dyadic halves: at level l a
  sequence is cut into groups of 2^(l+1) positions, each a left and a right half, and every
  pair p < q meets in exactly one group (the level of the highest bit where p and q differ)
  with p on the left and q on the right, so D = sum_l L_l^T R_l, one product over levels
  stacked side by side with n log n entries. Support and penalised sum come out of one
  complex product (1 + i w_u). Each block is ranked at once (a float32 sort key prunes each
  source to its top-k candidates, then an exact sort) and streamed out, so memory stays
  bounded by the block size; it is chosen only when its estimated peak fits `memory_limit`.
* `Miner` (everything else: windows, Swing, or a tight memory limit): set-based SQL in a
  scratch DuckDB file (bounded by `memory_limit`, spilling to disk), in contiguous ranges of
  source items of about `chunk_occurrences` co-occurrences each: each range is aggregated (in
  an array where its key range allows), then ranked on its own and streamed out.

Both round scores with DuckDB's own round(x, 12), so ties break the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
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
#: scores the sparse-product engine computes (whole sequence only)
SPARSE_SCORES = ("count", "penalised", "pmi", "cond")
#: candidate pairs (product entries) per block of the sparse engine; its memory per block
#: is about SPARSE_BYTES_PER_PAIR times this
SPARSE_BLOCK_PAIRS = 2_000_000
SPARSE_BYTES_PER_PAIR = 120


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


def parse_bytes(text: str) -> int | None:
    """A DuckDB memory setting ('2GB', '500MiB', '1.5 gb') in bytes; None if unreadable."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?(?:ytes)?\s*", text, re.I)
    if not m:
        return None
    power = "bkmgt".index((m.group(2) or "b").lower())
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


class SparseMiner:
    """Supports, penalised sums and ranks as sparse products in blocks of source items
    (whole-sequence windows; see the module docstring). Use as a context manager."""

    def __init__(self, params: MineParams, block_pairs: int = SPARSE_BLOCK_PAIRS):
        params.check()
        if params.score not in SPARSE_SCORES or params.window:
            raise ValueError(f"the sparse engine does not compute {params.score} with "
                             f"window {params.window}")
        self.p = params
        self.block_pairs = max(1, block_pairs)
        self.stats: dict[str, Any] = {}
        self._con = duckdb.connect(config={"threads": 1})  # DuckDB's round(), for equal ties

    def __enter__(self) -> SparseMiner:
        return self

    def __exit__(self, *exc: object) -> None:
        self._con.close()

    @staticmethod
    def estimate_bytes(train: pa.Table, params: MineParams,
                       block_pairs: int = SPARSE_BLOCK_PAIRS) -> int:
        """Peak memory of the mining itself (the input tables aside), an upper bound
        calibrated on ML-1M and the bench's 10M log: the operands while they are built and
        transposed, or the operands and one block."""
        n = train.num_rows
        if not n:
            return 0
        value = 16 if params.score == "penalised" else 4   # complex128 or float32
        if params.directed:
            lengths = np.bincount(train["u"].to_numpy(zero_copy_only=False))
            lengths = lengths[lengths > 1]
            entries = int((lengths * np.ceil(np.log2(lengths))).sum())  # >= L + R entries
            operands = (value + 4) * entries
            build = operands + 2 * entries + 70 * n
        else:
            operands = 2 * (value + 4) * n
            build = operands + 48 * n
        return max(build, operands + block_pairs * SPARSE_BYTES_PER_PAIR)

    def load(self, train: pa.Table, users: pa.Table, items: pa.Table) -> int:
        """Build both operands; returns the number of blocks."""
        import scipy.sparse as sp

        p = self.p
        u = train["u"].to_numpy(zero_copy_only=False).astype(np.int64)
        i = train["i"].to_numpy(zero_copy_only=False).astype(np.int64)
        pos_in = train["p"].to_numpy(zero_copy_only=False)
        item_codes = items["i"].to_numpy(zero_copy_only=False).astype(np.int64)
        n_items = int(max(item_codes.max(initial=-1), i.max(initial=-1)) + 1)
        lookup = np.full(n_items, -1, dtype=np.int64)
        lookup[item_codes] = np.arange(len(item_codes))
        self.item_ids = items["item_id"]
        self.lookup = lookup
        n_u = np.bincount(u) if len(u) else np.zeros(0, dtype=np.int64)
        multi = int((n_u >= 2).sum())
        if not multi:
            raise FactoryError(
                "no training sequence has two or more items, so nothing co-occurs "
                "(check the split, or the dataset's --core)"
            )
        self.ipop = np.bincount(i, minlength=n_items)
        n_users = int((n_u > 0).sum())
        self.stats.update(
            users=n_users, users_with_pairs=multi,
            training_items=int((self.ipop > 0).sum()), interactions=len(u),
            co_occurrences=int((n_u * (n_u - 1) // 2).sum()) * (1 if p.directed else 2),
            pairs_before_top_k=0,
        )
        # interactions in (user, position) order; positions re-numbered 0..n_u-1
        order = np.lexsort((pos_in, u))
        u, i = u[order], i[order]
        del order, pos_in
        pos = np.arange(len(u)) - (np.cumsum(n_u) - n_u)[u]
        if len(u) < 2**26:  # group ids (< n * levels) fit in 32 bits: less to move
            u, i, pos, n_u = (x.astype(np.int32) for x in (u, i, pos, n_u))
        n_e = n_u[u]
        if p.score == "penalised":
            self.dtype: type = np.complex128  # support + i * penalised sum
        else:
            self.dtype = np.float32 if n_users < 2**24 else np.float64  # exact counts

        def left_data(mask: np.ndarray | None = None) -> np.ndarray:
            """Left-hand values of the interactions in `mask`: 1, or 1 + i / (alpha + n_u)."""
            n = n_e if mask is None else n_e[mask]
            if self.dtype is np.complex128:
                return 1.0 + 1j / (p.alpha + n)
            return np.ones(len(n), dtype=self.dtype)

        if not p.directed:
            # rows already in user order: CSR directly (no sort); X^T by a linear transpose
            indptr = np.concatenate(([0], np.cumsum(n_u)))
            self.left = sp.csr_matrix((left_data(), i, indptr),
                                      shape=(len(n_u), n_items)).T.tocsr()
            self.right = sp.csr_matrix((np.ones(len(u), dtype=self.dtype), i, indptr),
                                       shape=(len(n_u), n_items))
            partners = n_e - 1
        else:
            self.left, self.right = self._dyadic(u, i, pos, n_u, n_e, left_data, n_items)
            partners = n_e - 1 - pos
        # candidate pairs of a source: at most its co-occurrences, at most every item
        bound = np.minimum(np.bincount(i, weights=partners, minlength=n_items), n_items)
        before = np.cumsum(bound) - bound
        chunk = (before // self.block_pairs).astype(np.int64)
        starts = np.flatnonzero(np.diff(chunk, prepend=-1))
        ends = np.append(starts[1:], n_items)
        sums = np.add.reduceat(bound, starts) if n_items else np.zeros(0)
        self.ranges = [(int(a), int(b)) for a, b, s in zip(starts, ends, sums, strict=True)
                       if s > 0]
        return len(self.ranges)

    def _dyadic(self, u: np.ndarray, i: np.ndarray, pos: np.ndarray, n_u: np.ndarray,
                n_e: np.ndarray, left_data: Callable[[np.ndarray], np.ndarray],
                n_items: int) -> tuple[Any, Any]:
        """L^T (items x groups) and R (groups x items) of the directed supports: level l
        groups a sequence's positions by p >> (l+1); p's half is bit l. Only groups with a
        right half take part. Entries come in group order (user, position within a level,
        levels one after the other), so both halves are CSR by group as they are written;
        L^T is a linear transpose. Sizes are counted first so that every array is written
        once, in place."""
        import scipy.sparse as sp

        levels = range(int(np.ceil(np.log2(max(int(n_u.max()), 1)))))

        def halves(level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
            half = 1 << level
            g = pos >> (level + 1)
            part = (g << (level + 1)) + half < n_e
            is_left = (pos & half) == 0
            groups = np.where(n_u > half, (n_u + 2 * half - 1) // (2 * half), 0)
            gid = (np.cumsum(groups) - groups).astype(g.dtype)[u] + g
            return part & is_left, part & ~is_left, gid, int(groups.sum())

        sizes = [(int(a.sum()), int(b.sum())) for a, b, _, _ in map(halves, levels)]
        n_left, n_right = sum(a for a, _ in sizes), sum(b for _, b in sizes)
        l_cols = np.empty(n_left, dtype=i.dtype)
        l_data = np.empty(n_left, dtype=self.dtype)
        r_cols = np.empty(n_right, dtype=i.dtype)
        l_rows, r_rows = [], []
        a = b = 0
        for level, (k_left, k_right) in zip(levels, sizes, strict=True):
            left, right, gid, n_groups = halves(level)
            l_cols[a:a + k_left] = i[left]
            l_data[a:a + k_left] = left_data(left)
            r_cols[b:b + k_right] = i[right]
            l_rows.append(np.bincount(gid[left], minlength=n_groups))
            r_rows.append(np.bincount(gid[right], minlength=n_groups))
            a, b = a + k_left, b + k_right
            del left, right, gid

        def indptr(rows: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(([0], np.cumsum(np.concatenate(rows))))

        base = sum(len(x) for x in l_rows)
        lt = sp.csr_matrix((l_data, l_cols, indptr(l_rows)), shape=(base, n_items)).T.tocsr()
        del l_data, l_cols
        r = sp.csr_matrix((np.ones(n_right, dtype=self.dtype), r_cols, indptr(r_rows)),
                          shape=(base, n_items))
        return lt, r

    def results(self, batch_rows: int = 500_000,
                counted: Callable[[], None] = lambda: None,
                ranked: Callable[[], None] = lambda: None) -> Iterator[pa.RecordBatch]:
        """(item_i, item_j, support, score, rank) of the kept pairs, a block at a time;
        `counted()` after a block's product, `ranked()` after its batches were taken."""
        for lo, hi in self.ranges:
            prod = self.left[lo:hi] @ self.right
            counted()
            table = self._rank(lo, hi, prod)
            del prod
            yield from table.to_batches(batch_rows)
            ranked()

    def _rank(self, lo: int, hi: int, prod: Any) -> pa.Table:
        p = self.p
        counts = np.diff(prod.indptr)
        rows = np.repeat(np.arange(lo, hi, dtype=np.int64), counts)
        cols = prod.indices.astype(np.int64)
        vals = prod.data
        support = vals.real if self.dtype is np.complex128 else vals
        keep = support >= p.min_count - 0.5
        if not p.directed:
            keep &= cols != rows
        rows, cols = rows[keep], cols[keep]
        sup = np.rint(support[keep]).astype(np.int64)
        self.stats["pairs_before_top_k"] += len(rows)
        if p.score == "penalised":
            raw = vals.imag[keep]
        elif p.score == "count":
            raw = sup.astype(np.float64)
        elif p.score == "pmi":
            raw = np.log(sup * float(self.stats["users"])
                         / (self.ipop[rows].astype(np.float64) * self.ipop[cols]))
        else:
            raw = sup / self.ipop[rows].astype(np.float64)
        del vals, support, keep
        if p.top_k:
            cand = self._candidates(rows - lo, hi - lo, raw, p.top_k)
            if cand is not None:
                rows, cols, sup, raw = rows[cand], cols[cand], sup[cand], raw[cand]
        score = self._round(raw)
        order = np.lexsort((cols, -sup, -score, rows))
        rows, cols, sup, score = rows[order], cols[order], sup[order], score[order]
        rank = np.arange(1, len(rows) + 1) - np.searchsorted(rows, rows, side="left")
        if p.top_k:
            top = rank <= p.top_k
            rows, cols, sup, score, rank = (x[top] for x in (rows, cols, sup, score, rank))
        return pa.table({
            "item_i": self.item_ids.take(pa.array(self.lookup[rows])),
            "item_j": self.item_ids.take(pa.array(self.lookup[cols])),
            "support": pa.array(sup, pa.int32()),
            "score": pa.array(score, pa.float64()),
            "rank": pa.array(rank, pa.int32()),
        })

    @staticmethod
    def _candidates(r: np.ndarray, n_rows: int, raw: np.ndarray, k: int) -> np.ndarray | None:
        """Entries that may be in their row's top k (a superset: ties and rounding kept).
        Rows come in order. A row's k-th score is bounded first from m of its entries
        spread along it (the k-th of any subset is no larger), which prunes long rows
        cheaply, then found among what is left; m ~ sqrt(k * row length) balances the two
        sorts."""
        cnt = np.bincount(r, minlength=n_rows)
        big = cnt > k
        if not big.any():
            return None
        in_big = big[r]
        m = max(4 * k, int(np.sqrt(k * cnt[big].mean())))
        if (cnt > m).any():
            nth = np.arange(len(r)) - (np.cumsum(cnt) - cnt)[r]
            stride = np.maximum(cnt // m, 1)[r]
            first = np.flatnonzero(in_big & (nth % stride == 0))
            in_big &= raw >= SparseMiner._kth_bound(r, raw, first, n_rows, k)[r]
        return np.flatnonzero(
            raw >= SparseMiner._kth_bound(r, raw, np.flatnonzero(in_big), n_rows, k)[r])

    @staticmethod
    def _kth_bound(r: np.ndarray, raw: np.ndarray, idx: np.ndarray, n_rows: int,
                   k: int) -> np.ndarray:
        """Per row, the k-th largest score among the entries `idx` (each row there has at
        least k), less what float32 and 12-decimal rounding could hide; -inf for rows not
        in `idx`. Sorts a 64-bit key (row, float32 score descending)."""
        rs = r[idx]
        cnt = np.bincount(rs, minlength=n_rows)
        has = cnt > 0
        bits = (raw[idx] + 0.0).astype(np.float32).view(np.uint32)
        asc = np.where(bits & 0x80000000, ~bits, bits | 0x80000000)
        key = (rs.astype(np.uint64) << np.uint64(32)) | (~asc).astype(np.uint64)
        key.sort()
        kth = ~key[(np.cumsum(cnt) - cnt)[has] + k - 1].astype(np.uint32)  # low 32 bits
        kth = np.where(kth & 0x80000000, kth & 0x7FFFFFFF, ~kth).view(np.float32)
        kth = kth.astype(np.float64)
        thr = np.full(n_rows, -np.inf)
        # every score that rounds (float32, then to 12 decimals) like the k-th may tie it
        thr[has] = kth - np.abs(kth) * 2.0**-22 - 4e-12
        return thr

    def _round(self, x: np.ndarray) -> np.ndarray:
        """DuckDB's round(x, 12), the SQL engine's and the stored scores' rounding."""
        self._con.register("_scores", pa.table({"x": x}))
        try:
            out = self._con.sql("select round(x, 12) as x from _scores").fetchnumpy()["x"]
        finally:
            self._con.unregister("_scores")
        return np.asarray(out, dtype=np.float64)


def choose_engine(train: pa.Table, params: MineParams, memory_limit: str,
                  block_pairs: int = SPARSE_BLOCK_PAIRS) -> str:
    """'sparse' where it computes the score and its estimated peak fits memory_limit,
    else 'sql' (which spills to disk beyond the limit)."""
    if params.score not in SPARSE_SCORES or params.window:
        return "sql"
    limit = parse_bytes(memory_limit)
    if limit is None or SparseMiner.estimate_bytes(train, params, block_pairs) > limit:
        return "sql"
    return "sparse"


def mine(
    train: pa.Table, users: pa.Table, items: pa.Table, params: MineParams, *,
    memory_limit: str = "2GB", threads: int | None = None,
    on_chunk: Callable[[int, int, str], None] | None = None,
    chunk_occurrences: int = CHUNK_OCCURRENCES, engine: str = "auto",
    stats: dict[str, Any] | None = None,
) -> Iterator[tuple[pa.RecordBatch, dict[str, Any]]]:
    """Mine pairs from dense-coded training interactions; yields result batches with the
    running statistics (also kept in `stats` when given, complete once the generator ends).
    `on_chunk(done, total, stage)` reports progress over all chunked stages, ranking and
    storing included (the long tail after counting on ml-1m). `engine`: 'auto' (the sparse
    engine where it applies and fits `memory_limit`), 'sparse' or 'sql'."""
    stats = {} if stats is None else stats
    block_pairs = min(chunk_occurrences, SPARSE_BLOCK_PAIRS)
    if engine == "auto":
        engine = choose_engine(train, params, memory_limit, block_pairs)
    if engine not in ("sparse", "sql"):
        raise ValueError(f"unknown engine {engine!r}")
    done = 0
    total = 0

    def ticker(stage: str) -> Callable[[], None]:
        def tick() -> None:
            nonlocal done
            done += 1
            if on_chunk:
                on_chunk(done, total, stage)
        return tick

    if engine == "sparse":
        with SparseMiner(params, block_pairs=block_pairs) as sparse:
            sparse.stats = stats
            total = 2 * sparse.load(train, users, items)
            stats.update(chunks=total // 2, engine="sparse")
            for batch in sparse.results(counted=ticker("counting pairs"),
                                        ranked=ticker("ranking and storing")):
                yield batch, stats
        return
    with Miner(params, memory_limit=memory_limit, threads=threads,
               chunk_occurrences=chunk_occurrences) as miner:
        miner.stats = stats
        try:
            chunks = miner.load(train, users, items)
            total = chunks * (3 if params.score == "swing" else 2)
            miner.count_pairs(ticker("counting pairs"))
            if params.score == "swing":
                miner.swing(ticker("swing scores"))
            stats.update(chunks=chunks, engine="sql")
            for batch in miner.results(tick=ticker("ranking and storing")):
                yield batch, stats
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
