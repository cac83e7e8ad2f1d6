"""I2I mining: SQL equals the Python reference, no leakage, runs and errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from tiny_data import add_dataset, random_sequences, train_sequences

from factory.errors import FactoryError
from factory.i2i import SCORES, MineParams, load_training, mine
from factory.i2i_reference import mine_reference
from factory.warehouse import Warehouse
from jobs.mine_i2i import pair_summary, run_mine

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def tiny(wh: Warehouse) -> Warehouse:
    add_dataset(wh, "tiny", random_sequences())
    return wh


def _sql_pairs(wh: Warehouse, params: MineParams, dataset: str = "tiny",
               chunk_occurrences: int = 10**9) -> list[tuple]:
    with wh.read() as con:
        train, users, items = load_training(con, dataset, params.split)
    batches = [b for b, _ in mine(train, users, items, params,
                                  chunk_occurrences=chunk_occurrences)]
    rows = pa.Table.from_batches(batches).to_pylist() if batches else []
    return sorted((r["item_i"], r["item_j"], r["support"], r["score"], r["rank"]) for r in rows)


def _close(a: list[tuple], b: list[tuple]) -> None:
    assert [r[:3] + r[4:] for r in a] == [r[:3] + r[4:] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x[3] == pytest.approx(y[3], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("window,directed,top_k,min_count", [
    (0, True, 0, 2), (1, True, 3, 1), (3, False, 0, 1), (0, False, 4, 2),
])
def test_sql_matches_python_reference(tiny: Warehouse, score: str, window: int,
                                      directed: bool, top_k: int, min_count: int) -> None:
    params = MineParams(score=score, window=window, directed=directed, top_k=top_k,
                        min_count=min_count, swing_max_users=6)
    expected = sorted(mine_reference(train_sequences(tiny, "tiny"), params))
    assert expected, "the fixture must produce pairs"
    _close(_sql_pairs(tiny, params), expected)
    # many small chunks give the same answer as one
    _close(_sql_pairs(tiny, params, chunk_occurrences=40), expected)


def test_held_out_targets_never_contribute(wh: Warehouse) -> None:
    """Two datasets with identical train parts but different valid/test items mine the same
    pairs and scores, for every score; held-out-only items appear in no pair."""
    seqs = random_sequences(seed=3, users=30, items=15)
    a = {u: s + ["heldA1", "heldA2"] for u, s in seqs.items()}
    b = {u: s + [f"heldB{u}", "heldB"] for u, s in seqs.items()}
    add_dataset(wh, "a", a)
    add_dataset(wh, "b", b)
    assert train_sequences(wh, "a") == train_sequences(wh, "b")
    for score in SCORES:
        params = MineParams(score=score, min_count=1, top_k=0, swing_max_users=5)
        got_a, got_b = _sql_pairs(wh, params, "a"), _sql_pairs(wh, params, "b")
        assert got_a == got_b
        assert not any(x.startswith("held") for row in got_a for x in row[:2])
        _close(got_a, sorted(mine_reference(seqs, params)))
    counts = run_mine(wh, "a", MineParams(min_count=1, top_k=0))
    assert counts["interactions"] == sum(len(s) for s in seqs.values())
    assert counts["co_occurrences"] == sum(len(s) * (len(s) - 1) // 2 for s in seqs.values())


def test_runs_latest_view_and_idempotent_rerun(ml100k: Warehouse) -> None:
    first = run_mine(ml100k, "ml-100k", MineParams(window=2))
    with ml100k.read() as con:
        n_first = con.execute("select count(*) from i2i_pairs where dataset = 'ml-100k'"
                              ).fetchone()[0]
        assert n_first == first["pairs"] > 0
        assert con.execute("select max(rank), min(support) from i2i_pairs").fetchone() == (10, 2)
    again = run_mine(ml100k, "ml-100k", MineParams(window=2))
    assert again["replaced_runs"] == [first["run_id"]]
    other = run_mine(ml100k, "ml-100k", MineParams(window=1, score="count", top_k=3))
    with ml100k.read() as con:
        assert con.execute("select count(*) from i2i_runs").fetchone()[0] == 2
        latest = con.execute("select distinct run_id, score_kind from i2i_pairs"
                             " where dataset = 'ml-100k'").fetchall()
        assert latest == [(other["run_id"], "count")]
        by_run = dict(con.execute("select run_id, count(*) from i2i_pairs_all group by 1"
                                  ).fetchall())
        assert by_run == {again["run_id"]: n_first, other["run_id"]: other["pairs"]}
        statuses = con.execute("select status, count(*) from job_runs where job = 'mine-i2i'"
                               " group by 1").fetchall()
        assert statuses == [("succeeded", 3)]
        rows = pair_summary(con, other["run_id"])
    assert rows["pairs"] == other["pairs"]
    assert "same first SID code" not in rows


def test_failed_run_is_recorded_and_leaves_no_pairs(wh: Warehouse) -> None:
    add_dataset(wh, "single", {f"u{k}": [f"i{k}"] for k in range(5)})
    with pytest.raises(FactoryError, match="no training sequence has two or more items"):
        run_mine(wh, "single", MineParams())
    with wh.read() as con:
        assert con.execute("select status, error from job_runs where job = 'mine-i2i'"
                           ).fetchall()[0][0] == "failed"
        assert con.execute("select count(*) from i2i_pairs_all").fetchone()[0] == 0


@pytest.mark.parametrize("dataset,params,message", [
    ("nope", MineParams(), "unknown dataset 'nope'"),
    ("tiny", MineParams(split="later"), "unknown split 'later'"),
    ("tiny", MineParams(score="jaccard"), "unknown score 'jaccard'"),
    ("tiny", MineParams(window=-1), "--window"),
    ("tiny", MineParams(min_count=0), "--min-count"),
])
def test_bad_input(tiny: Warehouse, dataset: str, params: MineParams, message: str) -> None:
    with pytest.raises(FactoryError, match=message):
        run_mine(tiny, dataset, params)


def test_cli_error_is_one_line(tiny: Warehouse) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "factory", "--warehouse", str(tiny.path), "mine-i2i",
         "--dataset", "tiny", "--split", "temporal"],
        capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT),
                                                      "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: unknown split 'temporal' for dataset 'tiny' "
                                   "(known: loo)")


def test_out_of_memory_is_one_line_naming_the_option_and_keeps_what_was_stored(
        ml100k: Warehouse) -> None:
    kept = run_mine(ml100k, "ml-100k", MineParams())
    proc = subprocess.run(
        [sys.executable, "-m", "factory", "--warehouse", str(ml100k.path), "mine-i2i",
         "--dataset", "ml-100k", "--window", "3", "--memory-limit", "1MB"],
        capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT),
                                                      "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert line.startswith("error: mining ran out of memory at --memory-limit 1MB (")
    assert line.endswith("raise --memory-limit or lower --threads")
    assert "\n" not in line and "SET memory_limit" not in line
    with ml100k.read() as con:
        runs = con.execute("select status, error from job_runs where job = 'mine-i2i'"
                           " order by started_at").fetchall()
        pairs = con.execute("select run_id, count(*) from i2i_pairs_all group by run_id"
                            ).fetchall()
    assert runs[0] == ("succeeded", None)
    assert runs[1][0] == "failed" and runs[1][1] == line.removeprefix("error: ")
    assert pairs == [(kept["run_id"], kept["pairs"])]
