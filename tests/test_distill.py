"""`distill teach` / `distill generate` through the teacher platform (a scripted OpenAI-
compatible server), sequences without leakage, verdicts, resume, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from distill_fixtures import ChainTeacher, error_of, factory, fake_student, ok

from factory.distill import load_sequences
from factory.errors import FactoryError
from factory.testing.openai_server import OpenAIServer
from factory.warehouse import Warehouse

THREE = ["User Profile Summary", "User Interest Extraction", "Item Recommendation"]


@pytest.fixture()
def server():
    teacher = ChainTeacher()
    with OpenAIServer(teacher) as srv:
        srv.teacher = teacher
        yield srv


def teach(wh: Warehouse, server: OpenAIServer, *extra: str) -> str:
    ok(wh.path, "distill", "teach", "--dataset", "ml-100k", "--template", "three-step",
       "--teacher-url", server.url, "--teacher-model", "teacher-m", *extra)
    with wh.read() as con:
        return con.execute("select run_id from job_runs where job = 'distill-teach'"
                           " order by started_at desc limit 1").fetchone()[0]


def test_sequences_are_leave_one_out_rows_without_targets(ml100k: Warehouse) -> None:
    with ml100k.read() as con:
        seqs = load_sequences(con, "ml-100k", "loo", ["train", "valid", "test"], 1000)
        parts = {}
        for user, part, items in con.execute(
                "select user_id, part, list(item_id order by position) from split_interactions"
                " where dataset = 'ml-100k' and split = 'loo' group by all").fetchall():
            parts.setdefault(user, {})[part] = items
    by_key = {(s.part, s.user_id): s.history for s in seqs}
    user = "1"
    tr, va, te = parts[user]["train"], parts[user]["valid"], parts[user]["test"]
    assert by_key[("train", user)] == tuple(tr[:-1])        # target: the last train item
    assert by_key[("valid", user)] == tuple(tr)             # target: the valid item
    assert by_key[("test", user)] == tuple(tr + va)         # target: the test item
    assert va[0] not in by_key[("valid", user)] and te[0] not in by_key[("test", user)]
    assert len([s for s in seqs if s.part == "train"]) == len(parts)
    with ml100k.read() as con:
        short = load_sequences(con, "ml-100k", "loo", ["test"], 20)
    assert max(len(s.history) for s in short) == 20
    assert {s.history for s in short if s.user_id == user} == {tuple((tr + va)[-20:])}


def test_teach_writes_kept_chains_for_training_sequences(ml100k: Warehouse,
                                                          server: OpenAIServer) -> None:
    run_id = teach(ml100k, server, "--limit", "4")
    assert server.count("ok") == 4
    with ml100k.read() as con:
        rows = con.execute(
            "select part, user_id, history, verdict, steps, overall, summary, template,"
            " template_steps, source, model, call_key, chain_set, run_id from chains").fetchall()
        titles = dict(con.execute("select item_id, title from items"
                                  " where dataset = 'ml-100k'").fetchall())
        train = dict(con.execute(
            "select user_id, list(item_id order by position) from split_interactions"
            " where dataset = 'ml-100k' and split = 'loo' and part = 'train' group by 1"
        ).fetchall())
        steps = con.execute("select step_index, step_name, count(*) from chain_steps"
                            " group by all order by 1").fetchall()
        params = con.execute("select params->>'chain_set' from job_runs where run_id = ?",
                             [run_id]).fetchone()[0]
    assert len(rows) == 4
    prompts = {b["messages"][-1]["content"] for b in (r.body for r in server.records)}
    for part, user, history, verdict, chain, overall, summary, tpl, names, source, model, \
            call_key, chain_set, rid in rows:
        assert (part, verdict, tpl, names, source) == ("train", "kept", "three-step", THREE,
                                                       "teacher")
        assert history == train[user][:-1][-20:]
        assert len(chain) == 3 and chain[0].startswith("Step 1 looks at")
        assert overall.endswith("items watched.") and summary == "more of the same."
        assert model == "teacher-m" and call_key and chain_set == params and rid == run_id
        target = titles[train[user][-1]]
        prompt = next(p for p in prompts if f"Item {len(history)}: "
                      f"{titles[history[-1]].rstrip('.')}" in p)
        if target not in {titles[i] for i in history}:
            assert target not in prompt             # the target is never shown
    assert steps == [(1, THREE[0], 4), (2, THREE[1], 4), (3, THREE[2], 4)]

    # a re-run (or a resumed one) pays for nothing and lands on the same rows
    again = teach(ml100k, server, "--limit", "4")
    assert again != run_id and server.count("ok") == 4
    with ml100k.read() as con:
        assert con.execute("select count(*), count(distinct run_id) from chains"
                           ).fetchone() == (4, 1)


def test_rejected_chains_say_why_and_are_redrawn(ml100k: Warehouse,
                                                 server: OpenAIServer) -> None:
    server.teacher.mode = "swapped"
    result = ok(ml100k.path, "distill", "teach", "--dataset", "ml-100k", "--template",
                "three-step", "--teacher-url", server.url, "--teacher-model", "teacher-m",
                "--limit", "2")
    # a rejected chain came back and was refused: no transport failure (not `failed: 2`)
    assert "  rejected by the parser: 2\n  failed (no answer): 0\n" in result.output
    assert "chain set " in result.output and "rejected 2" in result.output
    with ml100k.read() as con:
        rows = con.execute("select verdict, reason, steps, draws, status from chains").fetchall()
        assert con.execute("select count(*) from chain_steps").fetchone() == (0,)
    assert server.count("ok") == 6                      # 1 + 2 parse-retry draws each
    assert rows == [("rejected", "steps out of order: step 2 'User Interest Extraction' comes"
                     " before step 1 'User Profile Summary'", None, 3, "failed")] * 2


def test_generate_writes_student_chains_for_every_split(ml100k: Warehouse,
                                                        server: OpenAIServer,
                                                        tmp_path: Path) -> None:
    teach(ml100k, server, "--limit", "2")
    with ml100k.write() as con:
        chain_set = con.execute("select any_value(chain_set) from chains").fetchone()[0]
        model_id = fake_student(con, "distill-student-x", chain_set, tmp_path / "adapter")
    server.reset()
    ok(ml100k.path, "distill", "generate", "--dataset", "ml-100k", "--student",
       "distill-student-x", "--teacher-url", server.url, "--limit", "6")
    assert {r.body["model"] for r in server.records} == {model_id}   # the adapter's name
    assert {r.body.get("temperature") for r in server.records} == {0.0}
    with ml100k.read() as con:
        rows = con.execute("select part, verdict, source, model, template from chains"
                           " where source = 'student'").fetchall()
        sets = con.execute("select count(distinct chain_set) from chains").fetchone()[0]
    assert len(rows) == 6 and sets == 2
    assert {r[1:] for r in rows} == {("kept", "student", model_id, "three-step")}
    # --limit takes whole users: every part of the first two
    assert sorted(r[0] for r in rows) == ["test", "test", "train", "train", "valid", "valid"]
    ok(ml100k.path, "distill", "generate", "--dataset", "ml-100k", "--student",
       "distill-student-x", "--teacher-url", server.url, "--splits", "test", "--limit", "3")
    with ml100k.read() as con:
        assert con.execute("select part, count(*) from chains where source = 'student'"
                           " group by 1 order by 1").fetchall() == [
            ("test", 3), ("train", 2), ("valid", 2)]  # the first 2 were there: replaced
    # a student is addressed by its model id only
    assert "a student is addressed by its model id" in error_of(
        ml100k.path, "distill", "generate", "--dataset", "ml-100k", "--student",
        "distill-student-x", "--teacher-url", server.url, "--teacher-model", "other")


def test_bad_input_gets_one_line_errors(ml100k: Warehouse, server: OpenAIServer,
                                        tmp_path: Path) -> None:
    wh = ml100k.path
    url = ("--teacher-url", server.url, "--teacher-model", "m")
    assert "unknown template 'nope'" in error_of(
        wh, "distill", "teach", "--dataset", "ml-100k", "--template", "nope", *url)
    assert "unknown dataset 'nope'" in error_of(
        wh, "distill", "teach", "--dataset", "nope", "--template", "three-step", *url)
    assert "unknown split 'nope'" in error_of(
        wh, "distill", "teach", "--dataset", "ml-100k", "--template", "three-step",
        "--split", "nope", *url)
    assert "no discovered template for dataset 'ml-100k'" in error_of(
        wh, "distill", "teach", "--dataset", "ml-100k", *url)
    assert "no distill student run 'missing' for dataset 'ml-100k'" in error_of(
        wh, "distill", "generate", "--dataset", "ml-100k", "--student", "missing", *url)
    teach_run = teach(ml100k, server, "--limit", "1")
    assert f"run {teach_run} is a distill-teach run, not a distill student run" in error_of(
        wh, "distill", "generate", "--dataset", "ml-100k", "--student", teach_run, *url)
    with ml100k.write() as con:
        fake_student(con, "distill-student-bad", "", tmp_path, status="failed",
                     error="training diverged at step 3")
    assert error_of(wh, "distill", "generate", "--dataset", "ml-100k", "--student",
                    "distill-student-bad", *url) == (
        "distill student run distill-student-bad failed: training diverged at step 3; use a "
        "run that succeeded")
    assert "expected teacher:<run-id> or student:<run-id>" in error_of(
        wh, "embed-steps", "--dataset", "ml-100k", "--chains", "teach-only")
    assert "a student learns from teacher:<run> chains" in error_of(
        wh, "distill", "student", "--dataset", "ml-100k", "--chains", "student:x")
    # the CLI prints these as one line and exits 1
    proc = factory(wh, "distill", "teach", "--dataset", "ml-100k", "--template", "nope", *url)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: unknown template")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_valid_and_test_chains_need_a_leave_one_out_split(ml100k: Warehouse) -> None:
    with ml100k.write() as con:
        con.execute("insert into splits (dataset, name, kind) values ('ml-100k', 'two', 'x')")
        con.execute("insert into split_parts select dataset, 'two', user_id, position,"
                    " case when part = 'train' and user_id = '1' and position = 0 then 'valid'"
                    " else part end from split_parts where split = 'loo'")
        with pytest.raises(FactoryError, match="split 'two' is not leave-one-out: user 1 has"
                                               " 2 validation"):
            load_sequences(con, "ml-100k", "two", ["valid"])
        assert load_sequences(con, "ml-100k", "two", ["train"])  # train rows need no LOO
        with pytest.raises(FactoryError, match="unknown split part 'dev'"):
            load_sequences(con, "ml-100k", "loo", ["dev"])


def test_discovered_template_is_the_latest_gvm_pattern(ml100k: Warehouse,
                                                       server: OpenAIServer) -> None:
    from factory.templates import add_discovered

    steps = ["Purchase pattern recognition", "Genre interest mapping", "Item Recommendation"]
    with ml100k.write() as con:
        add_discovered(con, "gvm-run-1", "ml-100k", steps, "mined in a test")
    ok(ml100k.path, "distill", "teach", "--dataset", "ml-100k", "--teacher-url", server.url,
       "--teacher-model", "m", "--limit", "1")
    with ml100k.read() as con:
        assert con.execute("select template, template_steps, verdict from chains").fetchone() \
            == ("gvm-run-1", steps, "kept")
    prompt = server.records[0].body["messages"][-1]["content"]
    assert ("**Reasoning Pattern (High-level Steps):** Purchase pattern recognition → Genre "
            "interest mapping → Item Recommendation") in prompt


def test_chains_join_the_traces_view(ml100k: Warehouse, server: OpenAIServer) -> None:
    teach(ml100k, server, "--limit", "1")
    server.teacher.mode = "swapped"
    ok(ml100k.path, "distill", "teach", "--dataset", "ml-100k", "--template", "two-step",
       "--teacher-url", server.url, "--teacher-model", "teacher-m", "--limit", "1")
    with ml100k.read() as con:
        rows = con.execute("select job, verdict, output, reason, response, prompt, model"
                           " from traces where job like 'distill%' order by verdict").fetchall()
    assert [r[:2] for r in rows] == [("distill-teach", "kept"), ("distill-teach", "rejected")]
    kept, rejected = rows
    assert kept[2].splitlines()[0].startswith("User Profile Summary: Step 1 looks at")
    assert len(kept[2].splitlines()) == 3 and kept[6] == "teacher-m"
    assert "Purchase History in Chronological Order" in kept[5]
    assert rejected[2] is None and rejected[3].startswith("steps out of order")
    assert "**User Interest Mining:**" in rejected[4]          # the raw answer stays visible
