"""TwiSTAR's second stage as data: `factory twistar candidates | hard-samples | planner-labels`,
`export sft --kind twistar-ranker | twistar-planner`, `export rl --kind twistar-slow`.

Candidates are a hand-written Parquet file on the ml-100k fixture: each sequence's target sits
at a rank fixed by a hash of its user (or is absent), so every path and hard sample is known.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from factory.errors import FactoryError
from factory.twistar.rewards import parse_tool_calls, slow_reward, valid_tool_sequence
from factory.twistar.stage2 import label_json
from factory.warehouse import Warehouse

K = 50


def hand_rank(part: str, user: str) -> int | None:
    """The target's 1-based rank in the hand-built list, or None (absent): about a sixth of
    the sequences at each of 1-10, 11-50 and absent... by a stable hash."""
    r = int(hashlib.md5(f"{part}/{user}".encode()).hexdigest()[:8], 16) % 80 + 1
    return r if r <= K else None


def write_candidates(wh: Warehouse, path: Path, *, parts: tuple[str, ...] = (
        "train", "valid", "test"), shift: int = 0) -> list[dict]:
    """One row per (part, user) of the loo split: K distinct catalogue items with the target
    at hand_rank (the rest: items the user never interacts with, in a per-user order)."""
    with wh.read() as con:
        targets = con.execute(
            "select part, user_id, item_id from split_interactions where dataset = 'ml-100k'"
            " and split = 'loo' qualify row_number() over (partition by part, user_id order"
            " by case when part = 'train' then -position else position end) = 1"
            " order by part, user_id").fetchall()
        seen = {}
        for user, item in con.execute("select user_id, item_id from interactions"
                                      " where dataset = 'ml-100k'").fetchall():
            seen.setdefault(user, set()).add(item)
        catalogue = [i for (i,) in con.execute("select item_id from items where dataset ="
                                               " 'ml-100k' order by item_id").fetchall()]
    rows = []
    for n, (part, user, target) in enumerate(targets):
        if part not in parts:
            continue
        start = (n * 7 + shift) % len(catalogue)
        others = [i for i in catalogue[start:] + catalogue[:start] if i not in seen[user]]
        items = others[:K]
        rank = hand_rank(part, user)
        if rank is not None:
            items = items[:K - 1]
            items.insert(rank - 1, target)
        rows.append({"part": part, "row": n, "user_id": user, "target_item_id": target,
                     "item_ids": items, "scores": [float(K - k) for k in range(K)]})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def cli(wh: Warehouse, *args: str):
    from factory.cli import app

    return CliRunner().invoke(app, ["--warehouse", str(wh.path), *args])


def ok(wh: Warehouse, *args: str) -> str:
    res = cli(wh, *args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


def fails(wh: Warehouse, *args: str) -> str:
    res = cli(wh, *args)
    assert res.exit_code != 0
    assert isinstance(res.exception, FactoryError), res.exception
    text = str(res.exception)
    assert "\n" not in text
    return text


def q(wh: Warehouse, sql: str, *params) -> list[tuple]:
    with wh.read() as con:
        return con.execute(sql, list(params)).fetchall()


@pytest.fixture(scope="module")
def base(ml100k_warehouse: Path, tmp_path_factory: pytest.TempPathFactory):
    """ml-100k with a SID run and hand-built candidates (trained on train) imported."""
    from tiny_data import fake_model

    from jobs.sids import run_sids

    tmp = tmp_path_factory.mktemp("twistar2")
    path = tmp / "factory.duckdb"
    shutil.copy(ml100k_warehouse, path)
    wh = Warehouse(path)
    with pytest.MonkeyPatch.context() as mp:
        fake_model(mp)
        run_sids(wh, "ml-100k", levels=3, codebook_size=8, collisions="extra-level")
    rows = write_candidates(wh, tmp / "cands.parquet")
    out = ok(wh, "twistar", "candidates", "--dataset", "ml-100k", "--from-file",
             str(tmp / "cands.parquet"), "--trained-on", "train", "--model", "hand")
    return wh, tmp, rows, out


@pytest.fixture()
def wh(base, tmp_path: Path) -> Warehouse:
    """A private copy of the base warehouse."""
    path = tmp_path / "factory.duckdb"
    shutil.copy(base[0].path, path)
    return Warehouse(path)


# -- candidates ------------------------------------------------------------------------------
def test_candidates_are_stored_with_their_source_and_recall(base):
    wh, tmp, rows, out = base
    assert "Recall@10" in out and "look: factory sql" in out
    stored = {(p, u): (t, r, items) for p, u, t, r, items in q(
        wh, "select part, user_id, target_item_id, hit_rank, item_ids from twistar_candidates"
            " where dataset = 'ml-100k' and source_kind = 'file'")}
    assert len(stored) == len(rows)
    for r in rows:
        target, rank, items = stored[(r["part"], r["user_id"])]
        assert (target, rank, items) == (r["target_item_id"], hand_rank(r["part"],
                                                                        r["user_id"]),
                                         r["item_ids"])
    (sets,) = q(wh, "select source_kind, sha256, trained_on, model, k, split from"
                    " twistar_candidate_sets where dataset = 'ml-100k'")
    sha = hashlib.sha256((tmp / "cands.parquet").read_bytes()).hexdigest()
    assert sets == ("file", sha, "train", "hand", K, "loo")
    # Recall@10 per part in the summary equals the share of hand ranks <= 10
    valid = [r for r in rows if r["part"] == "valid"]
    r10 = sum((hand_rank("valid", r["user_id"]) or 99) <= 10 for r in valid) / len(valid)
    assert f"Recall@10 {r10:.4f}" in out, out


@pytest.mark.parametrize("change, message", [
    (lambda rows: rows[3]["item_ids"].__setitem__(5, "no-such-item"),
     r"row 4: item 'no-such-item' \(rank 6\) is not in ml-100k's catalogue"),
    (lambda rows: [(r["item_ids"].pop(), r["scores"].pop()) for r in rows[10:13]],
     r"3 of \d[\d,]* rows have fewer than K = 50 items \(first: row 11, 49 items\)"),
    (lambda rows: rows.append(dict(rows[0])), r"row \d[\d,]*: a second row for part"),
    (lambda rows: rows[2].__setitem__("part", "dev"), r"row 3: part 'dev' is not train"),
    (lambda rows: rows[1].__setitem__("target_item_id", "1"), r"row 2: user .* target"),
])
def test_a_bad_candidates_file_is_one_line_and_stores_nothing(wh, base, tmp_path, change,
                                                              message):
    rows = [dict(r, item_ids=list(r["item_ids"]), scores=list(r["scores"])) for r in base[2]]
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    before = q(wh, "select count(*), sum(hash(item_ids)) from twistar_candidates")
    sets = q(wh, "select * from twistar_candidate_sets")
    text = fails(wh, "twistar", "candidates", "--dataset", "ml-100k", "--from-file",
                 str(tmp_path / "bad.parquet"), "--trained-on", "train")
    assert __import__("re").search(message, text), text
    assert q(wh, "select count(*), sum(hash(item_ids)) from twistar_candidates") == before
    assert q(wh, "select * from twistar_candidate_sets") == sets
    assert q(wh, "select status from job_runs where job = 'twistar-candidates'"
                 " order by started_at desc limit 1") == [("failed",)]


def test_from_file_needs_trained_on_and_one_source(wh, base):
    text = fails(wh, "twistar", "candidates", "--dataset", "ml-100k", "--from-file",
                 str(base[1] / "cands.parquet"))
    assert "--trained-on train|none" in text
    assert "one of" in fails(wh, "twistar", "candidates", "--dataset", "ml-100k")


def test_reimport_replaces_the_same_source_kind_atomically(wh, base, tmp_path):
    rows = write_candidates(wh, tmp_path / "b.parquet", parts=("valid", "test"), shift=3)
    out = ok(wh, "twistar", "candidates", "--dataset", "ml-100k", "--from-file",
             str(tmp_path / "b.parquet"), "--trained-on", "none")
    assert q(wh, "select count(*) from twistar_candidates") == [(len(rows),)]
    # a file that ranks only some sequences is stored and said to
    n_train = q(wh, "select count(distinct user_id) from split_interactions where dataset ="
                    " 'ml-100k' and split = 'loo' and part = 'train'")[0][0]
    assert f"train: 0 of {n_train:,} sequences (none in the candidates)" in out
    assert q(wh, "select count(*), any_value(trained_on) from twistar_candidate_sets") == [
        (1, "none")]
    got = {(p, u): i for p, u, i in q(wh, "select part, user_id, item_ids from"
                                          " twistar_candidates")}
    assert all(got[(r["part"], r["user_id"])] == r["item_ids"] for r in rows)


# -- hard samples ----------------------------------------------------------------------------
def test_hard_sample_counts_equal_a_duckdb_count(wh, base):
    out = ok(wh, "twistar", "hard-samples", "--dataset", "ml-100k", "--k2", "30")
    expect = dict(q(wh, "select part, count(*) filter (where hit_rank is null or hit_rank >"
                        " 30) from twistar_candidates group by 1"))
    assert dict(q(wh, "select part, count(*) from twistar_hard_samples group by 1")) == expect
    hand = {p: sum(1 for r in base[2] if r["part"] == p
                   and (hand_rank(p, r["user_id"]) or 99) > 30) for p in expect}
    assert hand == expect
    total = dict(q(wh, "select part, count(*) from twistar_candidates group by 1"))
    assert f"train hard: {expect['train']:,} of {total['train']:,}" in out
    assert "MovieLens genres" in out and "(6.4)" in out
    counts = json.loads(q(wh, "select counts from job_runs where job ="
                              " 'twistar-hard-samples'")[0][0])
    cats = counts["categories"]["valid"]
    assert sum(c["sequences"] for c in cats.values()) == total["valid"]


# -- planner labels --------------------------------------------------------------------------
def _labels(wh: Warehouse) -> list[tuple]:
    return q(wh, "select part, user_id, hit_rank, original_path, path, flipped, label"
                 " from twistar_planner_labels order by part, user_id")


def test_paths_follow_the_hit_rank_on_a_hand_built_table(wh, base):
    ok(wh, "twistar", "planner-labels", "--dataset", "ml-100k", "--k1", "10", "--k2", "50",
       "--flip", "0", "--parts", "valid,test")
    labels = _labels(wh)
    assert {p for p, *_ in labels} == {"valid", "test"}
    assert len(labels) == sum(r["part"] != "train" for r in base[2])
    for part, user, rank, orig, path, flipped, label in labels:
        hand = hand_rank(part, user)
        want = 1 if hand and hand <= 10 else 2 if hand else 3
        assert (rank, orig, path, flipped) == (hand, want, want, False)
        assert label == label_json(want, 10, 50)
        calls = parse_tool_calls(label)
        assert valid_tool_sequence(calls)
        assert calls == [(c["name"], tuple(c["arguments"].values()))
                         for c in json.loads(label)["tool_calls"]]
    assert label_json(2, 10, 50).count("rank_candidates(50, 10)") == 1


def test_flip_share_is_the_rate_reproducible_and_seeded(wh):
    import math

    ok(wh, "twistar", "planner-labels", "--dataset", "ml-100k", "--flip", "0.2",
       "--seed", "0", "--parts", "valid,test")
    a = _labels(wh)
    path1 = [r for r in a if r[3] == 1]
    flipped = [r for r in path1 if r[5]]
    n = len(path1)
    assert n > 100
    assert abs(len(flipped) / n - 0.2) < 3 * math.sqrt(0.2 * 0.8 / n)
    assert all(r[4] in (2, 3) for r in flipped) and {r[4] for r in flipped} == {2, 3}
    assert all(r[4] == r[3] for r in a if not r[5])
    ok(wh, "twistar", "planner-labels", "--dataset", "ml-100k", "--flip", "0.2",
       "--seed", "0", "--parts", "valid,test")
    assert _labels(wh) == a
    ok(wh, "twistar", "planner-labels", "--dataset", "ml-100k", "--flip", "0.2",
       "--seed", "1", "--parts", "valid,test")
    assert _labels(wh) != a


def test_planner_labels_refuse_the_parts_the_model_trained_on(wh, base, tmp_path):
    text = fails(wh, "twistar", "planner-labels", "--dataset", "ml-100k", "--parts",
                 "train,valid")
    assert "--parts train" in text and "trained on the train part" in text
    assert q(wh, "select count(*) from twistar_planner_labels") == [(0,)]
    ok(wh, "twistar", "planner-labels", "--dataset", "ml-100k")          # default: valid
    assert q(wh, "select distinct part, trained_on from twistar_planner_labels") == [
        ("valid", "train")]
    # a model that trained on nothing of the split may label train too (its default)
    write_candidates(wh, tmp_path / "none.parquet")
    ok(wh, "twistar", "candidates", "--dataset", "ml-100k", "--from-file",
       str(tmp_path / "none.parquet"), "--trained-on", "none")
    ok(wh, "twistar", "planner-labels", "--dataset", "ml-100k")
    assert q(wh, "select distinct part from twistar_planner_labels order by 1") == [
        ("train",), ("valid",)]


def test_planner_sft_export_keeps_test_out_of_train(wh, tmp_path):
    ok(wh, "twistar", "planner-labels", "--dataset", "ml-100k", "--parts", "valid,test")
    ok(wh, "export", "sft", "--dataset", "ml-100k", "--kind", "twistar-planner",
       "--format", "parquet", "--out", str(tmp_path / "p.parquet"))
    files = {p: pq.read_table(tmp_path / f"p.{p}.parquet").to_pylist()
             for p in ("train", "valid", "test")}
    labels = {(p, u): (path, label) for p, u, _, _, path, _, label in _labels(wh)}
    test_users = {u for p, u in labels if p == "test"}
    assert files["train"] and files["valid"] and files["test"]
    for part, rows in files.items():
        for r in rows:
            user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
            src = "test" if part == "test" else "valid"
            assert (r["sample_index"], answer) == labels[(src, r["user_id"])]
            assert "fast_rec(k)" in user and "oldest first" in user
    assert len(files["test"]) == len(test_users)
    manifest = json.loads((tmp_path / "p.manifest.json").read_text())
    assert manifest["notes"]["trained_on"] == "train"
    assert manifest["notes"]["candidates"]["source_kind"] == "file"
    # chat JSONL: messages only
    ok(wh, "export", "sft", "--dataset", "ml-100k", "--kind", "twistar-planner",
       "--out", str(tmp_path / "c.jsonl"))
    first = json.loads((tmp_path / "c.train.jsonl").read_text().splitlines()[0])
    assert list(first) == ["messages"]


# -- ranker ----------------------------------------------------------------------------------
def test_ranker_rows_one_positive_and_k1_minus_1_retrieved_negatives(wh, base, tmp_path):
    ok(wh, "export", "sft", "--dataset", "ml-100k", "--kind", "twistar-ranker", "--k1", "10",
       "--k2", "50", "--format", "parquet", "--out", str(tmp_path / "r.parquet"))
    lists = {(r["part"], r["user_id"]): r for r in base[2]}
    later = {}
    for user, part, item in q(wh, "select user_id, part, item_id from split_interactions"
                                  " where dataset = 'ml-100k' and split = 'loo'"):
        later.setdefault(user, []).append((part, item))
    held_out = {(u, i) for u, xs in later.items() for p, i in xs if p != "train"}
    for part in ("train", "valid", "test"):
        rows = pq.read_table(tmp_path / f"r.{part}.parquet").to_pylist()
        by_seq: dict = {}
        for r in rows:
            by_seq.setdefault(r["user_id"], []).append(r)
        assert len(by_seq) == sum(1 for p, _ in lists if p == part)
        for user, seq in by_seq.items():
            src = lists[(part, user)]
            pos = [r for r in seq if r["label"] == 1]
            neg = [r["item_id"] for r in seq if r["label"] == 0]
            assert len(pos) == 1 and pos[0]["item_id"] == src["target_item_id"]
            rank = hand_rank(part, user)
            assert pos[0]["fast_rank"] == rank and all(r["retrieved"] is (rank is not None)
                                                       for r in seq)
            assert len(neg) == 9 == len(set(neg))
            assert set(neg) <= set(src["item_ids"][:50]) - {src["target_item_id"]}
            assert src["target_item_id"] not in seq[0]["history"]
            if part == "train":      # no valid/test target anywhere in a training file
                assert not any((user, i) in held_out for i in neg + seq[0]["history"]
                               + [pos[0]["item_id"]])
    # seeded: the same seed gives the same bytes
    ok(wh, "export", "sft", "--dataset", "ml-100k", "--kind", "twistar-ranker",
       "--format", "parquet", "--out", str(tmp_path / "s.parquet"))
    assert (tmp_path / "s.valid.parquet").read_bytes() == \
        (tmp_path / "r.valid.parquet").read_bytes()


# -- M_slow's GRPO prompts -------------------------------------------------------------------
def test_rl_export_loads_with_datasets_and_feeds_slow_reward_as_trl_does(wh, tmp_path):
    import datasets

    ok(wh, "twistar", "hard-samples", "--dataset", "ml-100k")
    ok(wh, "export", "rl", "--dataset", "ml-100k", "--kind", "twistar-slow",
       "--out", str(tmp_path / "slow.parquet"))
    hard = dict(q(wh, "select part, count(*) from twistar_hard_samples group by 1"))
    ds = datasets.load_dataset("parquet", data_files={
        p: str(tmp_path / f"slow.{p}.parquet") for p in ("train", "valid", "test")})
    assert {p: len(ds[p]) for p in ds} == hard
    sids = dict(q(wh, "select item_id, sid from item_sids"))
    train = ds["train"]
    held_out = {(u, i) for u, i in q(wh, "select user_id, item_id from split_interactions"
                                         " where dataset = 'ml-100k' and part <> 'train'")}
    for ex in train:
        assert ex["prompt"][0]["role"] == "user" and len(ex["prompt"]) == 1
        assert ex["reference_sid"] == sids[ex["target_item_id"]]
        assert (ex["user_id"], ex["target_item_id"]) not in held_out
        assert not any(sids[i] in ex["prompt"][0]["content"]
                       for u, i in held_out if u == ex["user_id"])
    # TRL GRPOTrainer._calculate_rewards: every column but prompt/completion as a list
    batch = [train[k] for k in range(4)]
    completions = [[{"role": "assistant", "content": "<think>the user keeps watching dramas"
                     f"</think>{ex['reference_sid']}"}] for ex in batch[:2]] + \
        [[{"role": "assistant", "content": "no idea"}]] * 2
    keys = [k for k in batch[0] if k not in ("prompt", "completion", "completion_ids")]
    kwargs = {k: [ex[k] for ex in batch] for k in keys}
    rewards = slow_reward(prompts=[ex["prompt"] for ex in batch], completions=completions,
                          completion_ids=[[1]] * 4, **kwargs, trainer_state=None,
                          log_extra=None, log_metric=None)
    assert rewards == [1 + 1 + 5 * 5.0] * 2 + [-1 - 1 + 0.0] * 2
    manifest = json.loads((tmp_path / "slow.manifest.json").read_text())
    assert manifest["counts"] == hard and manifest["notes"]["k2"] == 50


def test_steps_name_what_to_run_first(ml100k):
    for args, hint in (
            (("twistar", "hard-samples"), "twistar candidates"),
            (("twistar", "planner-labels"), "twistar candidates"),
            (("export", "rl", "--kind", "twistar-slow"), "twistar hard-samples")):
        assert hint in fails(ml100k, *args, "--dataset", "ml-100k")


# -- one real M_fast: factory train --predict -------------------------------------------------
def test_from_a_train_run(wh):
    ok(wh, "export", "cache", "--dataset", "ml-100k", "--history", "10")
    ok(wh, "train", "--dataset", "ml-100k", "--backbone", "sasrec", "--epochs", "1", "--dim", "16",
       "--predict", "--top-k", "50")
    out = ok(wh, "twistar", "candidates", "--dataset", "ml-100k", "--from-train", "latest")
    assert "trained on train" in out
    (kind, model, trained_on, k) = q(wh, "select source_kind, model, trained_on, k from"
                                         " twistar_candidate_sets where source_kind = 'train'")[0]
    assert (kind, model, trained_on, k) == ("train", "sasrec", "train", 50)
    path = q(wh, "select path from twistar_candidate_sets where source_kind = 'train'")[0][0]
    want = duckdb.sql(f"select part, count(*) from '{path}' group by 1 order by 1").fetchall()
    assert q(wh, "select part, count(*) from twistar_candidates where source_kind = 'train'"
                 " group by 1 order by 1") == want
    text = fails(wh, "twistar", "planner-labels", "--dataset", "ml-100k", "--source",
                 "train", "--parts", "train")
    assert "trained on the train part" in text


def test_replaced_candidates_take_what_was_derived_from_them(wh, base, tmp_path):
    """Hard samples and planner labels of one M_fast are never exported under another's name
    (a review found the planner file of a replaced model byte-identical after the swap)."""
    ok(wh, "twistar", "hard-samples", "--dataset", "ml-100k")
    ok(wh, "twistar", "planner-labels", "--dataset", "ml-100k")
    hard = q(wh, "select count(*) from twistar_hard_samples")[0][0]
    labels = q(wh, "select count(*) from twistar_planner_labels")[0][0]
    assert hard and labels
    write_candidates(wh, tmp_path / "new.parquet", parts=("train", "valid", "test"), shift=3)
    out = ok(wh, "twistar", "candidates", "--dataset", "ml-100k", "--from-file",
             str(tmp_path / "new.parquet"), "--trained-on", "train")
    assert f"{hard:,} hard samples and {labels:,} planner labels" in " ".join(out.split())
    assert q(wh, "select count(*) from twistar_hard_samples") == [(0,)]
    assert q(wh, "select count(*) from twistar_planner_labels") == [(0,)]
    res = cli(wh, "export", "sft", "--dataset", "ml-100k", "--kind", "twistar-planner",
              "--out", str(tmp_path / "p.jsonl"))
    assert res.exit_code != 0 and "planner-labels" in str(res.exception)
