"""Naming runs on the command line (`latest`, unique prefixes, one resolver), `factory runs`
at 80 columns, `distill generate --redraw-rejected` and `export cache --missing skip|fail`
(issue 14, points 2 and 3)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from distill_fixtures import ChainTeacher, error_of, fake_student, invoke, ok
from test_embed_steps import fake_st, tiny  # noqa: F401 - fixtures

from factory.errors import FactoryError
from factory.runs import finish_run, start_run
from factory.testing.openai_server import OpenAIServer
from factory.warehouse import Warehouse

STUDENT_A = "distill-student-20260101-000000-aaa111"
STUDENT_B = "distill-student-20260101-000000-aab222"


def _digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


class StudentServer(ChainTeacher):
    """A student whose greedy answers break the template for some histories (steps out of
    order) and whose sampled redraws (temperature > 0) are good except for a few."""

    @staticmethod
    def bad_greedy(prompt: str) -> bool:
        return _digest(prompt)[-1] in "01234567"

    @staticmethod
    def bad_redraw(prompt: str) -> bool:
        return StudentServer.bad_greedy(prompt) and _digest(prompt)[-2] in "012345"

    def __call__(self, body: dict[str, Any]) -> str:
        prompt = body["messages"][-1]["content"]
        sampled = bool(body.get("temperature"))
        self.mode = ("swapped" if (self.bad_redraw(prompt) if sampled
                                   else self.bad_greedy(prompt)) else "good")
        return super().__call__(body)


@pytest.fixture()
def generated(tiny: Warehouse, fake_st, tmp_path: Path):  # noqa: F811 - fixtures
    """tiny with teacher chains, two fake students (B the newer) and B's greedy chains for
    every sequence, some rejected; yields (warehouse, server)."""
    with OpenAIServer(ChainTeacher()) as teacher:
        ok(tiny.path, "distill", "teach", "--dataset", "tiny", "--template", "two-step",
           "--teacher-url", teacher.url, "--teacher-model", "t")
    with tiny.write() as con:
        chain_set = con.execute("select any_value(chain_set) from chains").fetchone()[0]
        fake_student(con, STUDENT_A, chain_set, tmp_path / "a", dataset="tiny")
        con.execute("update job_runs set started_at = started_at - interval 1 hour"
                    " where run_id = ?", [STUDENT_A])
        fake_student(con, STUDENT_B, chain_set, tmp_path / "b", dataset="tiny")
    with OpenAIServer(StudentServer()) as server:
        ok(tiny.path, "distill", "generate", "--dataset", "tiny", "--student", STUDENT_B,
           "--teacher-url", server.url)
        yield tiny, server


def _verdicts(wh: Warehouse) -> dict[str, int]:
    with wh.read() as con:
        return dict(con.execute("select verdict, count(*) from chains where source ="
                                " 'student' group by 1").fetchall())


# -- point 2: run options ---------------------------------------------------------------------
def test_run_options_take_latest_and_unique_prefixes(generated) -> None:
    wh, server = generated
    server.reset()         # no --student: the dataset's latest finished student (B)
    ok(wh.path, "distill", "generate", "--dataset", "tiny", "--teacher-url", server.url)
    with wh.read() as con:
        (student,) = con.execute("select params->>'student' from job_runs where job ="
                                 " 'distill-generate' order by started_at desc limit 1"
                                 ).fetchone()
        teach = con.execute("select run_id from job_runs where job = 'distill-teach'"
                            ).fetchone()[0]
    assert student == STUDENT_B and server.count() == 0      # B's chains, from the cache
    # a short prefix, with or without the job name, as git takes short hashes
    server.reset()
    ok(wh.path, "distill", "generate", "--dataset", "tiny", "--student", "20260101-000000-aaa",
       "--teacher-url", server.url, "--splits", "train")
    assert {r.body["model"] for r in server.records} == {f"student/{STUDENT_A}"}
    assert error_of(wh.path, "distill", "generate", "--dataset", "tiny", "--student",
                    "distill-student-2026", "--teacher-url", server.url) == (
        f"--student 'distill-student-2026' is ambiguous: 2 distill student runs for dataset "
        f"'tiny' start with it ({STUDENT_B}, {STUDENT_A}); give more of the id")
    missing = error_of(wh.path, "distill", "generate", "--dataset", "tiny", "--student",
                       "nope", "--teacher-url", server.url)
    assert missing.startswith("no distill student run 'nope' for dataset 'tiny' (the latest "
                              f"is {STUDENT_B}, or pass --student latest")
    # a hint that can be pasted: `--chains teacher:latest`, not `teacher: latest`
    assert "or pass --chains teacher:latest;" in error_of(
        wh.path, "embed-steps", "--dataset", "tiny", "--chains", "teacher:zz")
    # student:latest / teacher:<prefix> in embed-steps and export cache
    ok(wh.path, "embed-steps", "--dataset", "tiny", "--chains", "teacher:" + teach[:20])
    ok(wh.path, "embed-steps", "--dataset", "tiny")          # default: student:latest
    with wh.read() as con:
        specs = [s for (s,) in con.execute("select chains from step_caches"
                                           " order by created_at").fetchall()]
        generate = con.execute("select run_id from job_runs where job = 'distill-generate'"
                               " and status = 'succeeded' order by started_at desc"
                               " limit 1").fetchone()[0]
    assert specs == [f"teacher:{teach}", f"student:{generate}"]   # recorded whole
    assert "expected teacher:<run-id> or student:<run-id> (or teacher:latest" in error_of(
        wh.path, "export", "cache", "--dataset", "tiny", "--chains", "latest")
    assert error_of(wh.path, "embed-steps", "--dataset", "tiny", "--chains",
                    f"teacher:{STUDENT_A}") == (
        f"run {STUDENT_A} is a distill-student run, not a distill teach run")


def test_resolver_names_latest_prefixes_and_what_exists(wh: Warehouse) -> None:
    from factory.runs import resolve_run

    with wh.write() as con:
        con.execute("insert into datasets (name, source) values ('toy', 'test'),"
                    " ('other', 'test')")
        old = start_run(con, "gvm", "toy", {})
        finish_run(con, old, "succeeded")
        new = start_run(con, "gvm", "toy", {})
        finish_run(con, new, "failed", error="boom")
        elsewhere = start_run(con, "gvm", "other", {})
        sids = start_run(con, "sids", "toy", {})
    with wh.read() as con:
        assert resolve_run(con, "gvm", "toy", None) == old          # succeeded only
        assert resolve_run(con, "gvm", "toy", "latest") == old
        assert resolve_run(con, "gvm", "toy", new) == new           # named: any status
        assert resolve_run(con, "gvm", "toy", new[4:]) == new       # without the job name
        assert resolve_run(con, "gvm", "toy", new[:-2]) == new
        with pytest.raises(FactoryError, match=f"gvm run {elsewhere} is of dataset 'other'"):
            resolve_run(con, "gvm", "toy", elsewhere)
        with pytest.raises(FactoryError, match=f"run {sids} is a sids run, not a gvm run"):
            resolve_run(con, "gvm", "toy", sids)
        with pytest.raises(FactoryError, match="is ambiguous: 2 gvm runs"):
            resolve_run(con, "gvm", "toy", "gvm-")
        with pytest.raises(FactoryError, match="does not fit here"):
            resolve_run(con, "gvm", "toy", old, within="select run_id from sid_runs")
        with pytest.raises(FactoryError, match="no finished sids run for dataset 'toy' "
                           r"\(1 that did not finish: pass --sids-run"):
            resolve_run(con, "sids", "toy", None, option="--sids-run")
    # gvm show takes the same words
    assert "no gvm run 'zzz' for dataset 'toy' (the latest is" in str(invoke(
        wh.path, "gvm", "show", "--dataset", "toy", "--run", "zzz").exception)


def test_runs_shows_whole_ids_at_80_columns(wh: Warehouse) -> None:
    with wh.write() as con:
        ids = [start_run(con, job, "ml-100k", {}) for job in
               ("distill-generate", "describe-items", "export-cache")]
        finish_run(con, ids[0], "succeeded", {"items": 2829, "requests": 2829, "failed": 26,
                                              "input_tokens": 123456, "output_tokens": 7})
        finish_run(con, ids[1], "failed", error="all 40 items failed; last: refused")
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "factory", "--warehouse", str(wh.path),
                           "runs"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for run_id in ids:
        assert any(f"│ {run_id} " in line for line in lines), done.stdout
    text = " ".join(" ".join(line.strip("│ ").split()) for line in lines)
    assert "succeeded" in text and "failed 26" in text and "running" in text
    wide = subprocess.run([sys.executable, "-m", "factory", "--warehouse", str(wh.path),
                           "runs"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "240"})
    assert "┃ dataset ┃" in wide.stdout                     # one column per field when wide


# -- point 3: redraw the rejected, export with them marked ------------------------------------
def test_redraw_rejected_pays_once_for_the_rejected_only(generated) -> None:
    wh, server = generated
    before = _verdicts(wh)
    rejected = before["rejected"]
    assert rejected and before["kept"]
    with wh.read() as con:
        bad = {(p, u) for p, u in con.execute("select part, user_id from chains where"
                                              " source = 'student' and verdict = 'rejected'"
                                              ).fetchall()}
    # a plain re-run replays the same greedy answers: nothing changes, nothing is sent
    server.reset()
    ok(wh.path, "distill", "generate", "--dataset", "tiny", "--teacher-url", server.url)
    assert server.count() == 0 and _verdicts(wh) == before

    server.reset()
    result = ok(wh.path, "distill", "generate", "--dataset", "tiny", "--student", "latest",
                "--redraw-rejected", "--teacher-url", server.url)
    assert server.count("ok") == rejected                     # one new draw each, no more
    assert {(r.body["temperature"], r.body["seed"]) for r in server.records} == {
        (0.7, server.records[0].body["seed"])} and server.records[0].body["seed"] != 0
    after = _verdicts(wh)
    still = sum(StudentServer.bad_redraw(r.body["messages"][-1]["content"])
                for r in server.records)
    assert 0 < still < rejected and after == {"kept": before["kept"] + rejected - still,
                                              "rejected": still}
    assert "redrawn: " in result.output and f"{rejected - still} now kept" in result.output
    with wh.read() as con:
        draws = con.execute("select draw, count(*) from llm_calls where model like"
                            " 'student/%' group by 1 order by 1").fetchall()
        redrawn = {(p, u) for p, u in con.execute(
            "select part, user_id from chains where source = 'student' and draws = 2"
        ).fetchall()}
        runs = con.execute("select params->>'redraw_rejected' from job_runs where"
                           " job = 'distill-generate' order by started_at").fetchall()
    assert draws[-1] == (1, rejected) and redrawn == bad     # new draws, cached
    assert runs[-1] == ("1",)

    # again: the redraws are replayed from the cache, not paid twice
    server.reset()
    ok(wh.path, "distill", "generate", "--dataset", "tiny", "--redraw-rejected",
       "--teacher-url", server.url)
    assert server.count() == 0 and _verdicts(wh) == after
    # a plain re-run keeps what the redraw wrote
    ok(wh.path, "distill", "generate", "--dataset", "tiny", "--teacher-url", server.url)
    assert server.count() == 0 and _verdicts(wh) == after
    # more draws: only the ones not made yet
    ok(wh.path, "distill", "generate", "--dataset", "tiny", "--redraw-rejected",
       "--redraws", "2", "--teacher-url", server.url)
    assert server.count("ok") == still


def test_export_cache_missing_fail_names_the_options_skip_marks_them(generated,
                                                                     tmp_path: Path) -> None:
    wh, _ = generated
    rejected = _verdicts(wh)["rejected"]
    ok(wh.path, "embed-steps", "--dataset", "tiny", "--chains", "student:latest")
    message = error_of(wh.path, "export", "cache", "--dataset", "tiny", "--chains",
                       "student:latest", "--out", str(tmp_path / "fail"))
    assert "distill generate --redraw-rejected" in message and "--missing skip" in message
    assert "(it resumes)" not in message
    assert error_of(wh.path, "export", "cache", "--dataset", "tiny", "--chains",
                    "student:latest", "--missing", "maybe", "--out", str(tmp_path / "x")
                    ) == "--missing 'maybe': choose fail or skip"
    result = ok(wh.path, "export", "cache", "--dataset", "tiny", "--chains", "student:latest",
                "--missing", "skip", "--out", str(tmp_path / "c"))
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    missing = manifest["steps"]["missing"]
    assert sum(missing.values()) == rejected and set(missing) == {"train", "valid", "test"}
    assert f"missing: {rejected} without a chain" in " ".join(result.output.split())
    with wh.read() as con:
        bad = {(p, u) for p, u in con.execute("select part, user_id from chains where"
                                              " source = 'student' and verdict = 'rejected'"
                                              ).fetchall()}
    for part in ("train", "valid", "test"):
        users = pq.read_table(tmp_path / "c" / f"{part}.users.parquet").to_pylist()
        h = np.load(tmp_path / "c" / f"{part}.steps.npy")
        for row in users:
            assert row["has_steps"] == ((part, row["user_id"]) not in bad)
            assert bool(np.abs(h[row["row"]]).sum()) == row["has_steps"]  # zeros if missing
        assert missing[part] == sum(not r["has_steps"] for r in users)
