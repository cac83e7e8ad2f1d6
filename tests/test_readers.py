"""Readers never block and never write (issue 11).

Read commands open the warehouse read-only and never migrate: an older file is refused with
the command that upgrades it (`factory migrate`), a read-only mount and another process's
read-only connection are no obstacle, and `factory sql` without --write writes nothing,
anywhere, whatever SQL it is given.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from tiny_data import fake_model

from factory.errors import FactoryError
from factory.warehouse import Warehouse

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HOME": str(tmp_path / "home"),          # where an INSTALL would put an extension
        "FACTORY_LOCK_TIMEOUT": "2", **extra}
    env.pop("FACTORY_WAREHOUSE", None)
    return env


def factory(wh: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "factory", "--warehouse", str(wh), *args],
        capture_output=True, text=True, timeout=120, cwd=cwd or wh.parent,
        env=_env(wh.parent),
    )


def one_line_error(proc: subprocess.CompletedProcess[str], fragment: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file (content hash) and directory under `root`: nothing may appear or change."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file()
                      else "dir")
    return found


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A current warehouse with one dataset and one finished run (copied by `tiny`)."""
    path = tmp_path_factory.mktemp("template") / "factory.duckdb"
    with Warehouse(path).write() as con:
        con.execute("insert into datasets (name, source, n_users, n_items, n_interactions)"
                    " values ('toy', 'test', 2, 3, 4)")
        con.execute("insert into job_runs (run_id, job, dataset, status, counts)"
                    " values ('r1', 'describe-items', 'toy', 'succeeded', '{}')")
    return path


@pytest.fixture()
def tiny(template: Path, tmp_path: Path) -> Path:
    """A private copy of the template in its own directory (with a HOME beside it)."""
    directory = tmp_path / "w"
    (directory / "home").mkdir(parents=True)
    path = directory / "factory.duckdb"
    shutil.copy(template, path)
    return path


def cli(path: Path, *args: str) -> BaseException | None:
    """The same command in-process (no interpreter start per call); its exception."""
    from typer.testing import CliRunner

    from factory.cli import app

    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        result = CliRunner().invoke(app, ["--warehouse", str(path), *args])
    finally:
        os.chdir(cwd)
    return result.exception


def make_older(path: Path) -> None:
    """Undo migration 002 as if the file were written by the factory before it."""
    con = duckdb.connect(str(path))
    con.execute("delete from schema_migrations where version = 2")
    for column in ("host", "pid", "pid_started", "heartbeat_at"):
        con.execute(f"alter table job_runs drop column {column}")
    con.close()


# -- never migrate -----------------------------------------------------------------------------
def test_reader_refuses_an_older_schema_and_factory_migrate_upgrades(tiny: Path) -> None:
    path = tiny
    make_older(path)
    before = snapshot(path.parent)
    line = one_line_error(factory(path, "sql", "select 1"), "`factory migrate`")
    assert "002_run_liveness" in line and str(path) in line
    for args in (("runs",), ("datasets",), ("gvm", "templates")):
        assert "factory migrate" in str(cli(path, *args))
    with pytest.raises(FactoryError, match="factory migrate"), Warehouse(path, reader=True).read():
        pass
    assert snapshot(path.parent) == before          # the bytes of the file are unchanged

    up = factory(path, "migrate")
    assert up.returncode == 0, up.stderr
    assert "002_run_liveness" in up.stderr
    assert Warehouse(path).migrate() == []          # `factory migrate`: "nothing to migrate"
    with Warehouse(path).read() as con:
        assert con.execute("select count(*) from job_runs where heartbeat_at is null"
                           ).fetchone()[0] == 1
    assert "no warehouse" in str(cli(path.parent / "none.duckdb", "migrate"))

    con = duckdb.connect(str(path))                 # a newer file stays refused, unchanged
    con.execute("insert into schema_migrations (version, name) values (999, 'future')")
    con.close()
    before = snapshot(path.parent)
    with pytest.raises(FactoryError, match="newer than this factory"), Warehouse(path).read():
        pass
    assert snapshot(path.parent) == before


def test_read_only_mount(tiny: Path, tmp_path: Path) -> None:
    """sql, datasets, runs and gvm templates on a read-only bind mount (private namespace)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount --bind {tmp_path} {tmp_path}"],
        capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()}")
    src = tiny
    ro = tmp_path / "ro"
    ro.mkdir()
    before = snapshot(src.parent)
    wh = ro / src.name
    cmd = " && ".join([
        f"mount --bind {src.parent} {ro}", f"mount -o remount,ro,bind {ro}",
        f"! touch {ro}/probe 2>/dev/null",                                   # really read-only
        *(f"{sys.executable} -m factory --warehouse {wh} {args}" for args in (
            "sql --format csv 'select name from datasets'", "datasets", "runs",
            "gvm templates")),
    ])
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True,
                          timeout=120, cwd=ro.parent, env=_env(src.parent))
    assert proc.returncode == 0, proc.stderr
    assert "toy" in proc.stdout and "r1" in proc.stdout and "two-step" in proc.stdout
    assert snapshot(src.parent) == before


def test_read_commands_beside_another_process_read_only_connection(tiny: Path) -> None:
    path = tiny
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys, time\n"
         f"con = duckdb.connect({str(path)!r}, read_only=True)\n"
         "con.execute('select count(*) from datasets').fetchall()\n"
         "print('ready', flush=True)\n"
         "time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        for args, expected in ((("sql", "--format", "csv", "select name from datasets"), "toy"),
                               (("datasets",), "toy"), (("runs",), "r1")):
            proc = factory(path, *args)
            assert proc.returncode == 0, proc.stderr
            assert expected in proc.stdout
    finally:
        holder.kill()
        holder.wait()


def test_read_only_embedder_reads_the_cache_but_never_adds_to_it(
        tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gvm plot` encodes through a read-only Embedder: a reader never stores vectors."""
    from factory.embeddings import Embedder

    fake_model(monkeypatch)
    path = tiny
    Embedder(Warehouse(path)).embed(["cached"])
    before = snapshot(path.parent)
    reader = Embedder(Warehouse(path), read_only=True)
    reader.embed(["cached", "new"])
    assert (reader.stats.cache_hits, reader.stats.encoded) == (1, 1)
    assert snapshot(path.parent) == before


