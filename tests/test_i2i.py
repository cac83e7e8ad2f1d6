"""I2I mining: SQL equals the Python reference, no leakage, runs and errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_data import (
    add_dataset,
    assert_close_pairs,
    mined_pairs,
    random_sequences,
    train_sequences,
)

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
               chunk_occurrences: int = 10**9, engine: str = "auto") -> list[tuple]:
    with wh.read() as con:
        train, users, items = load_training(con, dataset, params.split)
    return mined_pairs(train, users, items, params, engine, chunk_occurrences)


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
    assert_close_pairs(_sql_pairs(tiny, params), expected)
    # many small chunks give the same answer as one
    assert_close_pairs(_sql_pairs(tiny, params, chunk_occurrences=40), expected)


@pytest.mark.parametrize("score", ["count", "swing"])
def test_progress_covers_ranking_and_storing(tiny: Warehouse, score: str) -> None:
    """The bar reaches its total only after the last pairs were ranked and handed over (on
    ml-1m it sat at 25/25 for ~15 s while they were)."""
    with tiny.read() as con:
        train, users, items = load_training(con, "tiny", "loo")
    seen: list[tuple[int, int, str]] = []
    events: list[str] = []

    def on_chunk(done: int, total: int, stage: str) -> None:
        seen.append((done, total, stage))
        events.append("tick")

    for _batch, _ in mine(train, users, items, MineParams(score=score, swing_max_users=6),
                          chunk_occurrences=40, on_chunk=on_chunk):
        events.append("batch")
    stages = list(dict.fromkeys(stage for *_, stage in seen))
    assert stages == ["counting pairs", *(["swing scores"] if score == "swing" else []),
                      "ranking and storing"]
    assert [d for d, *_ in seen] == list(range(1, len(seen) + 1))
    assert seen[-1][0] == seen[-1][1] and events[-1] == "tick"
    assert events.index("batch") > events.index("tick")


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
        assert_close_pairs(got_a, sorted(mine_reference(seqs, params)))
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


# -- issue 12: true partners are no distractors; RQ3's accuracy through the teacher layer ----

def _partners(con, i2i_run: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for i, j in con.execute("select item_i, item_j from i2i_pairs_all where run_id = ?",
                            [i2i_run]).fetchall():
        out.setdefault(i, set()).add(j)
        out.setdefault(j, set()).add(i)
    return out


def test_no_distractor_is_a_mined_partner_of_i(ml100k: Warehouse) -> None:
    """ml-100k, default mining: before the fix ~770 of 13,459 sets had another true partner
    of i among the distractors."""
    from jobs.i2i_eval import run_eval

    run_mine(ml100k, "ml-100k", MineParams())
    c = run_eval(ml100k, "ml-100k")
    with ml100k.read() as con:
        partners = _partners(con, c["i2i_run"])
        sets = con.execute("select item_i, item_j, candidates, answer_index from"
                           " i2i_eval_sets where run_id = ?", [c["run_id"]]).fetchall()
    assert len(sets) == c["sets"] > 13000
    for i, j, cands, answer in sets:
        assert cands[answer] == j and len(set(cands)) == 10 and i not in cands
        assert not (set(cands) - {j}) & partners[i], (i, j)


def test_draw_candidates_forbidden_and_too_few_non_partners(wh: Warehouse) -> None:
    import numpy as np

    from jobs.i2i_eval import draw_candidates, run_eval

    n = 30
    pi, pj = np.zeros(500, dtype=np.int64), np.ones(500, dtype=np.int64)
    forbidden = np.array([0 * n + k for k in range(1, 19)])      # 0's partners: items 1..18
    cands, answer = draw_candidates(pi, pj, n, 9, 3, forbidden)
    negs = np.delete(cands, answer[:, None] + np.arange(500)[:, None] * 10)
    assert set(negs.tolist()) == set(range(19, 30))              # uniform over the 11 allowed
    # a source with fewer non-partners than distractors gets no set, and says so
    seqs = {f"u{k}": [f"i{m}" for m in range(12)] for k in range(3)}
    seqs["u9"] = [f"i{m}" for m in range(20, 27)]
    add_dataset(wh, "dense", seqs)
    run_mine(wh, "dense", MineParams(min_count=1, top_k=0, directed=False))
    c = run_eval(wh, "dense", distractors=10)
    assert c["sets"] > 0 and c["skipped_too_few_non_partners"] > 0
    with wh.read() as con:
        sources = {i for (i,) in con.execute("select item_i from i2i_eval_sets").fetchall()}
    assert sources and all(int(i[1:]) >= 20 for i in sources)
    with pytest.raises(FactoryError, match="none with 16 non-partner items"):
        run_eval(wh, "dense", distractors=16)


def _shown(prompt: str) -> tuple[str, list[str]]:
    head, rest = prompt.split("\n\nCandidates:\n", 1)
    item = head.split("Here is item ", 1)[1].removesuffix(".")
    cands = re.findall(r"^\d+\. (.*)$", rest.split("\n\nWhich candidate", 1)[0], re.M)
    return item, cands


def test_score_accuracy_from_scripted_answers(ml100k: Warehouse, openai_server) -> None:
    import hashlib

    from factory.itemtext import load_items
    from factory.teacher import Sampling, TeacherOptions
    from jobs.i2i_eval import run_eval, score_eval, wilson_interval

    run_mine(ml100k, "ml-100k", MineParams())
    c = run_eval(ml100k, "ml-100k", max_pairs=60)
    with ml100k.read() as con:
        sets = con.execute("select item_i, candidates, answer_index from i2i_eval_sets"
                           " where run_id = ?", [c["run_id"]]).fetchall()
        items = load_items(con, "ml-100k")
    truth = {(items[i].text(), tuple(items[x].text() for x in cands)): a
             for i, cands, a in sets}
    expected = {"right": 0, "wrong": 0}

    def responder(body: dict) -> str:
        item, cands = _shown(body["messages"][-1]["content"])
        answer = truth[(item, tuple(cands))]
        h = hashlib.sha256(item.encode()).digest()
        right = h[0] % 3 != 0
        pick = answer if right else (answer + 1) % 10
        if body.get("seed", 0) == 0 and h[1] % 7 == 0:
            return "I cannot tell."                               # malformed: re-drawn
        return [f"{pick + 1}", f"The answer is {pick + 1}.",
                f"<think>candidate 1 or 2?</think>\nCandidate {pick + 1}"][h[2] % 3]

    for i, _, _ in sets:
        right = hashlib.sha256(items[i].text().encode()).digest()[0] % 3 != 0
        expected["right" if right else "wrong"] += 1
    openai_server.responder = responder
    options = TeacherOptions(url=openai_server.url, model="student-test", timeout=5.0,
                             backoff=0.01, concurrency=4, sampling=Sampling(seed=0))
    with pytest.raises(FactoryError, match="no SIDs for 'ml-100k'"):
        score_eval(ml100k, c["run_id"], options)
    r = score_eval(ml100k, c["run_id"], options, show="text")
    assert r["answered"] == 60 and r["failed"] == 0
    assert r["correct"] == expected["right"] and 0 < r["correct"] < 60
    assert r["accuracy"] == pytest.approx(expected["right"] / 60)
    lo, hi = r["ci95"]
    assert (lo, hi) == wilson_interval(expected["right"], 60) and lo < r["accuracy"] < hi
    assert r["report"].requests > 60                              # malformed ones re-drawn
    with ml100k.read() as con:
        rows = con.execute("select item_i, answer_index, chosen_index, correct, model,"
                           " prompt_name, eval_run, item_view, status, run_id"
                           " from i2i_eval_answers").fetchall()
        view = con.execute("select answered, correct, accuracy, model from i2i_eval_accuracy"
                           ).fetchall()
        prompt = con.execute("select request from llm_calls limit 1").fetchone()[0]
    assert len(rows) == 60
    for _, answer, chosen, correct, model, name, ev, show, status, run in rows:
        assert correct == (chosen == answer) and status == "ok"
        assert (model, name, ev, show, run) == ("student-test", "twistar_i2i_discriminate",
                                                c["run_id"], "text", r["report"].run_id)
    assert view == [(60, expected["right"], pytest.approx(expected["right"] / 60),
                     "student-test")]
    assert "most collaboratively similar" in prompt
    # a re-run replays the cache: nothing sent, same accuracy
    sent = len(openai_server.records)
    again = score_eval(ml100k, c["run_id"], options, show="text")
    assert len(openai_server.records) == sent and again["correct"] == r["correct"]


def test_parse_choice_and_wilson() -> None:
    from jobs.i2i_eval import parse_choice, wilson_interval

    assert parse_choice("3", 10) == 2
    assert parse_choice(" 10. ", 10) == 9
    assert parse_choice("The answer is 7.", 10) == 6
    assert parse_choice("<think>maybe 2</think>Candidate #4", 10) == 3
    assert parse_choice("I pick 5 because it fits", 10) == 4
    for bad in ("none", "<think>3", "11", "2 or 3", ""):
        with pytest.raises(ValueError):
            parse_choice(bad, 10)
    lo, hi = wilson_interval(84, 100)
    assert lo == pytest.approx(0.7558, abs=1e-3) and hi == pytest.approx(0.9000, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
