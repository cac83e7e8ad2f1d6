"""Semantic IDs (residual k-means + disambiguation) and the I2I evaluation set."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from tiny_data import add_dataset, fake_model, random_sequences

from factory.embeddings import Embedder
from factory.errors import FactoryError
from factory.i2i import MineParams
from factory.warehouse import Warehouse
from jobs.i2i_eval import draw_candidates, export_jsonl, run_eval
from jobs.mine_i2i import pair_summary, run_mine
from jobs.sids import (
    balanced_assign,
    codebook_warning,
    disambiguate,
    level_stats,
    residual_kmeans,
    resolve_strict,
    row_sums,
    run_sids,
    sid_string,
)

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
    first = run_sids(tiny, "tiny", levels=2, codebook_size=4, collisions="extra-level")
    assert first["encoded"] == first["items"] == 25 and first["cache_hits"] == 0
    assert set(first["phase_seconds"]) == {"prepare", "embed", "kmeans", "collisions", "store"}
    with tiny.read() as con:
        rows = con.execute("select item_id, codes, sid from item_sids where dataset = 'tiny'"
                           ).fetchall()
        books = con.execute("select count(*) from sid_codebooks where run_id = ?",
                            [first["run_id"]]).fetchone()[0]
    assert len(rows) == 25 and books == 2 * 4
    assert len({sid for _, _, sid in rows}) == 25
    assert all(SID_RE.match(sid) and len(codes) == first["levels"] for _, codes, sid in rows)
    assert first["codes_used"][0] <= 4

    again = run_sids(tiny, "tiny", levels=2, codebook_size=4, collisions="extra-level")
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
    ({"levels": 2, "codebook_size": 4}, r"strict needs K\^L >= items: 4\^2 < 25"),
    ({"collisions": "suffix"}, "unknown --collisions 'suffix'"),
    ({"method": "euclidean", "balanced": True}, "--balanced needs the cosine quantiser"),
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
    run_sids(tiny, "tiny", levels=2, codebook_size=4, collisions="extra-level")
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


# --- issue 12: SIDs that spread, A.2's strict format, stats stored with the run -----------

STRICT_RE = re.compile(r"^<\|sid_begin\|><s_a_\d+><s_b_\d+><s_c_\d+><\|sid_end\|>$")


def _gauss(key: str, dim: int = 384) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).normal(size=dim)


def topic_encode(texts: list[str]) -> np.ndarray:
    """Sentence-embedding-like fake: a large component every text shares, one direction per
    category, an item-specific part from the title. It collapses the old quantiser as MiniLM
    did (ml-100k, 3x64: largest level-3 code 48% of items; 3x256: 81% at levels 2 and 3)."""
    out = []
    for text in texts:
        fields = dict(p.split(": ", 1) for p in text.split("; ") if ": " in p)
        cats = [c for c in fields.get("categories", "").split(", ") if c]
        v = (1.5 * _gauss("common") + sum(_gauss("cat:" + c) for c in cats) / max(len(cats), 1)
             ** 0.5 + 0.8 * _gauss("title:" + fields.get("title", text)))
        out.append(v / np.linalg.norm(v))
    return np.asarray(out, dtype=np.float32)


@pytest.fixture()
def topics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Embedder, "_encode", lambda self, texts: topic_encode(list(texts)))


def _stored(wh: Warehouse) -> tuple[list, dict]:
    with wh.read() as con:
        rows = con.execute("select item_id, codes, sid from item_sids where dataset = 'ml-100k'"
                           ).fetchall()
        run = con.execute("select n_levels, collisions, colliding_items, moved_items,"
                          " level_stats, collision_rate from sid_runs").fetchone()
    keys = ("n_levels", "collisions", "colliding_items", "moved_items", "level_stats",
            "collision_rate")
    return rows, dict(zip(keys, run, strict=True))


def test_ml100k_sids_spread_strict_and_stored(ml100k: Warehouse, topics: None) -> None:
    """ml-100k (1,349 items) at a catalogue-appropriate K=64: no level where one code holds
    more than 10% of items; A.2's 3 tokens, no two items share a SID; stats stored."""
    c = run_sids(ml100k, "ml-100k", levels=3, codebook_size=64)
    assert c["items"] == 1349 and c["warning"] is None
    shares = [st["largest_share"] for st in c["level_stats"]]
    assert max(shares) <= 0.10, shares
    assert c["collision_rate"] < 0.10
    assert all(st["perplexity"] > 32 for st in c["level_stats"])
    rows, run = _stored(ml100k)
    assert len(rows) == 1349 and len({sid for _, _, sid in rows}) == 1349
    assert all(STRICT_RE.match(sid) and len(codes) == 3 for _, codes, sid in rows)
    assert run["n_levels"] == 3 and run["collisions"] == "strict"
    assert run["colliding_items"] == c["collisions"] > 0 and run["moved_items"] > 0
    assert json.loads(run["level_stats"]) == c["level_stats"]


