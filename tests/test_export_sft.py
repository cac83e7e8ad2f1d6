"""`export sft`: chat format, mixing ratios, split correctness, determinism, bad input.

The generated rows are inserted directly here; the teacher jobs that make them are tested
end to end in their own files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from factory.errors import FactoryError
from factory.exports.sft import export_sft, parse_mix, take
from factory.warehouse import Warehouse


def _insert_traces(wh: Warehouse, n: int, revealed_every: int = 3) -> list[tuple[str, int]]:
    """Kept traces for `n` train instances (one per user, with history) of ml-100k, plus one
    rejected and one failed trace that must never be exported."""
    with wh.write() as con:
        inst = con.execute(
            "select user_id, position, item_id, label from split_interactions"
            " where dataset = 'ml-100k' and split = 'loo' and part = 'train' and position >= 3"
            " qualify row_number() over (partition by user_id order by position) = 1"
            " order by user_id limit ?", [n + 2]).fetchall()
        for k, (user_id, position, item_id, label) in enumerate(inst):
            hist = con.execute(
                "select i.item_id, i.title, s.label from split_interactions s join items i"
                " using (dataset, item_id) where s.dataset = 'ml-100k' and s.split = 'loo'"
                " and s.user_id = ? and s.position < ? order by s.position desc limit 3",
                [user_id, position]).fetchall()
            history = [{"item_id": i, "title": t, "label": lab, "keywords": ["kw"]}
                       for i, t, lab in reversed(hist)]
            verdict = "kept" if k < n else ("rejected" if k == n else "failed")
            answer = "Yes" if label else "No"
            con.execute(
                "insert into thinkrec_traces (dataset, split, user_id, position, item_id,"
                " label, history, turns, attempts, reflections, label_revealed, prediction,"
                " explanation, verdict, reason, work_key, call_keys, run_id, prompt_name,"
                " prompt_hash, reflect_hash, backend, model, draws, status)"
                " values ('ml-100k', 'loo', ?, ?, ?, ?, ?, '[]', 1, ?, ?, ?, ?, ?, ?, 'w', [],"
                " 'r', 'thinkrec_first_turn', 'h', 'h2', 'openai', 'm', 1, 'ok')",
                [user_id, position, item_id, label, json.dumps(history),
                 int(k % revealed_every == 0), k % revealed_every == 0, label,
                 f"{answer}. Because reasons {k}.", verdict,
                 None if verdict == "kept" else verdict])
    return [(u, p) for u, p, _, _ in inst[:n]]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train_instances(wh: Warehouse) -> set[tuple[str, int]]:
    """Every labelled train interaction of ml-100k/loo with a titled item, a user's first
    included (ThinkRec's data has one instance per interaction): what the export must keep."""
    with wh.read() as con:
        return {(str(u), int(p)) for u, p in con.execute(
            "select s.user_id, s.position from split_interactions s join items i"
            " using (dataset, item_id) where s.dataset = 'ml-100k' and s.split = 'loo'"
            " and s.part = 'train' and s.label is not null and i.title is not null"
        ).fetchall()}


def test_thinkrec_mix_ratio_parts_and_format(ml100k, tmp_path):
    kept = _insert_traces(ml100k, 40)
    out = tmp_path / "tr.parquet"
    r = export_sft(ml100k, "ml-100k", "thinkrec", out, fmt="parquet", share=0.2, seed=7)
    # ThinkRec 4.1: 0.2/0.8 is a sampling rate; all recommendation data is used
    train_instances = _train_instances(ml100k)
    n_rec = len(train_instances)
    assert n_rec > 50_000
    assert r.counts["train"]["recommendation"] == n_rec
    n_reason = r.counts["train"]["reasoning"]
    assert n_reason == round(n_rec * 0.2 / 0.8)
    assert abs(n_reason / (n_reason + n_rec) - 0.2) < 1 / (n_reason + n_rec)
    rows = pq.read_table(tmp_path / "tr.train.parquet").to_pylist()
    rec = [(row["user_id"], row["position"]) for row in rows if row["kind"] == "recommendation"]
    assert len(rec) == len(set(rec)) and set(rec) == train_instances
    # every kept trace is repeated evenly: whole passes, then a sample for the remainder
    uses: dict[tuple[str, int], int] = {}
    for row in rows:
        if row["kind"] == "reasoning":
            uses[(row["user_id"], row["position"])] = uses.get(
                (row["user_id"], row["position"]), 0) + 1
    assert set(uses) == set(kept)
    assert max(uses.values()) - min(uses.values()) <= 1
    assert max(uses.values()) == r.notes["reasoning_passes"] == -(-n_reason // 40)
    manifest = json.loads((tmp_path / "tr.manifest.json").read_text())
    notes = manifest["notes"]
    assert notes["reasoning_traces"] == 40 and notes["reasoning_examples"] == n_reason
    assert notes["recommendation_train"] == n_rec
    assert abs(notes["train_reasoning_share"] - 0.2) < 1e-4
    assert manifest["counts"]["train"] == {"reasoning": n_reason, "recommendation": n_rec}
    # valid / test: one recommendation example per user with a labelled target
    assert set(r.counts["valid"]) == {"recommendation"}
    assert r.counts["valid"]["recommendation"] > 900


def test_thinkrec_chat_format(ml100k, tmp_path):
    _insert_traces(ml100k, 10)
    out = tmp_path / "tr.jsonl"
    r = export_sft(ml100k, "ml-100k", "thinkrec", out, share=0.2, seed=7)
    train = _lines(tmp_path / "tr.train.jsonl")
    assert len(train) == sum(r.counts["train"].values())
    empty = 0
    for row in train:
        assert list(row) == ["messages"]
        (u, a) = row["messages"]
        assert u["role"] == "user" and a["role"] == "assistant"
        assert u["content"].startswith("#Question: A user has given ratings to the following "
                                       "movies: ")
        assert "<UserID>" in u["content"]
        # a user's first interaction is an instance too, with an empty history
        empty += u["content"].startswith("#Question: A user has given ratings to the "
                                         "following movies: none. ")
        assert "(evaluation: " in u["content"] or a["content"] in ("Yes", "No")
    with ml100k.read() as con:
        assert empty == con.execute("select count(distinct user_id) from split_interactions"
                                    " where split = 'loo' and part = 'train'").fetchone()[0]
        assert a["content"] in ("Yes", "No") or a["content"].startswith(("Yes. ", "No. "))
    assert sum(a["content"] not in ("Yes", "No") for a in (r["messages"][1] for r in train)) \
        == r.counts["train"]["reasoning"]
    manifest = json.loads((tmp_path / "tr.manifest.json").read_text())
    assert {f"tr.{p}.jsonl" for p in ("train", "valid", "test")} <= set(manifest["files"])
    # deterministic given the seed: the same bytes again, another order with another seed
    again = export_sft(ml100k, "ml-100k", "thinkrec", tmp_path / "again.jsonl", share=0.2,
                       seed=7)
    other = export_sft(ml100k, "ml-100k", "thinkrec", tmp_path / "other.jsonl", share=0.2,
                       seed=8)
    assert r.counts == again.counts == other.counts
    for part in ("train", "valid", "test"):
        assert (tmp_path / f"tr.{part}.jsonl").read_bytes() == \
            (tmp_path / f"again.{part}.jsonl").read_bytes()
    assert (tmp_path / "tr.train.jsonl").read_bytes() != \
        (tmp_path / "other.train.jsonl").read_bytes()
    # exclude traces whose label had to be revealed
    r2 = export_sft(ml100k, "ml-100k", "thinkrec", tmp_path / "nr.jsonl", exclude_revealed=True)
    assert r2.notes["reasoning_traces"] == 10 - len(range(0, 10, 3))
    # share 0: recommendation only; share 1: reasoning only (each trace once)
    r0 = export_sft(ml100k, "ml-100k", "thinkrec", tmp_path / "s0.jsonl", share=0.0)
    assert set(r0.counts["train"]) == {"recommendation"}
    r1 = export_sft(ml100k, "ml-100k", "thinkrec", tmp_path / "s1.jsonl", share=1.0)
    assert r1.counts["train"] == {"reasoning": 10}


def test_thinkrec_parts_follow_the_split_and_histories_stop_before_the_target(ml100k, tmp_path):
    _insert_traces(ml100k, 10)
    out = tmp_path / "t.parquet"
    export_sft(ml100k, "ml-100k", "thinkrec", out, fmt="parquet", seed=1, history=2)
    with ml100k.read() as con:
        parts = dict(((u, p), part) for u, p, part in con.execute(
            "select user_id, position, part from split_parts where dataset = 'ml-100k'"
            " and split = 'loo'").fetchall())
        labels = dict(((u, p), lab) for u, p, lab in con.execute(
            "select user_id, position, label from interactions where dataset = 'ml-100k'"
        ).fetchall())
    for part in ("train", "valid", "test"):
        t = pq.read_table(tmp_path / f"t.{part}.parquet").to_pylist()
        assert t, part
        for row in t:
            assert row["part"] == part == parts[(row["user_id"], row["position"])]
            assert row["label"] == labels[(row["user_id"], row["position"])]
            if row["kind"] == "recommendation":
                assert row["messages"][1]["content"] == ("Yes" if row["label"] else "No")
    # the history shows the item just before the target and no later one (history=2)
    rows = pq.read_table(tmp_path / "t.test.parquet").to_pylist()
    with ml100k.read() as con:
        title = dict(con.execute("select item_id, title from items where dataset = 'ml-100k'"
                                 ).fetchall())
        prev = dict(((u, p), i) for u, p, i in con.execute(
            "select user_id, position, item_id from interactions where dataset = 'ml-100k'"
        ).fetchall())
    for row in rows[:50]:
        prompt = row["messages"][0]["content"]
        history = prompt.split("following movies: ", 1)[1].split(". Additionally", 1)[0]
        assert f'"{title[prev[(row["user_id"], row["position"] - 1)]]}"' in history
        assert history.count("(evaluation: ") == 2


def test_per_group_exports(ml100k, tmp_path):
    from jobs.user_groups import run_user_groups

    _insert_traces(ml100k, 30)
    run_user_groups(ml100k, "ml-100k", groups=2, dim=8, name="g2")
    r = export_sft(ml100k, "ml-100k", "thinkrec", tmp_path / "g.parquet", fmt="parquet",
                   grouping="g2")
    assert set(r.counts) == {"group0", "group1"}
    with ml100k.read() as con:
        group = dict(con.execute("select user_id, group_id from user_groups").fetchall())
    total = 0
    for g in (0, 1):
        rows = pq.read_table(tmp_path / f"g.group{g}.train.parquet").to_pylist()
        assert rows and all(group[row["user_id"]] == g == row["group_id"] for row in rows)
        total += sum(row["kind"] == "reasoning" for row in rows)
        n_r = r.counts[f"group{g}"]["train"].get("reasoning", 0)
        n_rec = r.counts[f"group{g}"]["train"]["recommendation"]
        assert n_r == round(n_rec / 4)          # the share holds within each group
    assert total == r.notes["reasoning_examples"]
    assert r.notes["reasoning_traces"] == 30


def _insert_explanation(con, a: str, b: str, sample: int, verdict: str) -> None:
    """An explanation row and the llm_calls row holding the prompt it answered."""
    key = f"{a}-{b}-{sample}"
    request = {"model": "m", "messages": [{"role": "user", "content": f"why {a} {b}"}],
               "params": {}, "sample": sample, "draw": 0}
    con.execute("insert into llm_call_rows (key, model, backend, sample, draw, request, status,"
                " text, attempts) values (?, 'm', 'openai', ?, 0, ?, 'ok', ?, 1)",
                [key, sample, json.dumps(request), f"because {a} {b} {sample}"])
    con.execute(
        "insert into i2i_explanations (dataset, item_i, item_j, pairs_split, pairs_run,"
        " explanation, verdict, work_key, call_key, run_id, prompt_name, prompt_hash, backend,"
        " model, sample, draws, cached, status) values ('ml-100k', ?, ?, 'loo', 'p', ?, ?,"
        " ?, ?, 'r', 'twistar_i2i_explain', 'h', 'openai', 'm', ?, 1, false, 'ok')",
        [a, b, f"because {a} {b} {sample}", verdict, key, key, sample])


def test_i2i_holdout_by_unordered_pair(ml100k, tmp_path):
    with ml100k.write() as con:
        pairs = con.execute("select a.item_id, b.item_id from items a, items b where"
                            " a.dataset = 'ml-100k' and b.dataset = 'ml-100k'"
                            " and a.item_id < b.item_id order by 1, 2 limit 300").fetchall()
        for k, (i, j) in enumerate(pairs):
            for a, b in ((i, j), (j, i)):
                for s in range(2):
                    _insert_explanation(con, a, b, s, "rejected" if k % 10 == 0 else "kept")
    r = export_sft(ml100k, "ml-100k", "i2i", tmp_path / "c.jsonl", mix=0, holdout=0.1, seed=2)
    total = sum(sum(v.values()) for v in r.counts.values())
    assert total == 270 * 4
    assert 0.05 < r.counts["test"]["collaborative"] / total < 0.15
    seen: dict[frozenset, str] = {}
    for part in ("train", "valid", "test"):
        for row in _lines(tmp_path / f"c.{part}.jsonl"):
            _, a, b = row["messages"][0]["content"].split()
            assert seen.setdefault(frozenset((a, b)), part) == part
            assert "because" in row["messages"][1]["content"]


def test_i2i_mixed_with_sid_alignment_1_to_1(ml100k, tmp_path):
    """TwiSTAR E.1.3: explanations mixed 1:1 with SID/text alignment examples (App. A.2)."""
    import re

    with ml100k.write() as con:     # a SID run as `factory sids` stores it (codes made up)
        con.execute("insert into sid_runs (run_id, dataset, encoder, params, params_hash,"
                    " n_items, n_levels, collision_rate, usage) values ('sids-1', 'ml-100k',"
                    " 'e', '{}', 'h', 0, 3, 0, '{}')")
        con.execute("insert into item_sids_all select dataset, 'sids-1', item_id,"
                    " [k % 7, k % 5, k // 35], '<|sid_begin|><s_a_' || (k % 7) || '><s_b_'"
                    " || (k % 5) || '><s_c_' || (k // 35) || '><|sid_end|>', 't'"
                    " from (select dataset, item_id, row_number() over (order by item_id) as k"
                    "       from items)")
        items = [i for (i,) in con.execute("select item_id from items where dataset ="
                                           " 'ml-100k' order by item_id limit 41").fetchall()]
        for a, b in zip(items, items[1:], strict=False):
            _insert_explanation(con, a, b, 0, "kept")
        sids = dict(con.execute("select item_id, sid from item_sids").fetchall())
        titles = dict(con.execute("select item_id, title from items").fetchall())
    r = export_sft(ml100k, "ml-100k", "i2i", tmp_path / "a.parquet", fmt="parquet", mix=1.0,
                   holdout=0.0, seed=5)
    assert r.counts["train"] == {"collaborative": 40, "alignment": 40}
    assert r.counts["valid"] == r.counts["test"] == {}
    rows = pq.read_table(tmp_path / "a.train.parquet").to_pylist()
    sid_format = re.compile(r"^<\|sid_begin\|>(<s_[a-z]_\d+>)+<\|sid_end\|>$")
    for row in rows:
        user, answer = (m["content"] for m in row["messages"])
        if row["kind"] != "alignment":
            continue
        sid = sids[row["item_id"]]
        assert sid_format.match(sid)
        if answer == sid:                                   # text -> SID
            assert user.startswith("Which semantic ID has the item " + titles[row["item_id"]])
        else:                                               # SID -> text
            assert user == f"Describe the item {sid}." and answer.startswith(
                titles[row["item_id"]])
    # a ratio the pool cannot fill without repeats takes whole passes first
    r2 = export_sft(ml100k, "ml-100k", "i2i", tmp_path / "b.jsonl", mix=80.0, holdout=0.0)
    assert r2.counts["train"]["alignment"] == 3200 and r2.notes["alignment_passes"] == 2
    assert r2.notes["alignment_pool"] == 2 * len(sids)


def test_take_and_mix_parsing():
    import numpy as np

    idx, passes = take(5, 12, np.random.default_rng(0))
    assert passes == 3 and sorted(idx[:5]) == list(range(5)) and len(set(idx[10:])) == 2
    assert take(0, 3, np.random.default_rng(0))[0].size == 0
    assert parse_mix("alignment:1") == 1.0
    for bad in ("alignment", "other:1", "alignment:x", "alignment:-1"):
        with pytest.raises(FactoryError):
            parse_mix(bad)


def test_bad_input(ml100k, tmp_path):
    with pytest.raises(FactoryError, match="no kept ThinkRec traces"):
        export_sft(ml100k, "ml-100k", "thinkrec", tmp_path / "x.jsonl")
    with pytest.raises(FactoryError, match="no kept I2I explanations"):
        export_sft(ml100k, "ml-100k", "i2i", tmp_path / "x.jsonl")
    with pytest.raises(FactoryError, match="unknown split"):
        export_sft(ml100k, "ml-100k", "i2i", tmp_path / "x.jsonl", split="nope")
    with pytest.raises(FactoryError, match="no user grouping"):
        export_sft(ml100k, "ml-100k", "thinkrec", tmp_path / "x.jsonl", grouping="nope")
    with pytest.raises(FactoryError, match="no user"):
        export_sft(ml100k, "ml-100k", "i2i", tmp_path / "x.jsonl", grouping="g")
    assert not list(tmp_path.glob("x.*"))
    with ml100k.read() as con:
        assert con.execute("select count(*) from job_runs where job = 'export-sft'"
                           " and status = 'failed'").fetchone()[0] == 3


def test_cli(ml100k, tmp_path):
    from factory.cli import app

    _insert_traces(ml100k, 5)
    res = CliRunner().invoke(app, ["--warehouse", str(ml100k.path), "export", "sft",
                                   "--dataset", "ml-100k", "--kind", "thinkrec",
                                   "--out", str(tmp_path / "cli.jsonl")])
    assert res.exit_code == 0, res.output
    n = len(_lines(tmp_path / "cli.train.jsonl"))
    assert n > 50_000 and "recommendation" in res.output


def test_traces_outside_a_replaced_split_are_counted(ml100k, tmp_path):
    kept = _insert_traces(ml100k, 6)
    user, position = kept[0]
    with ml100k.write() as con:       # as if the split had been rebuilt without this instance
        con.execute("delete from split_parts where split = 'loo' and user_id = ?"
                    " and position = ?", [user, position])
    r = export_sft(ml100k, "ml-100k", "thinkrec", tmp_path / "t.jsonl", share=0.2)
    assert r.notes["reasoning_traces"] == 5 and r.notes["traces_not_in_split_train"] == 1
