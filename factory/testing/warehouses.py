"""Warehouse files as an older factory left them: what upgrade, merge and benchmark code
paths start from."""

from __future__ import annotations

from pathlib import Path

import duckdb

from factory.warehouse import SCHEMA_MIGRATIONS, migrations


def schema_before(path: Path, version: int) -> None:
    """Create `path` with every migration numbered below `version` applied, and no other."""
    con = duckdb.connect(str(path))
    try:
        con.execute(SCHEMA_MIGRATIONS)
        for number, name, sql in migrations():
            if number < version:
                con.execute(sql)
                con.execute("insert into schema_migrations (version, name) values (?, ?)",
                            [number, name])
    finally:
        con.close()
