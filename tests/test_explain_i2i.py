"""`explain-i2i` end to end against the local OpenAI-compatible test server."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from factory.errors import FactoryError
from factory.quality import count_tokens
from factory.teacher import Sampling, TeacherOptions
from factory.testing.openai_server import MALFORMED_CONTENT
from factory.testing.simulated import explain_kept_or_short as kept_or_short
from factory.testing.simulated import explain_teacher as teacher
from factory.warehouse import Warehouse
from jobs.explain_i2i import parse_explanation, run_explain_i2i

PAIRS = 12


def _options(server, **kw) -> TeacherOptions:
    return TeacherOptions(url=server.url, model="teacher-test", timeout=5.0, backoff=0.01,
                          concurrency=4, sampling=Sampling(seed=1), **kw)


@pytest.fixture(scope="module")
def mined_file(ml100k_warehouse, tmp_path_factory) -> Path:
    """ml-100k with one mining run (top-1 partner per item), mined once for the module."""
    from factory.i2i import MineParams
    from jobs.mine_i2i import run_mine

    path = tmp_path_factory.mktemp("mined") / "mined.duckdb"
    shutil.copy(ml100k_warehouse, path)
    run_mine(Warehouse(path), "ml-100k", MineParams(top_k=1))
    return path


@pytest.fixture()
def mined(mined_file, tmp_path) -> Warehouse:
    path = tmp_path / "mined.duckdb"
    shutil.copy(mined_file, path)
    return Warehouse(path)


def _rows(wh, sql, params=None):
    with wh.read() as con:
        return con.execute(sql, params or []).fetchall()


def test_explain_end_to_end(mined, openai_server):
    openai_server.responder = teacher
    r = run_explain_i2i(mined, "ml-100k", _options(openai_server), samples=3, pairs=PAIRS)
    report = r["report"]
    assert r["pairs"] == PAIRS and report.items == PAIRS * 3
    rows = _rows(mined, "select item_i, item_j, sample, explanation, n_tokens, verdict, reason,"
                        " status, model, prompt_name, pairs_split from i2i_explanations")
    assert len(rows) == PAIRS * 3
    pairs = {(r[0], r[1]) for r in rows}
    assert len(pairs) == PAIRS
    titles = dict(_rows(mined, "select item_id, title from items"))
    verdicts = Counter(r[5] for r in rows)
    assert verdicts["kept"] and verdicts["rejected"]
    for i, j, _sample, text, n_tokens, verdict, reason, status, model, name, sp in rows:
        assert (model, name, sp) == ("teacher-test", "twistar_i2i_explain", "loo")
        if verdict == "kept":
            assert n_tokens >= 30 and status == "ok" and reason is None
            assert titles[i].split(" (")[0] in text or titles[j].split(" (")[0] in text
            assert "<think>" not in text
        elif verdict == "rejected":
            assert reason.startswith(("too short", "refusal", "names neither",
                                      "near-duplicate"))
            if reason.startswith("too short"):
                assert count_tokens(text) < 30
        elif verdict == "truncated":      # "<think>never finished": not re-drawn
            assert status == "truncated" and text is None and "never closed" in reason
        else:
            assert status == "failed" and "rejected by the parser" in reason
    assert verdicts["truncated"]
    reasons = {r[6].split(":")[0].split(" of ")[0] for r in rows if r[5] == "rejected"}
    assert {"too short", "refusal", "names neither item", "near-duplicate"} <= reasons
    # a near-duplicate is always a later sample of a pair with an earlier kept one
    for i, j, sample, *_ in (r for r in rows if (r[6] or "").startswith("near-dup")):
        assert any(r[0] == i and r[1] == j and r[5] == "kept" and r[2] < sample for r in rows)
    # the prompt is TwiSTAR's instruction with both items' text, stored with the call
    req = json.loads(_rows(mined, "select request from llm_calls limit 1")[0][0])
    assert req["messages"][-1]["content"].startswith("In collaborative filtering, item ")
    assert "Please explain why users who purchase " in req["messages"][-1]["content"]
    # malformed answers were re-drawn (more requests than work items)
    assert report.requests > report.items
    # every sample shows in the traces view with its prompt, raw answer and verdict
    traces = _rows(mined, "select entity, prompt, response, output, verdict, reason, model,"
                          " prompt_hash, output_tokens, run_id from traces"
                          " where job = 'explain-i2i'")
    assert len(traces) == len(rows)
    assert Counter(t[4] for t in traces) == verdicts
    for entity, prompt, response, output, verdict, _, model, phash, out_tokens, run in traces:
        assert " -> " in entity and prompt.startswith("In collaborative filtering, item ")
        assert model == "teacher-test" and phash and run == report.run_id
        if verdict not in ("failed", "truncated"):
            assert response and out_tokens > 0 and output in response


def test_rerun_sends_nothing_and_keeps_verdicts(mined, openai_server):
    openai_server.responder = teacher
    run_explain_i2i(mined, "ml-100k", _options(openai_server), samples=3, pairs=PAIRS)
    before = _rows(mined, "select item_i, item_j, sample, verdict, reason from"
                          " i2i_explanations order by all")
    sent = len(openai_server.records)
    r = run_explain_i2i(mined, "ml-100k", _options(openai_server, cache_only=True), samples=3,
                        pairs=PAIRS)
    assert len(openai_server.records) == sent and r["report"].cached == PAIRS * 3
    assert _rows(mined, "select item_i, item_j, sample, verdict, reason from"
                        " i2i_explanations order by all") == before
    # more samples later: only the new ones are asked for
    run_explain_i2i(mined, "ml-100k", _options(openai_server), samples=4, pairs=PAIRS)
    assert len(openai_server.records) - sent >= PAIRS
    assert _rows(mined, "select count(*) from i2i_explanations")[0][0] == PAIRS * 4


def test_pair_item_without_text_is_skipped_not_invented(mined, openai_server):
    openai_server.responder = teacher
    first = _rows(mined, "select item_i from i2i_pairs order by rank, score desc, item_i,"
                         " item_j limit 1")[0][0]
    with mined.write() as con:
        con.execute("update items set title = null where item_id = ?", [first])
    r = run_explain_i2i(mined, "ml-100k", _options(openai_server), samples=1, pairs=PAIRS)
    assert r["skipped"] >= 1
    assert not _rows(mined, "select 1 from i2i_explanations where ? in (item_i, item_j)",
                     [first])
    assert all(first not in str(rec.body) for rec in openai_server.records)


def test_i2i_run_and_split_choose_the_pairs(mined, openai_server):
    """explain-i2i picks its mining run as i2i-eval does (--i2i-run, default the latest), and
    --split narrows the latest to that split's runs."""
    from factory.i2i import MineParams
    from jobs.mine_i2i import run_mine

    openai_server.responder = teacher
    (first,) = _rows(mined, "select run_id from i2i_runs")[0]
    run_mine(mined, "ml-100k", MineParams(top_k=2))       # the latest now
    run_explain_i2i(mined, "ml-100k", _options(openai_server), samples=1, pairs=2,
                    i2i_run=first, target_kept=None)
    assert _rows(mined, "select distinct pairs_run from i2i_explanations") == [(first,)]
    with pytest.raises(FactoryError, match="no I2I pairs for 'ml-100k' on split 'temporal'"):
        run_explain_i2i(mined, "ml-100k", _options(openai_server), split="temporal")
    with pytest.raises(FactoryError, match="mined split 'loo', not 'other'"):
        run_explain_i2i(mined, "ml-100k", _options(openai_server), i2i_run=first,
                        split="other")


