"""Teacher engine under faults, counted on the server (run: python bench/teacher_faults.py).

Every scenario runs `factory describe-items --dataset ml-100k` as a user would (a subprocess,
default settings) against the local test server in its own process, which appends
`<outcome> <delivered> <key>` per finished request to a log; each job gets a fresh copy of one
ml-100k warehouse ingested at the start.

1. Signals: kill -9 and SIGTERM at concurrency 8, 32, 128 (latency 100 ms), sent once about
   half of --limit is answered; then the same command again. "in flight" = requests of the
   stopped job that the server finished after the signal; "re-sent" = requests answered
   (ok, delivered) before the signal that the resumed run sent again. Two more columns: "sent,
   not received by the job" (requests the server handled for the stopped job minus the
   answers in its llm_calls rows and journal: in flight as the job saw it, answers still
   unread in its sockets included; at C=128 the server finishes a whole wave at once, so its
   own "finished after the signal" undercounts this) and a stricter
   re-sent count over everything the stopped job was answered (SIGTERM's grace included).
   Goal: re-sent <= in flight as either side saw it, in every row.
2. A reader: another process holds an idle read-only DuckDB connection on the warehouse for
   --reader-hold s (70) while the job runs. Lost = answered keys not in llm_calls (goal 0).
3. A full disk: the warehouse on a small tmpfs (skipped where mount fails), filled mid-run,
   freed, the same command again. Lost (goal 0) and re-sent.
4. Throughput: C=64, --tp-rounds x 64 requests at --tp-latency (0.2 s, as bench/teacher.py):
   req/s (10%..90% of the answers, as seen in the server log) against the C/latency bound;
   with --baseline REF the same for REF's code (a temporary git worktree), side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.01


def env(code: Path, **extra: str) -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(code))
    for name in ("FACTORY_TEACHER_URL", "FACTORY_TEACHER_API_KEY", "OPENAI_API_KEY",
                 "FACTORY_WAREHOUSE"):
        e.pop(name, None)
    e.update(extra)
    return e


class Server:
    """The test server in its own process, and the lines of its request log read so far."""

    def __init__(self, latency: float, log: Path):
        self.log = log
        log.touch()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "factory.testing.openai_server", "--latency", str(latency),
             "--log", str(log)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env(ROOT))
        self.url = self.proc.stdout.readline().strip()
        self.lines: list[tuple[str, bool, str]] = []     # (outcome, delivered, key)
        self.ok = 0                                      # ok and delivered, repeats included
        self._pos, self._rest = 0, b""

    def poll(self) -> int:
        with open(self.log, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        self._pos += len(data)
        *complete, self._rest = (self._rest + data).split(b"\n")
        for line in complete:
            outcome, delivered, key = line.decode().split()
            self.lines.append((outcome, delivered == "1", key))
            self.ok += outcome == "ok" and delivered == "1"
        return len(self.lines)

    def settle(self, quiet: float = 0.5) -> int:
        """Wait until nothing more finishes for `quiet` seconds (requests of a dead client)."""
        n, since = self.poll(), time.monotonic()
        while time.monotonic() - since < quiet:
            time.sleep(0.05)
            if self.poll() != n:
                n, since = len(self.lines), time.monotonic()
        return n

    def answered(self, start: int = 0, end: int | None = None) -> set[str]:
        return {k for o, d, k in self.lines[start:end] if o == "ok" and d}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Job:
    """`factory describe-items` as a subprocess, its output in a file."""

    def __init__(self, code: Path, wh: Path, url: str, concurrency: int, limit: int,
                 out: Path):
        self.cmd = [sys.executable, "-m", "factory", "--warehouse", str(wh), "describe-items",
                    "--dataset", "ml-100k", "--teacher-url", url, "--teacher-model", "m",
                    "--concurrency", str(concurrency), "--limit", str(limit)]
        self.code, self.out = code, out

    def start(self, tag: str = "") -> subprocess.Popen:
        # cwd = the code: `python -m` puts cwd first on sys.path, ahead of PYTHONPATH
        with open(f"{self.out}{tag}", "a") as f:
            return subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT,
                                    cwd=self.code, env=env(self.code))

    def run(self, timeout: float = 600, tag: str = ".rerun") -> int:
        proc = self.start(tag)
        try:
            return proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()

    def error_line(self, tag: str = "") -> str:
        lines = Path(f"{self.out}{tag}").read_text(errors="replace").splitlines()
        picked = [ln for ln in lines if ln.startswith(("error", "interrupted"))]
        return (picked or lines or [""])[-1].strip()


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, limit: float = 300) -> bool:
    """True once cond() holds; False if the job ended first or `limit` passed."""
    deadline = time.monotonic() + limit
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def query(wh: Path, sql: str) -> list[tuple]:
    for _ in range(100):
        try:
            con = duckdb.connect(str(wh), read_only=True)
        except duckdb.IOException:             # a lock still held: wait a little
            time.sleep(0.1)
            continue
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()
    raise RuntimeError(f"could not open {wh}")


def stored(wh: Path) -> tuple[int, int]:
    """(llm_calls ok rows, item_descriptions ok rows)."""
    return (query(wh, "select count(*) from llm_calls where status = 'ok'")[0][0],
            query(wh, "select count(*) from item_descriptions where status = 'ok'")[0][0])


def received(wh: Path) -> int:
    """Answers the job had made durable: ok llm_calls rows and ok rows of run journals (which
    the next command imports), as unique keys."""
    keys = {k for (k,) in query(wh, "select key from llm_calls where status = 'ok'")}
    for path in (wh.parent / f"{wh.stem}.files" / "journal").glob("*.jsonl"):
        with open(path, "rb") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if row.get("status") == "ok":
                        keys.add(row["key"])
    return len(keys)


def first_run_status(wh: Path) -> str:
    got = query(wh, "select status from job_runs where job = 'describe-items'"
                    " order by started_at limit 1")
    return got[0][0] if got else "-"


def table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        print(" | ".join(c.rjust(w) if n and _numeric(c) else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if n == 0:
            print("-+-".join("-" * w for w in widths))


def _numeric(cell: str) -> bool:
    return cell.replace(".", "").replace("%", "").replace(" s", "").lstrip("-").isdigit()


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args, self.tmp = args, tmp
        self.count = 0
        self.source = tmp / "ml100k.duckdb"
        ingest(ROOT, self.source)

    def fresh(self, name: str, where: Path | None = None, source: Path | None = None) -> Path:
        self.count += 1
        wh = (where or self.tmp) / f"{name}-{self.count}.duckdb"
        shutil.copy(source or self.source, wh)
        return wh

    def server(self, name: str, latency: float | None = None) -> Server:
        return Server(self.args.latency if latency is None else latency,
                      self.tmp / f"{name}-{self.count}.log")

    # -- 1. kill -9 and SIGTERM --------------------------------------------------------------
    def signals(self) -> None:
        a = self.args
        print(f"# 1. signal at half of {a.limit} answered, then the same command again "
              f"(latency {a.latency * 1000:.0f} ms)")
        rows = []
        for sig in (signal.SIGKILL, signal.SIGTERM):
            for c in a.concurrency:
                rows.append(self.signal_row(sig, c))
        table(["signal", "C", "answered before the signal", "in flight",
               "sent, not received by the job", "answered requests re-sent on resume",
               "re-sent of all the stopped job got",
               "stopped run", "resumed (ok rows)", "goal"], rows)

    def signal_row(self, sig: signal.Signals, c: int) -> list[object]:
        a = self.args
        wh = self.fresh(f"sig{c}")
        server = self.server(f"sig{c}")
        name = "kill -9" if sig == signal.SIGKILL else "SIGTERM"
        try:
            job = Job(ROOT, wh, server.url, c, a.limit, self.tmp / f"sig{c}-{self.count}.out")
            proc = job.start()
            reached = wait_for(lambda: server.poll() >= 0 and server.ok >= a.limit // 2, proc)
            if not reached:
                proc.kill()
                return [name, c, server.ok, "-", "-", "-", "-", f"ended: {job.error_line()}",
                        "-", "n/a"]
            proc.send_signal(sig)
            at_signal = server.poll()
            proc.wait(timeout=120)
            time.sleep(a.latency)
            stopped_end = server.settle()
            before = server.answered(0, at_signal)
            before_ok = sum(1 for o, d, _ in server.lines[:at_signal] if o == "ok" and d)
            by_job = server.answered(0, stopped_end)
            flying = stopped_end - at_signal
            unread = len({k for _, _, k in server.lines[:stopped_end]}) - received(wh)
            rc = job.run()
            server.settle(0.2)
            resumed = server.lines[stopped_end:]
            resent = sum(1 for _, _, k in resumed if k in before)
            resent_all = sum(1 for _, _, k in resumed if k in by_job)
            status = f"{first_run_status(wh)}, exit {proc.returncode}"
            done = stored(wh)[1] if rc == 0 else f"exit {rc}: {job.error_line('.rerun')}"
            return [name, c, before_ok, flying, unread, resent, resent_all, status, done,
                    "ok" if resent <= max(flying, unread) else "MISSED"]
        finally:
            server.stop()

    # -- 2. a reader holding the warehouse --------------------------------------------------
    def reader(self) -> None:
        a = self.args
        c = a.reader_concurrency
        wh = self.fresh("reader")
        server = self.server("reader")
        hold = a.reader_hold
        print(f"# 2. an idle read-only connection held for {hold:g} s by another process "
              f"during a run (C={c}, {a.limit} items)")
        script = ("import duckdb, sys, time\n"
                  "while True:\n"
                  "    try:\n"
                  f"        con = duckdb.connect({str(wh)!r}, read_only=True); break\n"
                  "    except duckdb.IOException:\n"
                  "        time.sleep(0.05)\n"
                  "print('held', flush=True)\n"
                  f"time.sleep({hold})\n")
        try:
            job = Job(ROOT, wh, server.url, c, a.limit, self.tmp / "reader.out")
            started = time.monotonic()
            proc = job.start()
            if not wait_for(lambda: server.poll() >= 0 and server.ok >= a.limit // 10, proc):
                print(f"the job ended before the reader came: {job.error_line()}")
                return
            reader = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                      text=True)
            reader.stdout.readline()
            held_at = server.ok
            reader.wait()
            released = time.monotonic()
            rc = proc.wait(timeout=max(600.0, a.reader_hold * 3))
            ended = time.monotonic()
            server.settle(0.2)
            keys = [k for o, d, k in server.lines if o == "ok" and d]
            calls, items = stored(wh)
            lost = len(set(keys)) - calls
            table(["answered when the reader came", "answered", "paid twice",
                   "llm_calls ok", "item rows ok", "lost", "job exit",
                   "job ended after the release", "job wall", "goal"],
                  [[held_at, len(keys), len(keys) - len(set(keys)), calls, items, lost,
                    rc,
                    f"{ended - released:.1f} s", f"{ended - started:.1f} s",
                    "ok" if lost <= 0 else "MISSED"]])
            if rc:
                print(f"job's line: {job.error_line()}")
        finally:
            server.stop()

    # -- 3. a full disk ---------------------------------------------------------------------
    def disk(self) -> None:
        a = self.args
        c = a.disk_concurrency
        print(f"# 3. the warehouse on a {a.disk_size} tmpfs, filled mid-run, freed, the same "
              f"command again (C={c}, {a.limit} items)")
        with small_tmpfs(self.tmp / "disk", a.disk_size) as disk:
            if disk is None:
                print("skipped: cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
                return
            wh = self.fresh("disk", where=disk)
            server = self.server("disk")
            filler = disk / "filler"
            try:
                job = Job(ROOT, wh, server.url, c, a.limit, self.tmp / "disk.out")
                proc = job.start()
                if not wait_for(lambda: server.poll() >= 0 and server.ok >= a.limit // 4, proc):
                    print(f"the job ended before the disk was filled: {job.error_line()}")
                    return
                filled_at = server.ok
                with open(filler, "wb") as f, contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
                rc = proc.wait(timeout=600)
                time.sleep(a.latency)
                first_end = server.settle()
                by_job = server.answered(0, first_end)
                calls_then = stored(wh)[0]
                filler.unlink()
                rc2 = job.run()
                rerun = str(rc2) if rc2 == 0 else f"{rc2} ({job.error_line('.rerun')})"
                server.settle(0.2)
                resent = sum(1 for _, _, k in server.lines[first_end:] if k in by_job)
                keys = server.answered()
                calls, items = stored(wh)
                lost = len(keys) - calls
                table(["answered when filled", "first job answered", "first job exit",
                       "llm_calls ok after it", "re-run exit",
                       "re-sent", "llm_calls ok", "item rows ok", "lost", "goal"],
                      [[filled_at, len(by_job), rc,
                        calls_then, rerun, resent, calls, items, lost,
                        "ok" if lost <= 0 and resent == 0 else "MISSED"]])
                if rc:
                    print(f"first job's line: {job.error_line()}")
            finally:
                server.stop()

    # -- 4. throughput -----------------------------------------------------------------------
    def throughput(self) -> None:
        a = self.args
        c, lat = 64, a.tp_latency
        n = min(c * a.tp_rounds, 1349)
        bound = c / lat
        codes: list[tuple[str, Path, Path]] = [("this tree", ROOT, self.source)]
        with baseline_tree(a.baseline, self.tmp) as base:
            if base is not None:
                source = self.tmp / "baseline-ml100k.duckdb"
                ingest(base, source)
                codes.append((f"baseline {a.baseline}", base, source))
            print(f"# 4. throughput: C={c}, {n} requests, server latency {lat * 1000:.0f} ms, "
                  f"bound {bound:.0f} req/s (best of {a.tp_repeats})")
            rows = []
            best: dict[str, float] = {}
            for _ in range(a.tp_repeats):
                for label, code, source in codes:
                    rate = self.measure(code, source, c, n, lat)
                    best[label] = max(best.get(label, 0.0), rate)
            for label, _, _ in codes:
                rows.append([label, c, n, f"{bound:.0f}", f"{best[label]:.1f}",
                             f"{best[label] / bound:.1%}"])
            table(["code", "C", "requests", "bound req/s", "req/s", "of bound"], rows)

    def measure(self, code: Path, source: Path, c: int, n: int, latency: float) -> float:
        wh = self.fresh("tp", source=source)
        server = self.server("tp", latency)
        try:
            job = Job(code, wh, server.url, c, n, self.tmp / f"tp-{self.count}.out")
            proc = job.start()
            lo, hi = max(1, n // 10), n - n // 10
            marks: dict[int, float] = {}
            for mark in (lo, hi):
                if not wait_for(lambda m=mark: server.poll() >= 0 and server.ok >= m, proc):
                    raise RuntimeError(f"throughput run ended early: {job.error_line()}")
                marks[mark] = (time.monotonic(), server.ok)
            rc = proc.wait(timeout=300)
            if rc != 0:
                raise RuntimeError(f"throughput run failed: {job.error_line()}")
            (t0, n0), (t1, n1) = marks[lo], marks[hi]
            return (n1 - n0) / (t1 - t0)
        finally:
            server.stop()


def ingest(code: Path, wh: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "factory", "--warehouse", str(wh), "ingest",
                           "movielens", "--variant", "100k"], cwd=code, env=env(code),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ingest with {code} failed: {done.stdout}{done.stderr}")


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path | None]:
    where.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(where)], capture_output=True)
    if mounted.returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextlib.contextmanager
def baseline_tree(ref: str | None, tmp: Path) -> Iterator[Path | None]:
    """REF's code in a temporary git worktree (removed afterwards), or None without a ref."""
    if not ref:
        yield None
        return
    where = tmp / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet",
                    str(where), ref], check=True)
    try:
        got = subprocess.run([sys.executable, "-c", "import factory; print(factory.__file__)"],
                             cwd=where, env=env(where), capture_output=True, text=True,
                             check=True).stdout.strip()
        assert Path(got).is_relative_to(where), f"baseline imports {got}, not {where}"
        yield where
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)],
                       check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (~1.5 min): 200 items, reader hold 5 s, 6 tp rounds")
    parser.add_argument("--limit", type=int, help="items per job (default 800, quick 200)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--latency", type=float, default=0.1, help="server latency, s")
    parser.add_argument("--reader-hold", type=float, help="seconds (default 70, quick 5)")
    parser.add_argument("--reader-concurrency", type=int, default=8)
    parser.add_argument("--disk-size", default="48m")
    parser.add_argument("--disk-concurrency", type=int, default=8)
    parser.add_argument("--tp-latency", type=float, default=0.2)
    parser.add_argument("--tp-rounds", type=int, help="requests = 64 x rounds (default 15)")
    parser.add_argument("--tp-repeats", type=int, default=2)
    parser.add_argument("--baseline", help="a git ref whose code is measured side by side (4)")
    parser.add_argument("--only", nargs="+", choices=["signals", "reader", "disk", "throughput"],
                        default=["signals", "reader", "disk", "throughput"])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    args.limit = min(args.limit or (200 if args.quick else 800), 1349)   # ml-100k has 1,349
    args.reader_hold = args.reader_hold or (5.0 if args.quick else 70.0)
    args.tp_rounds = args.tp_rounds or (6 if args.quick else 15)
    if args.quick:
        args.tp_repeats = 1

    tmp = Path(tempfile.mkdtemp(prefix="bench-teacher-faults-"))
    started = time.monotonic()
    try:
        bench = Bench(args, tmp)
        for name in args.only:
            began = time.monotonic()
            getattr(bench, name)()
            print(f"({time.monotonic() - began:.0f} s)\n")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"(all: {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
