"""`factory export sft --kind twistar-fast`: TwiSTAR M_fast's SID history -> next SID (4.2)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tiny_data import fake_model
from typer.testing import CliRunner

from factory.errors import FactoryError
from factory.exports.sft import export_sft
from factory.warehouse import Warehouse

SID = re.compile(r"<\|sid_begin\|>(?:<s_[a-z]_\d+>)+<\|sid_end\|>")


@pytest.fixture(scope="module")
def sids_wh(ml100k_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Warehouse:
    """ml-100k with two `factory sids` runs (the latest has a disambiguation level)."""
    from jobs.sids import run_sids

    path = tmp_path_factory.mktemp("twistar") / "factory.duckdb"
    shutil.copy(ml100k_warehouse, path)
    wh = Warehouse(path)
    with pytest.MonkeyPatch.context() as mp:
        fake_model(mp)
        run_sids(wh, "ml-100k", levels=2, codebook_size=8, collisions="extra-level", seed=1)
        run_sids(wh, "ml-100k", levels=3, codebook_size=8, collisions="extra-level")
    return wh


@pytest.fixture(scope="module")
def exported(sids_wh: Warehouse, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("fast") / "ml.parquet"
    result = export_sft(sids_wh, "ml-100k", "twistar-fast", out, fmt="parquet", seed=3)
    rows = {p: pq.read_table(out.with_name(f"ml.{p}.parquet")).to_pylist()
            for p in ("train", "valid", "test")}
    return result, out, rows


def _sequences(wh: Warehouse) -> tuple[dict, dict, str]:
    """Per user, [(position, part, item_id)] in position order; each item's SID; the run."""
    with wh.read() as con:
        run = con.execute("select run_id from sid_latest where dataset = 'ml-100k'"
                          ).fetchone()[0]
        sids = dict(con.execute("select item_id, sid from item_sids_all where run_id = ?",
                                [run]).fetchall())
        rows = con.execute("select user_id, position, part, item_id from split_interactions"
                           " where dataset = 'ml-100k' and split = 'loo'"
                           " order by user_id, position").fetchall()
    seqs: dict[str, list] = {}
    for user, pos, part, item in rows:
        seqs.setdefault(user, []).append((pos, part, item))
    return seqs, sids, run


def _history(seq: list, position: int, parts: tuple[str, ...], n: int,
             sids: dict) -> str:
    items = [item for pos, part, item in seq if pos < position and part in parts]
    return "".join(sids[i] for i in items[-n:])


def test_rows_are_train_prefixes_with_the_next_sid_and_no_leakage(sids_wh, exported):
    result, _, rows = exported
    seqs, sids, run = _sequences(sids_wh)
    assert result.notes["sids_run"] == run and result.notes["sid_levels"] == 4
    strict = re.compile(r"^<\|sid_begin\|><s_a_\d+><s_b_\d+><s_c_\d+><s_d_\d+><\|sid_end\|>$")
    held_out = {(u, item) for u, seq in seqs.items() for _, part, item in seq
                if part != "train"}
    held_out_sids = {u: {sids[i] for uu, i in held_out if uu == u} for u in seqs}
    allowed = {"train": ("train",), "valid": ("train",), "test": ("train", "valid")}
    for part, part_rows in rows.items():
        assert part_rows, part
        for r in part_rows:
            user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
            seq = seqs[r["user_id"]]
            pos, target_part, item = next(x for x in seq if x[0] == r["position"])
            assert (target_part, item, r["kind"], r["run_id"]) == (
                part, r["item_id"], "next-item", run)
            assert strict.match(answer) and answer == sids[item]     # exactly one, the next
            # the last 20 allowed items before the target, oldest first; never the target
            assert user == _history(seq, pos, allowed[part], 20, sids)
            assert 1 <= len(SID.findall(user)) <= 20
            if part == "train":                  # no valid/test target in any train row
                assert (r["user_id"], item) not in held_out
                assert not any(s in user for s in held_out_sids[r["user_id"]])
            if part == "valid":
                assert len(SID.findall(user)) == min(20, len(seq) - 2)