def test_bad_input(ml100k, openai_server):
    with pytest.raises(FactoryError, match="no I2I pairs"):
        run_explain_i2i(ml100k, "ml-100k", _options(openai_server))
    with pytest.raises(FactoryError, match="unknown dataset"):
        run_explain_i2i(ml100k, "nope", _options(openai_server))
    assert not openai_server.records
    with pytest.raises(ValueError, match="empty"):
        parse_explanation("   ")
    with pytest.raises(ValueError, match="no answer"):
        parse_explanation("<think>cut off")
    with pytest.raises(ValueError, match="no words"):
        parse_explanation(MALFORMED_CONTENT)


# -- issue 12: "20,000 final triples after filtering" is a target of kept explanations ------

def _sent(server) -> list[tuple]:
    return [(json.dumps(r.body["messages"]), r.body["seed"]) for r in server.records]


def test_target_kept_stops_at_the_target_and_a_rerun_continues_without_resending(
        mined, openai_server):
    openai_server.responder = kept_or_short
    all_pairs = _rows(mined, "select count(*) from i2i_pairs")[0][0]
    r = run_explain_i2i(mined, "ml-100k", _options(openai_server), samples=2, target_kept=20)
    kept = _rows(mined, "select count(*) from i2i_explanations where verdict = 'kept'")[0][0]
    assert r["kept"] == kept and 20 <= kept < 30
    # it stopped: a few pairs explained, not all ~1,300 (with 2 samples, >= 10 pairs needed)
    assert 10 <= r["explained"] < 40 < all_pairs
    assert _rows(mined, "select count(distinct (item_i, item_j)) from i2i_explanations"
                 )[0][0] == r["explained"]
    first = _sent(openai_server)
    assert len(first) == r["explained"] * 2 == len(set(first))
    # the same command again: every answer from the cache, nothing sent, same result
    again = run_explain_i2i(mined, "ml-100k", _options(openai_server), samples=2,
                            target_kept=20)
    assert _sent(openai_server) == first
    assert (again["kept"], again["explained"]) == (r["kept"], r["explained"])
    # a higher target continues toward it; nothing already answered is sent again
    more = run_explain_i2i(mined, "ml-100k", _options(openai_server), samples=2,
                           target_kept=50)
    sent = _sent(openai_server)
    assert len(sent) == len(set(sent)) > len(first)
    assert 50 <= more["kept"] < 65 and more["explained"] > r["explained"]
    assert more["report"].cached == r["explained"] * 2
    # --pairs caps the pairs considered: the target may be out of reach
    capped = run_explain_i2i(mined, "ml-100k", _options(openai_server), samples=2,
                             target_kept=500, pairs=30)
    assert capped["explained"] == 30 and capped["kept"] < 500
    with pytest.raises(FactoryError, match="--shard or --limit"):
        run_explain_i2i(mined, "ml-100k", _options(openai_server, limit=5), target_kept=5)
