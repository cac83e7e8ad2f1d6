"""Job runs: every job records what it was asked, what it did and how it ended."""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from typing import Any

import duckdb

from factory.settings import code_version


def new_run_id(job: str) -> str:
    """Sortable, readable and unique: job name, UTC time, random suffix."""
    return f"{job}-{datetime.utcnow():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def start_run(
    con: duckdb.DuckDBPyConnection, job: str, dataset: str | None, params: dict[str, Any]
) -> str:
    run_id = new_run_id(job)
    con.execute(
        "insert into job_runs (run_id, job, dataset, params, status, code_version)"
        " values (?, ?, ?, ?, 'running', ?)",
        [run_id, job, dataset, json.dumps(params, default=str, sort_keys=True), code_version()],
    )
    return run_id


def finish_run(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    status: str,
    counts: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    con.execute(
        "update job_runs set status = ?, finished_at = current_timestamp, counts = ?, error = ?"
        " where run_id = ?",
        [status, json.dumps(counts or {}, default=str, sort_keys=True), error, run_id],
    )
