"""The CLI as a user meets it: a real subprocess, exit codes, one-line errors, formats."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from amazon_fixtures import write_2014

from factory.warehouse import Warehouse

#: tables piped to stdout honour COLUMNS, and pytest's process carries COLUMNS=80 in its C
#: environment (children inherit it though os.environ does not show it): set it here
WIDE = {**os.environ, "COLUMNS": "240"}


def factory(*args: str, wh: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "factory", "--warehouse", str(wh), *args],
        capture_output=True, text=True, timeout=300, env=WIDE,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_sql_formats_and_read_only(ml100k: Warehouse) -> None:
    q = "select item_id, title from items where item_id in ('1', '2') order by item_id"
    out = factory("sql", "--format", "csv", q, wh=ml100k.path)
    assert out.returncode == 0, out.stderr
    assert list(csv.reader(io.StringIO(out.stdout))) == [
        ["item_id", "title"], ["1", "Toy Story"], ["2", "GoldenEye"]]
    out = factory("sql", "--format", "json", q, wh=ml100k.path)
    assert [json.loads(line)["title"] for line in out.stdout.splitlines()] == [
        "Toy Story", "GoldenEye"]
    out = factory("sql", q, wh=ml100k.path)
    assert "Toy Story" in out.stdout
    # csv lines end in \n (a shell pipeline keeps a \r), json columns stay JSON values
    raw = subprocess.run([sys.executable, "-m", "factory", "--warehouse", str(ml100k.path),
                          "sql", "--format", "csv", q], capture_output=True, timeout=300)
    assert raw.stdout.count(b"\n") == 3 and b"\r" not in raw.stdout
    out = factory("sql", "--format", "json", "select counts from splits where name = 'loo'",
                  wh=ml100k.path)
    assert json.loads(out.stdout)["counts"]["train"]["users"] == 943

    assert_one_line_error(factory("sql", "delete from items", wh=ml100k.path), "--write")
    assert_one_line_error(factory("sql", "select nope from items", wh=ml100k.path), "nope")
    ok = factory("sql", "--write", "delete from items where item_id = '1'", wh=ml100k.path)
    assert ok.returncode == 0, ok.stderr


def test_datasets_listing(ml100k: Warehouse) -> None:
    out = factory("datasets", wh=ml100k.path)
    assert out.returncode == 0
    line = next(ln for ln in out.stdout.splitlines() if "ml-100k" in ln)
    for figure in ("943", "1,349", "99,287", "105.29", "loo"):
        assert figure in line


def test_the_warehouse_option_may_follow_the_command(ml100k: Warehouse) -> None:
    for args in (["datasets", "--warehouse", str(ml100k.path)],
                 ["datasets", f"--warehouse={ml100k.path}"]):
        out = subprocess.run([sys.executable, "-m", "factory", *args], capture_output=True,
                             text=True, timeout=300, cwd=ml100k.path.parent.parent, env=WIDE)
        assert out.returncode == 0 and "ml-100k" in out.stdout, out.stderr


def test_missing_warehouse_and_unknown_dataset(tmp_path: Path, ml100k: Warehouse) -> None:
    assert_one_line_error(factory("datasets", wh=tmp_path / "none.duckdb"), "no warehouse")
    assert_one_line_error(
        factory("split", "--dataset", "nope", "--name", "t", "--train-end", "1998-01-01",
                "--valid-end", "1998-02-01", wh=ml100k.path), "unknown dataset 'nope'")


def test_temporal_split(ml100k: Warehouse) -> None:
    out = factory("split", "--dataset", "ml-100k", "--name", "t", "--window-months", "6",
                  "--train-months", "4", "--valid-months", "1", wh=ml100k.path)
    assert out.returncode == 0, out.stderr
    with ml100k.read() as con:
        bad = con.execute(
            "select count(*) from split_interactions a join split_interactions b"
            " on a.split = b.split where a.split = 't' and a.part = 'train'"
            " and b.part <> 'train' and a.ts >= b.ts"
        ).fetchone()[0]
        parts = dict(con.execute(
            "select part, count(*) from split_parts where split = 't' group by 1").fetchall())
    assert bad == 0 and set(parts) == {"train", "valid", "test"}
    again = factory("split", "--dataset", "ml-100k", "--name", "t", "--window-months", "6",
                    "--train-months", "4", "--valid-months", "1", wh=ml100k.path)
    assert_one_line_error(again, "--replace")


def test_ingest_cli_errors_keep_data(tmp_path: Path) -> None:
    wh = tmp_path / "w.duckdb"
    reviews, meta = write_2014(tmp_path)
    ok = factory("ingest", "amazon", "--reviews", str(reviews), "--meta", str(meta),
                 "--name", "sports", "--core", "3", wh=wh)
    assert ok.returncode == 0, ok.stderr
    assert "interactions: 20" in ok.stderr
    assert_one_line_error(
        factory("ingest", "amazon", "--reviews", str(reviews), "--name", "sports", wh=wh),
        "already exists")
    assert_one_line_error(
        factory("ingest", "amazon", "--reviews", str(tmp_path / "no.gz"), "--name", "x", wh=wh),
        "no such file")
    inter = tmp_path / "i.csv"
    inter.write_text("u,i,t\na,b,1\n")
    assert_one_line_error(
        factory("ingest", "table", "--interactions", str(inter), "--name", "t", wh=wh),
        "no column 'user_id'")
    with Warehouse(wh).read() as con:
        assert con.execute("select count(*) from interactions").fetchone()[0] == 20