def test_ml100k_large_k_warns_and_still_spreads(ml100k: Warehouse, topics: None) -> None:
    """The issue's 3x256 on ml-100k: levels 2-3 held 60% / 80% of items; now none above 5%."""
    c = run_sids(ml100k, "ml-100k", levels=3, codebook_size=256)
    assert "K^2 = 65,536 >> items" in c["warning"] and "about 64 suits" in c["warning"]
    assert max(st["largest_share"] for st in c["level_stats"]) <= 0.05
    assert c["collision_rate"] < 0.05
    rows, _ = _stored(ml100k)
    assert len({sid for _, _, sid in rows}) == 1349
    assert all(STRICT_RE.match(sid) for _, _, sid in rows)


def test_ml100k_extra_level_and_balanced(ml100k: Warehouse, topics: None) -> None:
    c = run_sids(ml100k, "ml-100k", levels=3, codebook_size=64, collisions="extra-level",
                 balanced=True)
    cap = -(-1349 // 64)
    assert all(st["largest_share"] <= cap / 1349 for st in c["level_stats"])
    rows, run = _stored(ml100k)
    assert run["n_levels"] == 4 and run["collisions"] == "extra-level"
    assert len({sid for _, _, sid in rows}) == 1349
    assert all(len(codes) == 4 and "<s_d_" in sid for _, codes, sid in rows)


def test_old_quantiser_collapses_for_comparison(ml100k: Warehouse, topics: None) -> None:
    c = run_sids(ml100k, "ml-100k", levels=3, codebook_size=64, method="euclidean",
                 collisions="extra-level")
    assert max(st["largest_share"] for st in c["level_stats"]) > 0.3


def test_resolve_strict_nearest_free_code() -> None:
    last = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], dtype=np.float32)
    books = [np.zeros((4, 2), np.float32), last]
    codes = np.array([[0, 0], [0, 0], [0, 0], [1, 0]])
    residual = np.array([[0.1, 0.0], [0.9, 0.2], [0.2, 0.8], [0.0, 0.0]], dtype=np.float32)
    out, moved = resolve_strict(codes, books, residual)
    # item 0 is nearest its codeword and keeps code 0; 1 and 2 go to their nearest free code
    assert out.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0]] and moved == 2
    crowded = np.zeros((5, 2), dtype=np.int64)
    with pytest.raises(FactoryError, match="5 items share their first 1 codes"):
        resolve_strict(crowded, books, np.zeros((5, 2), np.float32))


def test_level_stats_balanced_assign_and_warning() -> None:
    codes = np.array([[0, 0], [0, 1], [1, 0], [1, 0]])
    st = level_stats(codes, 2)
    assert st[0] == {"level": 0, "used": 2, "of": 2, "largest_share": 0.5,
                     "entropy_bits": 1.0, "perplexity": 2.0, "prefix_collision_rate": 1.0}
    assert st[1]["largest_share"] == 0.75 and st[1]["prefix_collision_rate"] == 0.5
    sim = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.0], [0.7, 0.6]])
    assert balanced_assign(sim, 2).tolist() == [0, 0, 1, 1]
    assert codebook_warning(1349, 64) is None and codebook_warning(1349, 256)


def _add_at_sums(labels: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The summation k-means used before issue 18 (np.add.at), as the reference."""
    sums = np.zeros((k, rows.shape[1]), dtype=rows.dtype)
    np.add.at(sums, labels, rows)
    return sums


@pytest.mark.parametrize("n,d,k", [(60, 8, 5), (3000, 24, 64), (500, 16, 256), (1, 3, 4)])
def test_row_sums_equal_add_at_bit_for_bit(n: int, d: int, k: int) -> None:
    rng = np.random.default_rng(n)
    rows = rng.normal(size=(n, d))
    labels = rng.integers(0, max(k // 2, 1), n)          # half the codes stay unused
    for dtype in (np.float64, np.float32):
        got = row_sums(labels, rows.astype(dtype), k)
        want = _add_at_sums(labels, rows.astype(dtype), k)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("balanced", [False, True])
def test_faster_kmeans_gives_the_same_sids_for_a_seed(
        balanced: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18 changed only how k-means sums rows: codes, codebooks and residuals are the
    same, bit for bit, as with the np.add.at summation, so SIDs of earlier runs stay valid."""
    import jobs.sids

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(12, 32))
    x = (centres[rng.integers(0, 12, 900)] + 0.4 * rng.normal(size=(900, 32)))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    x[7] = x[8]                                           # a duplicate text
    new = residual_kmeans(x, 3, 16, seed=3, balanced=balanced)
    monkeypatch.setattr(jobs.sids, "row_sums", _add_at_sums)
    old = residual_kmeans(x, 3, 16, seed=3, balanced=balanced)
    assert np.array_equal(new[0], old[0])
    assert all(a.tobytes() == b.tobytes() for a, b in zip(new[1], old[1], strict=True))
    assert new[2].tobytes() == old[2].tobytes()
    assert np.array_equal(disambiguate(new[0], new[2])[0], disambiguate(old[0], old[2])[0])
    if not balanced:     # balanced codes leave too many items under one prefix for strict
        assert np.array_equal(resolve_strict(*new)[0], resolve_strict(*old)[0])