def test_counts_match_the_train_prefixes_in_duckdb(sids_wh, exported):
    result, out, rows = exported
    with sids_wh.read() as con:
        prefixes = con.execute(
            "select count(*) from (select row_number() over (partition by user_id"
            " order by position) as k from split_parts where dataset = 'ml-100k'"
            " and split = 'loo' and part = 'train') where k > 1").fetchone()[0]
        held = dict(con.execute(
            "select part, count(*) from split_parts where dataset = 'ml-100k'"
            " and split = 'loo' and part <> 'train' group by part").fetchall())
    assert result.counts == {"train": {"next-item": prefixes},
                             "valid": {"next-item": held["valid"]},
                             "test": {"next-item": held["test"]}}
    assert {p: len(r) for p, r in rows.items()} == {
        "train": prefixes, "valid": held["valid"], "test": held["test"]}
    manifest = json.loads(out.with_name("ml.manifest.json").read_text())
    assert manifest["counts"] == result.counts
    assert manifest["params"]["kind"] == "twistar-fast" and manifest["params"]["seed"] == 3
    assert manifest["params"]["history"] == 20
    assert manifest["notes"]["sids_run"] == result.notes["sids_run"]
    users = len({r["user_id"] for r in rows["test"]})
    assert manifest["notes"]["targets_without_history"] == {"test": 0, "train": users,
                                                            "valid": 0}
    assert manifest["files"] == ["ml.train.parquet", "ml.valid.parquet", "ml.test.parquet"]


def test_chat_jsonl_history_cap_and_seeded_order(sids_wh, exported, tmp_path):
    _, _, rows = exported
    a = export_sft(sids_wh, "ml-100k", "twistar-fast", tmp_path / "a.jsonl", history=2, seed=3)
    assert a.notes["history"] == 2
    lines = (tmp_path / "a.test.jsonl").read_text().splitlines()
    assert len(lines) == len(rows["test"])
    for line in lines:
        record = json.loads(line)
        assert list(record) == ["messages"]
        (user, assistant) = record["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert len(SID.findall(user["content"])) == 2 and SID.fullmatch(assistant["content"])
    # the seed orders the rows, the same seed gives the same bytes
    b = export_sft(sids_wh, "ml-100k", "twistar-fast", tmp_path / "b.jsonl", history=2, seed=3)
    c = export_sft(sids_wh, "ml-100k", "twistar-fast", tmp_path / "c.jsonl", history=2, seed=4)
    assert b.counts == c.counts == a.counts
    va, vb, vc = ((tmp_path / f"{s}.valid.jsonl").read_bytes() for s in "abc")
    assert va == vb and va != vc and sorted(va.splitlines()) == sorted(vc.splitlines())


def test_without_a_sids_run_it_names_factory_sids(ml100k, tmp_path):
    from factory.cli import app

    with pytest.raises(FactoryError, match="run `factory sids --dataset ml-100k` first"):
        export_sft(ml100k, "ml-100k", "twistar-fast", tmp_path / "x.jsonl")
    res = CliRunner().invoke(app, ["--warehouse", str(ml100k.path), "export", "sft",
                                   "--dataset", "ml-100k", "--kind", "twistar-fast",
                                   "--out", str(tmp_path / "y.jsonl")])
    assert isinstance(res.exception, FactoryError)
    assert "\n" not in str(res.exception) and "factory sids" in str(res.exception)
    assert not list(tmp_path.glob("*.*l"))


def test_cli(sids_wh, tmp_path):
    from factory.cli import app

    res = CliRunner().invoke(app, ["--warehouse", str(sids_wh.path), "export", "sft",
                                   "--dataset", "ml-100k", "--kind", "twistar-fast",
                                   "--history", "3", "--out", str(tmp_path / "f.jsonl")])
    assert res.exit_code == 0, res.output
    assert "next-item" in res.output
    assert {p.name for p in tmp_path.iterdir()} == {
        "f.train.jsonl", "f.valid.jsonl", "f.test.jsonl", "f.manifest.json"}
