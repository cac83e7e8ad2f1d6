"""Semantic IDs (residual k-means + disambiguation) and the I2I evaluation set."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from tiny_data import add_dataset, fake_model, random_sequences

from factory.errors import FactoryError
from factory.i2i import MineParams
from factory.warehouse import Warehouse
from jobs.i2i_eval import draw_candidates, export_jsonl, run_eval
from jobs.mine_i2i import pair_summary, run_mine
from jobs.sids import disambiguate, residual_kmeans, run_sids, sid_string

SID_RE = re.compile(r"^<\|sid_begin\|>(<s_[a-z]_\d+>)+<\|sid_end\|>$")


@pytest.fixture()
def tiny(wh: Warehouse) -> Warehouse:
    add_dataset(wh, "tiny", random_sequences())
    return wh


def test_sid_format() -> None:
    assert sid_string([12, 4, 200]) == "<|sid_begin|><s_a_12><s_b_4><s_c_200><|sid_end|>"
    assert sid_string([1, 2, 3, 0]).endswith("<s_c_3><s_d_0><|sid_end|>")


def test_residual_kmeans_and_disambiguation() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    x[10] = x[11] = x[12]                      # identical texts must still get distinct SIDs
    codes, books, residual = residual_kmeans(x, levels=2, k=5, seed=0)
    assert codes.shape == (60, 2) and len(books) == 2 and books[0].shape == (5, 8)
    np.testing.assert_allclose(books[0][codes[:, 0]] + books[1][codes[:, 1]] + residual, x,
                               atol=1e-5)
    full, colliding = disambiguate(codes, residual)
    assert colliding >= 3 and full.shape == (60, 3)
    assert len({tuple(c) for c in full}) == 60
    groups: dict[tuple, list[int]] = {}
    for c in full:
        groups.setdefault(tuple(c[:2]), []).append(int(c[2]))
    assert all(sorted(v) == list(range(len(v))) for v in groups.values())
    unique = np.arange(10).reshape(5, 2)
    assert disambiguate(unique, np.zeros((5, 3)))[1] == 0


def test_sids_job_store_cache_and_rerun(tiny: Warehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_model(monkeypatch)
    first = run_sids(tiny, "tiny", levels=2, codebook_size=4)
    assert first["encoded"] == first["items"] == 25 and first["cache_hits"] == 0
    with tiny.read() as con:
        rows = con.execute("select item_id, codes, sid from item_sids where dataset = 'tiny'"
                           ).fetchall()
        books = con.execute("select count(*) from sid_codebooks where run_id = ?",
                            [first["run_id"]]).fetchone()[0]
    assert len(rows) == 25 and books == 2 * 4
    assert len({sid for _, _, sid in rows}) == 25
    assert all(SID_RE.match(sid) and len(codes) == first["levels"] for _, codes, sid in rows)
    assert first["codes_used"][0] <= 4

    again = run_sids(tiny, "tiny", levels=2, codebook_size=4)
    assert again["cache_hits"] == 25 and again["encoded"] == 0
    assert again["replaced_runs"] == [first["run_id"]]
    with tiny.read() as con:
        assert con.execute("select count(*) from item_sids_all").fetchone()[0] == 25
        assert con.execute("select count(*) from sid_runs").fetchone()[0] == 1

    mined = run_mine(tiny, "tiny", MineParams(min_count=1))
    with tiny.read() as con:
        summary = pair_summary(con, mined["run_id"])
        expect = con.execute(
            "select avg((a.codes[1] = b.codes[1])::double) from i2i_pairs p"
            " join item_sids a on a.item_id = p.item_i join item_sids b on b.item_id = p.item_j"
        ).fetchone()[0]
    assert summary["same first SID code"] == f"{expect:.2%}"


@pytest.mark.parametrize("kwargs,message", [
    ({"codebook_size": 26}, "--codebook-size 26 is larger than the 25 items of 'tiny'"),
    ({"levels": 0}, "--levels must be between"),
    ({"fields": ["title", "plot"]}, "unknown text field"),
])
def test_sids_bad_input(tiny: Warehouse, kwargs: dict, message: str) -> None:
    with pytest.raises(FactoryError, match=message):
        run_sids(tiny, "tiny", **kwargs)


def test_sids_unknown_dataset(tiny: Warehouse) -> None:
    with pytest.raises(FactoryError, match="unknown dataset 'other'"):
        run_sids(tiny, "other")


def test_draw_candidates() -> None:
    n_items = 12
    pi = np.array([0, 1, 2, 3] * 50)
    pj = np.array([1, 0, 3, 11] * 50)
    cands, answer = draw_candidates(pi, pj, n_items, 9, seed=5)
    assert cands.shape == (200, 10)
    assert (cands[np.arange(200), answer] == pj).all()
    for row, i, j, a in zip(cands, pi, pj, answer, strict=True):
        negs = np.delete(row, a)
        assert len(set(negs)) == 9 and i not in negs and j not in negs
    again = draw_candidates(pi, pj, n_items, 9, seed=5)
    np.testing.assert_array_equal(cands, again[0])
    assert len(set(answer)) == 10                      # the answer's position varies


def test_i2i_eval_store_and_export(tiny: Warehouse, monkeypatch: pytest.MonkeyPatch,
                                   tmp_path) -> None:
    fake_model(monkeypatch)
    with pytest.raises(FactoryError, match="no I2I pairs for 'tiny'"):
        run_eval(tiny, "tiny")
    mined = run_mine(tiny, "tiny", MineParams(min_count=1, top_k=3))
    first = run_eval(tiny, "tiny", seed=1)
    assert first["sets"] == mined["pairs"] and first["i2i_run"] == mined["run_id"]
    out = tmp_path / "eval.jsonl"
    assert export_jsonl(tiny, first["run_id"], out) == mined["pairs"]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    for r in recs:
        assert len(r["candidates"]) == 10 and r["candidates"][r["answer_index"]] == r["item_j"]
        assert r["item_i"] not in r["candidates"]
        assert r["candidate_titles"][r["answer_index"]] == f"Movie {r['item_j']}"
        assert "sid_i" not in r
    run_sids(tiny, "tiny", levels=2, codebook_size=4)
    again = run_eval(tiny, "tiny", seed=1)
    assert again["replaced_runs"] == [first["run_id"]]
    export_jsonl(tiny, again["run_id"], out)
    recs2 = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["candidates"] for r in recs2] == [r["candidates"] for r in recs]   # seeded
    assert all(SID_RE.match(r["sid_i"]) and len(r["candidate_sids"]) == 10 for r in recs2)
    small = run_eval(tiny, "tiny", seed=1, max_pairs=5)
    assert small["sets"] == 5
    with tiny.read() as con:
        assert con.execute("select count(*) from i2i_eval_sets").fetchone()[0] == (
            mined["pairs"] + 5)
    with pytest.raises(FactoryError, match="need at least 26"):
        run_eval(tiny, "tiny", distractors=24)


@pytest.mark.slow
def test_sids_with_real_encoder(tiny: Warehouse) -> None:
    result = run_sids(tiny, "tiny", levels=2, codebook_size=8)
    assert result["items"] == 25 and result["encoded"] == 25
    with tiny.read() as con:
        enc = con.execute("select encoder from sid_runs").fetchone()[0]
        assert enc.startswith("all-MiniLM-L6-v2#")
        assert con.execute("select count(distinct sid) from item_sids").fetchone()[0] == 25
