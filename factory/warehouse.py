"""DuckDB warehouse access: numbered migrations, short transactions, lock-aware connects.

DuckDB allows one writing process per file, and a writer blocks readers in other processes.
Jobs therefore hold a connection only for a short batch (`Warehouse.write()`), so that
`factory sql` in another terminal gets in between batches; connects retry on a held lock.
Readers (`Warehouse.read()`) open the file read-only and never migrate: they work on a
read-only mount and beside other processes' read-only connections; only writers (and
`factory migrate`) bring an older file up to date.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import duckdb

from factory.errors import FactoryError

_MIGRATION_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every file in the `warehouse` package, in version order."""
    found = []
    for entry in resources.files("warehouse").iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(versions) != len(set(versions)):
        raise FactoryError(f"duplicate migration numbers in warehouse/: {versions}")
    return found


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


class Warehouse:
    """A DuckDB file with the factory schema. Cheap to construct; connects on demand."""

    def __init__(self, path: str | os.PathLike[str], lock_timeout: float | None = None,
                 reader: bool = False):
        """`reader`: a command that only reads; it refuses an older schema rather than
        upgrading it (a writer's first read() upgrades the file first)."""
        self.path = Path(path)
        self.reader = reader
        self.lock_timeout = (
            float(os.environ.get("FACTORY_LOCK_TIMEOUT", "60"))
            if lock_timeout is None else lock_timeout
        )
        self._migrated = False
        self._schema_checked = False
        #: (version, name) of the migrations this object applied to the file.
        self.applied: list[tuple[int, str]] = []

    # -- connections -------------------------------------------------------------------
    def _connect(self, read_only: bool,
                 lock_timeout: float | None = None) -> duckdb.DuckDBPyConnection:
        wait = self.lock_timeout if lock_timeout is None else lock_timeout
        deadline = time.monotonic() + wait
        delay = 0.05
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as exc:
                if not _is_lock_error(exc):
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                    raise FactoryError(f"cannot open warehouse {self.path}: {first}") from exc
                if time.monotonic() > deadline:
                    raise FactoryError(
                        f"warehouse {self.path} is locked by another process "
                        f"(waited {wait:.0f}s)"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    @contextmanager
    def write(self, lock_timeout: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """One transaction: committed when the block ends, rolled back on any exception.

        `lock_timeout` overrides how long to wait for another process's lock (a job's batch
        writes wait briefly and retry later rather than stall its requests)."""
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._connect(read_only=False, lock_timeout=lock_timeout)
        try:
            if not self._migrated:
                self._migrate(con)
                self._recover(con)
            con.begin()
            try:
                yield con
            except BaseException:
                con.rollback()
                raise
            con.commit()
        finally:
            con.close()

    @contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection. Never migrates and never writes: works on a read-only
        mount and beside other processes' read-only connections. A file whose schema is
        older than this factory is refused with the command that upgrades it."""
        if not self.path.exists():
            raise FactoryError(
                f"no warehouse at {self.path}: ingest a dataset first "
                "(e.g. `factory ingest movielens --variant 100k`) or pass --warehouse"
            )
        con = self._connect(read_only=True)
        try:
            if not (self._migrated or self._schema_checked):
                if not self.reader and self._missing(con):
                    con.close()            # a writer that reads first: upgrade, then read
                    with self.write():
                        pass
                    con = self._connect(read_only=True)
                else:
                    self._check_schema(con)
            yield con
        finally:
            con.close()

    def migrate(self) -> list[tuple[int, str]]:
        """Open for writing and apply every missing migration; returns (version, name) of
        those applied (empty when the file was already current)."""
        if not self.path.exists():
            raise FactoryError(f"no warehouse at {self.path}: nothing to migrate")
        with self.write():
            pass
        return list(self.applied)

    def _recover(self, con: duckdb.DuckDBPyConnection) -> None:
        """Once per process, on the first write: mark dead runs and fold the answers their
        journals hold into llm_calls, before anything looks at either."""
        from factory.console import console
        from factory.runs import reap_dead_runs
        from factory.teacher.journal import import_journals

        for run_id in reap_dead_runs(con):
            console.print(f"marked run {run_id} died: its process is gone (see job_runs.error)")
        imported = import_journals(self, con)
        if imported:
            console.print(f"imported {imported:,} answers from the journals of runs that "
                          "stopped before storing them")

    # -- schema ------------------------------------------------------------------------
    def _newer_error(self, newest_applied: int, newest_known: int) -> FactoryError:
        return FactoryError(
            f"warehouse {self.path} has schema version {newest_applied}, newer than this "
            f"factory ({newest_known}); upgrade factory to read it"
        )

    @staticmethod
    def _applied(con: duckdb.DuckDBPyConnection) -> set[int]:
        """Migration versions recorded in the file (none when it has no factory schema)."""
        has_table = con.execute(
            "select count(*) from duckdb_tables()"
            " where database_name = current_database() and schema_name = 'main'"
            " and table_name = 'schema_migrations'").fetchone()[0]
        return ({v for (v,) in con.execute("select version from schema_migrations").fetchall()}
                if has_table else set())

    def _missing(self, con: duckdb.DuckDBPyConnection) -> bool:
        """Whether the file lacks migrations this factory has (a newer file: False)."""
        applied, known = self._applied(con), [v for v, _, _ in migrations()]
        if not applied:
            return True
        return max(applied) <= max(known) and any(v not in applied for v in known)

    def _check_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        """For readers: the file's schema must be exactly what this factory expects.
        Reads schema_migrations only; a file that needs migrating is refused, not changed."""
        known = migrations()
        newest_known = known[-1][0] if known else 0
        applied = self._applied(con)
        if applied and max(applied) > newest_known:
            raise self._newer_error(max(applied), newest_known)
        missing = [f"{v:03d}_{name}" for v, name, _ in known if v not in applied]
        if missing:
            have = f"schema version {max(applied)}" if applied else "no factory schema"
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more"
                                              if len(missing) > 3 else "")
            raise FactoryError(
                f"warehouse {self.path} is older than this factory ({have}; missing {shown}); "
                "upgrade it with `factory migrate` (same --warehouse); readers never change it"
            )
        self._schema_checked = True   # not _migrated: the first write() still recovers

    def _migrate(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(SCHEMA_MIGRATIONS)
        applied = {v for (v,) in con.execute("select version from schema_migrations").fetchall()}
        known = migrations()
        newest_known = known[-1][0] if known else 0
        if applied and max(applied) > newest_known:
            raise self._newer_error(max(applied), newest_known)
        for version, name, sql in known:
            if version in applied:
                continue
            con.begin()
            try:
                con.execute(sql)
                con.execute(
                    "insert into schema_migrations (version, name) values (?, ?)", [version, name]
                )
                con.commit()
            except duckdb.Error as exc:
                con.rollback()
                raise FactoryError(f"migration {version:03d}_{name} failed: {exc}") from exc
            self.applied.append((version, name))
        self._migrated = True


#: the table recording which migrations a file has
SCHEMA_MIGRATIONS = ("create table if not exists schema_migrations ("
                     " version integer primary key, name varchar not null,"
                     " applied_at timestamp not null default current_timestamp)")


def require_dataset(con: duckdb.DuckDBPyConnection, dataset: str) -> None:
    """Fail with the list of known datasets when `dataset` is not in the warehouse."""
    if con.execute("select 1 from datasets where name = ?", [dataset]).fetchone():
        return
    names = [n for (n,) in con.execute("select name from datasets order by name").fetchall()]
    known = ", ".join(names) if names else "none yet"
    raise FactoryError(f"unknown dataset {dataset!r} (known: {known})")


def require_split(con: duckdb.DuckDBPyConnection, dataset: str, split: str) -> None:
    """Fail with the dataset's split names when `split` does not exist for it."""
    require_dataset(con, dataset)
    if con.execute(
        "select 1 from splits where dataset = ? and name = ?", [dataset, split]
    ).fetchone():
        return
    names = [
        n for (n,) in con.execute(
            "select name from splits where dataset = ? order by name", [dataset]
        ).fetchall()
    ]
    raise FactoryError(
        f"unknown split {split!r} for dataset {dataset!r} (known: {', '.join(names) or 'none'})"
    )
