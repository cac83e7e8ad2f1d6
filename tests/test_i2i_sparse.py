"""Issue 18 (speed): the sparse-product I2I engine equals the SQL engine and the Python
reference; mine-i2i stores a run's pairs in one transaction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pytest
from tiny_data import (
    add_dataset,
    assert_close_pairs,
    mined_pairs,
    random_sequences,
    train_sequences,
)

from factory.errors import FactoryError
from factory.i2i import SPARSE_SCORES, MineParams, choose_engine, load_training, mine
from factory.i2i_reference import mine_reference
from factory.warehouse import Warehouse
from jobs.mine_i2i import run_mine


def _edge_sequences() -> dict[str, list[str]]:
    """Ties (identical users, so equal supports and scores broken by item_j), an item with a
    single user, a user left with one training item, and one long sequence (37 training
    items: every dyadic level, a ragged last group)."""
    seqs = {f"t{k}": ["a", "b", "c", "d", "x1", "x2"] for k in range(3)}
    seqs.update({f"r{k}": ["d", "c", "b", "a", "x1", "x2"] for k in range(2)})
    seqs["solo"] = ["a", "lonely", "c", "x1", "x2"]             # 'lonely' has one user
    seqs["short"] = ["b", "x1", "x2"]                           # one training item
    seqs["long"] = [f"l{k:02d}" for k in range(37)] + ["x1", "x2"]
    seqs["long2"] = [f"l{k:02d}" for k in range(36, -1, -3)] + ["a", "x1", "x2"]
    return seqs


@pytest.fixture()
def fixtures(wh: Warehouse) -> Warehouse:
    add_dataset(wh, "tiny", random_sequences())
    add_dataset(wh, "edge", _edge_sequences())
    return wh


CASES = [(True, 0, 2), (True, 3, 1), (False, 0, 1), (False, 4, 2), (True, 1, 1), (False, 2, 1)]


@pytest.mark.parametrize("dataset", ["tiny", "edge"])
@pytest.mark.parametrize("score", SPARSE_SCORES)
def test_sparse_engine_equals_sql_engine_and_reference(fixtures: Warehouse, dataset: str,
                                                       score: str) -> None:
    """Same pairs, supports, ranks and (bit for bit) scores as the SQL engine, in one block
    and in many; the reference agrees to 1e-9."""
    with fixtures.read() as con:
        train, users, items = load_training(con, dataset, "loo")
    seqs = train_sequences(fixtures, dataset)
    for directed, top_k, min_count in CASES:
        params = MineParams(score=score, directed=directed, top_k=top_k, min_count=min_count)
        sql = mined_pairs(train, users, items, params, "sql")
        assert sql, "the fixture must produce pairs"
        assert mined_pairs(train, users, items, params, "sparse") == sql, params
        assert mined_pairs(train, users, items, params, "sparse", chunk_occurrences=7) == sql
        assert_close_pairs(sql, sorted(mine_reference(seqs, params)))


def test_edge_fixture_has_ties_and_a_one_user_item(fixtures: Warehouse) -> None:
    with fixtures.read() as con:
        train, users, items = load_training(con, "edge", "loo")
    for directed in (True, False):
        rows = mined_pairs(train, users, items, MineParams(score="penalised", top_k=0, min_count=1,
                                                     directed=directed), "sparse")
        groups: dict[tuple, list[tuple]] = {}
        for r in rows:
            groups.setdefault((r[0], r[2], r[3]), []).append(r)
        ties = [g for g in groups.values() if len(g) > 1]
        assert ties, "the fixture must hold ties"
        for g in ties:                              # broken by item_j, ranks consecutive
            ranks = [r[4] for r in sorted(g, key=lambda r: r[1])]
            assert ranks == list(range(ranks[0], ranks[0] + len(g)))
        lonely = [r for r in rows if "lonely" in r[:2]]
        assert lonely and all(r[2] == 1 for r in lonely)
        assert not any("short" in r[:2] for r in rows)


def test_repeated_items_count_occurrence_pairs_in_both_engines() -> None:
    """A sequence that holds an item twice (ingest collapses these, mine() does not):
    both engines count pairs of occurrences, directed ones including (i, i)."""
    seq = {0: [0, 1, 0, 2, 1], 1: [1, 0, 2], 2: [2, 2, 0]}
    u = [k for k, s in seq.items() for _ in s]
    i = [x for s in seq.values() for x in s]
    p = [n for s in seq.values() for n in range(len(s))]
    train = pa.table({"u": pa.array(u, pa.int32()), "i": pa.array(i, pa.int32()),
                      "p": pa.array(p, pa.int32())})
    users = pa.table({"u": pa.array([0, 1, 2], pa.int32()), "user_id": ["u0", "u1", "u2"]})
    items = pa.table({"i": pa.array([0, 1, 2], pa.int32()), "item_id": ["a", "b", "c"]})
    for score in SPARSE_SCORES:
        for directed in (True, False):
            params = MineParams(score=score, directed=directed, top_k=0, min_count=1)
            sql = mined_pairs(train, users, items, params, "sql")
            assert mined_pairs(train, users, items, params, "sparse") == sql
            assert any(r[0] == r[1] for r in sql) == directed


@pytest.mark.parametrize("engine", ["sparse", "sql"])
def test_empty_log_and_no_pairs(engine: str) -> None:
    empty = pa.table({"u": pa.array([], pa.int32()), "i": pa.array([], pa.int32()),
                      "p": pa.array([], pa.int32())})
    users = pa.table({"u": pa.array([], pa.int32()), "user_id": pa.array([], pa.string())})
    items = pa.table({"i": pa.array([], pa.int32()), "item_id": pa.array([], pa.string())})
    with pytest.raises(FactoryError, match="no training sequence has two or more items"):
        list(mine(empty, users, items, MineParams(score="count"), engine=engine))
    # pairs exist but none reaches min_count: no rows, complete statistics
    train = pa.table({"u": pa.array([0, 0], pa.int32()), "i": pa.array([0, 1], pa.int32()),
                      "p": pa.array([0, 1], pa.int32())})
    items = pa.table({"i": pa.array([0, 1], pa.int32()), "item_id": ["a", "b"]})
    stats: dict = {}
    assert not [b for b, _ in mine(train, users, items, MineParams(score="count"),
                                   engine=engine, stats=stats) if b.num_rows]
    assert stats["pairs_before_top_k"] == 0 and stats["interactions"] == 2


def test_engine_choice(fixtures: Warehouse) -> None:
    with fixtures.read() as con:
        train, _, _ = load_training(con, "tiny", "loo")
    assert choose_engine(train, MineParams(), "2GB") == "sparse"
    assert choose_engine(train, MineParams(score="count", directed=False), "2GB") == "sparse"
    assert choose_engine(train, MineParams(window=3), "2GB") == "sql"
    assert choose_engine(train, MineParams(score="swing"), "2GB") == "sql"
    # a limit the sparse engine's block would not fit in: the SQL engine, which spills
    assert choose_engine(train, MineParams(), "1MB") == "sql"
    assert choose_engine(train, MineParams(), "not a size") == "sql"
    counts = run_mine(fixtures, "tiny", MineParams())
    assert counts["engine"] == "sparse" and counts["pairs"] > 0


def test_results_are_one_write_seen_all_or_nothing(fixtures: Warehouse,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Before issue 18 every result batch was its own transaction (49 on ML-1M), and the
    run's pairs sat in i2i_pairs_all before its i2i_runs row. Now: the run's start, then one
    transaction with its pairs, its i2i_runs row and its status. Between transactions a
    reader finds the run's pairs either absent, or all there and published."""
    seen: list[tuple[int, int]] = []
    original = Warehouse.write

    def look() -> None:
        with fixtures.read() as con:
            seen.append(con.execute(
                "select (select count(*) from i2i_pairs_all where dataset = 'tiny'),"
                " (select count(*) from i2i_runs where dataset = 'tiny')").fetchone())

    @contextmanager
    def counted(self: Warehouse, *args, **kwargs) -> Iterator:
        if self.path.exists():
            look()
        with original(self, *args, **kwargs) as con:
            yield con

    monkeypatch.setattr(Warehouse, "write", counted)
    # many blocks and batches: each used to be a transaction of its own
    monkeypatch.setattr("factory.i2i.SPARSE_BLOCK_PAIRS", 5)
    counts = run_mine(fixtures, "tiny", MineParams(top_k=0, min_count=1))
    look()
    assert counts["chunks"] > 3
    assert len(seen) == 3                           # start, the one write, the last look
    assert seen[-1] == (counts["pairs"], 1) and counts["pairs"] > 0
    assert all(pairs == 0 and runs == 0 for pairs, runs in seen[:-1])


