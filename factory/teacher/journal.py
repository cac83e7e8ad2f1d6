"""Per-run answer journals: every teacher answer is on disk the moment it is received.

The warehouse is written in batches (one short DuckDB transaction a second) and can be
unavailable for a while: another process holds the lock, a query runs long, the disk is full.
So the engine first appends each `llm_calls` row it receives, as one JSON line, to
`<warehouse>.files/journal/<run_id>.jsonl`, and folds the rows into `llm_calls` with its
normal flushes. `append` only queues the row: a writer thread serialises what is queued and
writes it with one write() (the event loop never waits on the disk, and a burst of answers
costs one system call), and a second thread fsyncs within FSYNC_S. An answer reaches the page
cache (where kill -9 cannot take it) a fraction of a millisecond after it arrives; what is
still queued at a kill is what a re-run re-sends, like the requests in flight. When the
run ends with everything stored, the journal is deleted. When it does not (kill -9, OOM, a
node lost, a store that gave up), the next command that opens the warehouse for writing
imports the journals of runs that are no longer alive (`import_journals`, called from
`Warehouse.write()` after dead runs are marked), so a resumed run finds those answers in the
cache and re-sends only what was in flight.

Disk full: the journal reserves RESERVE_BYTES ahead of its end (fallocate, keeping the file
size), so answers already in flight still land when the disk fills; when the reservation
cannot grow the journal says so (`full`) and the engine stops sending new requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from factory.teacher.store import write_calls

if TYPE_CHECKING:
    from factory.warehouse import Warehouse

RESERVE_BYTES = 8 << 20       # room kept ahead of the journal's end (~500 large answers)
FSYNC_S = 0.2                 # the longest an answer waits in the page cache
IMPORT_BATCH = 5000           # rows per upsert when importing a journal
_FALLOC_FL_KEEP_SIZE = 1


def journal_dir(warehouse_path: Path) -> Path:
    """`factory.duckdb` -> `factory.files/journal/` (beside the other large files)."""
    return warehouse_path.parent / f"{warehouse_path.stem}.files" / "journal"


def _fallocate() -> Any:
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    fn = getattr(ctypes.CDLL(libc_name, use_errno=True), "fallocate", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return fn


class Journal:
    """An append-only JSON-lines file of llm_calls rows for one run."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size
        self._reserved = self._size
        self._falloc = _fallocate()
        self.full = False             # the disk has no room for more than the reservation
        self.error: OSError | None = None   # why a write failed (append raises it)
        self.rows = 0                 # rows written
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = threading.Event()      # rows queued, or closing
        self._kick_loop: Any = None         # the event loop in which a wake is scheduled
        self._idle = threading.Condition()  # the writer has written all it took
        self._busy = False
        self._dirty = threading.Event()
        self._closing = False
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._reserve()
        self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                        name="teacher-journal-write")
        self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                        name="teacher-journal-fsync")
        self._writer.start()
        self._syncer.start()

    def _reserve(self) -> None:
        """Keep RESERVE_BYTES of disk allocated past the end (where the filesystem can)."""
        if self._falloc is None or self._reserved - self._size >= RESERVE_BYTES // 2:
            return
        want = self._size + RESERVE_BYTES
        if self._falloc(self._fd, _FALLOC_FL_KEEP_SIZE, 0, want) == 0:
            self._reserved = want
            return
        err = ctypes.get_errno()
        if err == errno.ENOSPC:
            self.full = True
        elif err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            self._falloc = None       # e.g. some network filesystems: no reservation there

    def append(self, row: dict[str, Any]) -> None:
        """Queue one answer for the writer thread (the row must not change afterwards);
        raises the OSError of an earlier write that failed. In an event loop the writer is
        woken once per loop iteration, for all the answers that iteration received: waking
        it per row handed the GIL back and forth for every answer."""
        if self.error is not None:
            raise self.error
        self._queue.append(row)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:         # no loop running: wake it now
            self._kick()
            return
        # (a loop that closed before running its wake does not hold up the next one)
        if self._kick_loop is not loop:
            self._kick_loop = loop
            loop.call_soon(self._kick)

    def _kick(self) -> None:
        self._kick_loop = None
        self._wake.set()

    def _write_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._idle:
                self._busy = True
            rows = []
            while self._queue:
                rows.append(self._queue.popleft())
            if rows and self.error is None:
                self._write(rows)
            with self._idle:
                self._busy = False
                self._idle.notify_all()
            if self._closing and not self._queue:
                return

    def _write(self, rows: list[dict[str, Any]]) -> None:
        try:
            data = "".join([json.dumps(row, ensure_ascii=False, default=str) + "\n"
                            for row in rows]).encode()
            with self._lock:
                written = os.write(self._fd, data)
                self._size += written
                if written != len(data):   # a short write: the disk filled mid-line
                    self.full = True
                    raise OSError(errno.ENOSPC, "journal write cut short (disk full)")
                self.rows += len(rows)
                self._reserve()
        except OSError as exc:
            self.error = exc
            self.full = self.full or exc.errno == errno.ENOSPC
        except Exception as exc:          # a row json cannot write: say so, as a write error
            self.error = OSError(errno.EIO, f"journal row not written: {exc}")
        self._dirty.set()

    def flush(self) -> None:
        """Wait until every row queued so far is written (in the page cache)."""
        self._kick()
        with self._idle:
            self._idle.wait_for(lambda: not self._queue and not self._busy
                                or not self._writer.is_alive())

    def _sync_loop(self) -> None:
        while not self._closed.is_set():
            if self._dirty.wait(FSYNC_S):
                self._dirty.clear()
                self.sync()

    def sync(self) -> None:
        with contextlib.suppress(OSError):    # closed under us, or the filesystem cannot
            os.fsync(self._fd)

    def close(self, delete: bool = False) -> None:
        """Write what is queued, stop the threads; with `delete`, remove the file (all rows
        are stored)."""
        if self._closed.is_set():
            return
        self._closing = True
        self._kick()
        self._writer.join()
        self._closed.set()
        self._dirty.set()
        self._syncer.join()
        with self._lock:
            if not delete:
                self.sync()
                os.ftruncate(self._fd, self._size)    # give the reservation back
            os.close(self._fd)
        if delete:
            self.path.unlink(missing_ok=True)


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a journal; a last line cut by a kill is skipped."""
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                yield json.loads(line)
            except ValueError:
                continue


def _alive_runs(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r for (r,) in con.execute(
        "select run_id from job_runs where status = 'running'").fetchall()}


def import_journals(wh: Warehouse, con: duckdb.DuckDBPyConnection,
                    shard: Path | None = None) -> int:
    """Fold the journals of runs that are no longer running into llm_calls; returns rows.

    Runs still running are left to fold their own journal. A journal is deleted only after
    its rows are committed (an upsert never replaces an 'ok' answer with a failure). With
    `shard` (a merge; its runs were checked dead or finished), that warehouse's journals are
    imported too, and left in place: merging never changes a shard.
    """
    directory = journal_dir(shard or wh.path)
    if not directory.is_dir():
        return 0
    running = set() if shard else _alive_runs(con)
    imported = 0
    for path in sorted(directory.glob("*.jsonl")):
        if path.stem in running:
            continue
        batch: list[dict[str, Any]] = []
        for row in read_journal(path):
            batch.append(row)
            if len(batch) >= IMPORT_BATCH:
                write_calls(con, batch)
                imported += len(batch)
                batch = []
        write_calls(con, batch)
        imported += len(batch)
        if not shard:
            path.unlink()
    return imported