# -- factory sql without --write ---------------------------------------------------------------
def test_sql_attach_read_write_through_a_hard_link_is_refused(tiny: Path) -> None:
    path = tiny
    os.link(path, path.parent / "link.duckdb")
    before = snapshot(path.parent)
    one_line_error(factory(path, "sql", "attach 'link.duckdb' as h (READ_WRITE)"),
                   "read-only: ATTACH")
    one_line_error(factory(path, "sql", "select 1; attach 'link.duckdb' as h (READ_WRITE);"
                           " delete from h.datasets"), "read-only: ATTACH (statement 2 of 3)")
    assert str(cli(path, "sql", "attach 'link.duckdb' as h (READ_ONLY)")).startswith(
        "read-only: ATTACH")
    assert snapshot(path.parent) == before
    with Warehouse(path).read() as con:
        assert con.execute("select count(*) from datasets").fetchone()[0] == 1


@pytest.mark.parametrize("sql, refused", [
    ("copy (select 1 as x) to 'other.duckdb'", "COPY"),
    ("copy (select * from datasets) to 'out.csv'", "COPY"),
    ("export database 'dump'", "EXPORT"),
    ("install httpfs", "INSTALL"),
])
def test_sql_copy_export_install_are_refused(tiny: Path, sql: str, refused: str) -> None:
    path = tiny
    other = duckdb.connect(str(path.parent / "other.duckdb"))   # another warehouse
    other.execute("create table keep as select 42 as answer")
    other.close()
    before = snapshot(path.parent)
    one_line_error(factory(path, "sql", sql), f"read-only: {refused}")
    assert snapshot(path.parent) == before      # HOME (extensions) is in there too


@pytest.mark.parametrize("sql", [
    "create table t as select 1", "create temp table t (x int)", "insert into datasets"
    " (name, source) values ('x', 'y')", "update datasets set source = 'z'",
    "delete from datasets", "drop table datasets", "alter table datasets add column z int",
    "set threads = 1", "reset threads", "set enable_external_access = true", "use memory",
    "pragma enable_profiling", "call checkpoint()", "checkpoint", "load json",
    "detach memory", "begin", "update extensions", "set variable v = 1",
    "explain analyze copy (select 1) to 'x.csv'", "explain (analyze) copy (select 1) to 'x.csv'",
    "/* c */ explain analyze copy (select 1) to 'x.csv'", "select 1; copy (select 1) to 'x.csv'",
    "pivot datasets on source",
])
def test_sql_other_writes_and_setting_changes_are_refused(tiny: Path, sql: str) -> None:
    before = snapshot(tiny.parent)
    refusal = cli(tiny, "sql", sql)
    assert isinstance(refusal, FactoryError), refusal
    assert str(refusal).startswith("read-only: ")
    assert str(refusal).endswith("pass --write to run it")
    assert snapshot(tiny.parent) == before


def test_sql_reads_other_files_with_settings_locked(tiny: Path) -> None:
    path = tiny
    con = duckdb.connect()
    con.execute(f"copy (select 7 as n) to '{path.parent / 'x.parquet'}'")
    con.close()
    (path.parent / "x.csv").write_text("a,b\n1,2\n")
    (path.parent / "link.duckdb").hardlink_to(path)
    before = snapshot(path.parent)

    def csv_out(sql: str) -> list[str]:
        proc = factory(path, "sql", "--format", "csv", sql)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    assert csv_out("select b, current_setting('lock_configuration') as locked,"
                   " current_setting('autoinstall_known_extensions') as install,"
                   " current_setting('autoload_known_extensions') as autoload"
                   " from read_csv('x.csv') union all select n, null, null, null"
                   " from read_parquet('x.parquet') order by 1") == [
        "b,locked,install,autoload", "2,True,False,False", "7,,,"]
    for sql in ("show tables", "describe datasets", "summarize datasets",
                "explain analyze select 1", "select * from datasets; from 'x.parquet'"):
        assert cli(path, "sql", sql) is None, sql
    # a setting changed from inside a SELECT (a log file written anywhere) is refused too
    proc = factory(path, "sql", "select * from enable_logging(storage='file',"
                   f" storage_path='{path.parent / 'logs'}')")
    one_line_error(proc, "locked")
    assert snapshot(path.parent) == before

    wrote = factory(path, "sql", "--write", "delete from datasets")   # --write still writes
    assert wrote.returncode == 0, wrote.stderr


def test_a_writer_that_reads_first_upgrades_an_older_file(tiny: Path) -> None:
    """Jobs read their inputs before they write: their first read upgrades the file (only
    the commands that only read refuse it)."""
    make_older(tiny)
    wh = Warehouse(tiny)
    with wh.read() as con:
        assert con.execute("select max(version) from schema_migrations").fetchone()[0] >= 2
        assert con.execute("select count(*) from job_runs where pid is null").fetchone()[0] == 1
    assert wh.applied == [(2, "run_liveness")]