def test_top_k_candidates_keep_every_row_top_k_under_rounding_ties() -> None:
    """The pruning before the exact sort keeps each row's true top k (by the 12-decimal
    score, then support, then item) even where raw scores differ below the rounding or
    float32 resolution, and in rows far longer than k."""
    import numpy as np

    from factory.i2i import SparseMiner

    rng = np.random.default_rng(5)
    miner = SparseMiner(MineParams(score="penalised"))
    for k in (1, 3, 10):
        n_rows = 40
        lengths = rng.integers(1, 400, n_rows)
        r = np.repeat(np.arange(n_rows), lengths)
        levels = rng.choice(np.array([0.25, 1 / 3, 2.0, 7.123456789012]), len(r))
        raw = levels + rng.choice([0.0, 4e-13, -4e-13, 1e-9, 3e-8], len(r))
        raw[rng.random(len(r)) < 0.05] *= -1                     # negative scores (pmi)
        support = rng.integers(1, 4, len(r))
        cand = SparseMiner._candidates(r, n_rows, raw, k)
        assert cand is not None and len(cand) < len(r)
        score = miner._round(raw)
        order = np.lexsort((np.arange(len(r)), -support, -score, r))
        rank = np.empty(len(r), dtype=np.int64)
        rank[order] = np.arange(len(r)) - (np.cumsum(lengths) - lengths)[r[order]]
        assert set(np.flatnonzero(rank < k)) <= set(cand.tolist())
    miner.__exit__()


def test_a_killed_runs_spool_is_swept_and_a_live_ones_kept(tmp_path) -> None:
    """kill -9 leaves a mine-i2i pair spool in the temporary directory; the next run
    removes it (the spool of a process still running is left alone)."""
    import os
    import subprocess
    import sys

    from jobs.mine_i2i import SPOOL_PREFIX, sweep_spools

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = tmp_path / f"{SPOOL_PREFIX}{gone.stdout.strip()}-abc"
    live = tmp_path / f"{SPOOL_PREFIX}{os.getpid()}-def"
    for spool in (dead, live):
        spool.mkdir()
        (spool / "pairs.parquet").write_bytes(b"x" * 1000)
    assert sweep_spools(tmp_path) == [dead]
    assert not dead.exists() and live.exists()
