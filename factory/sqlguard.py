"""Read-only SQL: `factory sql` without --write must not write any file or database.

SQL may come from less-trusted places (an LLM that writes SQL, a web page), so a read-only
connection to the warehouse is not enough: on it DuckDB still runs ATTACH ... (READ_WRITE)
(a hard link to the warehouse makes that the warehouse itself), COPY ... TO, EXPORT DATABASE,
INSTALL, and settings that write logs or profiles to files. Three layers, all DuckDB's own:

1. the warehouse connection is read-only (`Warehouse.read()`);
2. an allow-list of parsed statement types (`extract_statements`): SELECT (which covers
   FROM-first queries, VALUES, TABLE, SHOW, DESCRIBE, SUMMARIZE, PIVOT ... IN) and EXPLAIN of
   such a query; every statement of a multi-statement string must pass;
3. connection settings: no extension auto-install or auto-load, then `lock_configuration`,
   so that no later SQL (e.g. `enable_logging(storage='file')`, `enable_profiling(...)`)
   changes a setting.

`enable_external_access=false` is not used: it forbids reading other files too, and its
`allowed_directories` exception does not tell reads from writes (COPY TO and ATTACH READ_WRITE
work inside an allowed directory).
"""

from __future__ import annotations

import re

import duckdb

from factory.errors import FactoryError

_LABELS = {
    "LOAD": "INSTALL/LOAD", "SET": "SET/RESET/USE", "CALL": "CALL/CHECKPOINT",
    "MULTI": "a multi-step statement (PIVOT without IN)", "TRANSACTION": "BEGIN/COMMIT",
    "VARIABLE_SET": "SET VARIABLE", "UNKNOWN": "a statement of a kind factory does not know",
}
_LEADING = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.S)
_EXPLAIN = re.compile(r"explain\b\s*(?:analy[sz]e\b\s*)?(?:\([^()]*\)\s*)?(?P<rest>.*)\Z",
                      re.S | re.I)
_LOCKDOWN = (
    "set autoinstall_known_extensions = false",
    "set autoload_known_extensions = false",
    "set allow_community_extensions = false",
    "set lock_configuration = true",   # last: nothing after it changes a setting
)


def _type(statement: duckdb.Statement) -> str:
    try:
        return statement.type.name
    except ValueError:     # a type this duckdb's Python enum lacks (e.g. UPDATE EXTENSIONS)
        return "UNKNOWN"


def _kind(name: str) -> str:
    return _LABELS.get(name, name.replace("_", " "))


def _explained_select(con: duckdb.DuckDBPyConnection, text: str) -> bool:
    """True when `text` is EXPLAIN [ANALYZE] [(options)] of SELECT statements only
    (EXPLAIN ANALYZE runs its statement)."""
    m = _EXPLAIN.match(text, _LEADING.match(text).end())
    if not m or not m.group("rest").strip():
        return False
    try:
        inner = con.extract_statements(m.group("rest"))
    except duckdb.Error:
        return False
    return bool(inner) and all(_type(s) == "SELECT" for s in inner)


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Refuse `query` unless every statement in it only reads."""
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise FactoryError(str(exc).strip().splitlines()[0]) from None
    for i, statement in enumerate(statements, 1):
        kind = _type(statement)
        if kind == "SELECT" or (kind == "EXPLAIN" and _explained_select(con, statement.query)):
            continue
        what = "EXPLAIN of a statement that is not a SELECT" if kind == "EXPLAIN" else _kind(kind)
        where = f" (statement {i} of {len(statements)})" if len(statements) > 1 else ""
        raise FactoryError(
            f"read-only: {what}{where} is refused (only SELECT, EXPLAIN, SHOW, DESCRIBE and "
            "SUMMARIZE run without --write); pass --write to run it"
        )


def lock_down(con: duckdb.DuckDBPyConnection) -> None:
    """No extension installs or loads, then no more setting changes, on this connection's
    database instance (close it when done)."""
    for sql in _LOCKDOWN:
        con.execute(sql)
