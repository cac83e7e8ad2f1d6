"""`--executor ray --shards N`: a teacher job's shards as Ray tasks, with Slurm's semantics.

The driver (this process) copies the main warehouse to N shard files under
`<warehouse>.files/shards/<job>-<hash of the command>/shard-<i>.duckdb` (kept: a re-run of the
same command resumes from them, so nothing answered is paid twice), runs each shard as a Ray
task that executes the user's very command with `--warehouse shard-<i>.duckdb --shard i/N` in
a `python -m factory` subprocess (one code path with single-machine and Slurm runs: same rows,
provenance and resume), prints one line per shard as it ends, merges every shard whose task
ended (`factory.merge`, idempotent) and fails with one line naming the failed shards.

Ray is imported only here and only when asked for (`pip install 'factory[ray]'`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.errors import FactoryError, Interrupted, first_line, stopping_signal
from factory.teacher.keys import KEY_ENV
from factory.teacher.options import TeacherOptions, recorded_argv

#: options of the driver only; a shard's command never carries them
DRIVER_OPTIONS = ("--executor", "--shards", "--ray-address", "--ray-gpus-per-shard")
#: a shard's last line worth quoting is at most this long
LINE_MAX = 300


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise FactoryError("--executor ray needs Ray: pip install 'factory[ray]'") from None
    return ray


# -- the command each shard runs ----------------------------------------------------------
def split_command(argv: list[str]) -> list[str]:
    """The command after the root options, without --warehouse (each shard names its own
    file) and without the driver's options: what every shard runs, and what the shard
    folder's hash is over."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):     # root options: only --warehouse
        i += 2 if argv[i] == "--warehouse" else 1
    rest, out = argv[i:], []
    j = 0
    while j < len(rest):
        token = rest[j]
        if token in DRIVER_OPTIONS:
            j += 2
            continue
        if token.split("=", 1)[0] in DRIVER_OPTIONS and "=" in token:
            j += 1
            continue
        out.append(token)
        j += 1
    return out


def shard_command(command: list[str], shard: Path, index: int, count: int) -> list[str]:
    """The arguments of `python -m factory` for shard `index` of `count`."""
    return ["--warehouse", str(shard), *command, "--shard", f"{index}/{count}"]


#: options that change how requests are sent, not which: the same work keeps its shard files
OPERATIONAL = {"--concurrency", "--rpm", "--tpm", "--timeout", "--min-tokens-per-s",
               "--stall-timeout", "--attempts", "--max-cost", "--price-table"}


def work_of(command: list[str]) -> list[str]:
    """`command` without its operational options (and their values)."""
    out, j = [], 0
    while j < len(command):
        name = command[j].split("=", 1)[0]
        if name in OPERATIONAL:
            j += 1 if "=" in command[j] else 2
            continue
        out.append(command[j])
        j += 1
    return out


def shard_folder(warehouse: Path, job: str, command: list[str], count: int) -> Path:
    """One folder per (work, shard count): the same work finds its shard files again, even
    with another --concurrency; other work never resumes from files made for it."""
    digest = hashlib.sha256(json.dumps([work_of(command), count]).encode()).hexdigest()[:12]
    return warehouse.parent / f"{warehouse.stem}.files" / "shards" / f"{job}-{digest}"


def probe_address(address: str) -> None:
    """Fail in seconds, with one line, when nothing listens at a Ray address (`ray.init`
    itself retries an unreachable one for ever)."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local"):
        return
    target = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = target.hostname, target.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise FactoryError(f"--ray-address {address!r}: expected host:port, ray://host:port, "
                           "auto or local")
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise FactoryError(f"--ray-address {address}: nothing answers at {host}:{port} "
                           f"({exc.strerror or exc}); is the cluster up?") from None


PROBE_TIMEOUT_S = 5.0


def last_error_line(text: str) -> str:
    """What a failed shard's output says last: its `error:` line if it printed one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    line = (errors or lines or ["(no output)"])[-1]
    return line if len(line) <= LINE_MAX else line[: LINE_MAX - 3] + "..."


def forwarded_env() -> dict[str, str]:
    """FACTORY_* settings (e.g. FACTORY_TEACHER_URL) for workers on other machines; never a
    key (set those on the workers) and never the main warehouse."""
    return {k: v for k, v in os.environ.items()
            if k.startswith("FACTORY_") and k not in KEY_ENV and k != "FACTORY_WAREHOUSE"}


# -- the Ray task -------------------------------------------------------------------------
def _term_with_parent() -> None:
    """In the shard's process before exec (Linux): SIGTERM it when the Ray worker that
    started it dies (ray.shutdown, a lost node), so a shard never runs on unowned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_shard(argv: list[str], cwd: str, env: dict[str, str], log: str) -> tuple[int, str, float]:
    """Run one shard as `python -m factory ARGV`, its output in `log`; returns (exit status,
    last error line or "", seconds). Cancelled (driver's Ctrl-C), it stops the job as Ctrl-C
    would, so the shard's run is marked interrupted and resumes on a re-run."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "factory", *argv], cwd=cwd if os.path.isdir(cwd) else None,
            env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, preexec_fn=_term_with_parent)
        try:
            # Ray cancels a running task by raising in its thread between bytecodes: a wait
            # blocked in waitpid would never see it, so wait in short slices
            while True:
                try:
                    status = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    continue
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(float(os.environ.get("FACTORY_STOP_GRACE", "10")) + 5)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    line = "" if status == 0 else last_error_line(Path(log).read_text(errors="replace"))
    return status, line, time.monotonic() - start


# -- the driver -----------------------------------------------------------------------------
@dataclass
class ShardResult:
    index: int
    path: Path
    status: int | None = None      # None: the task itself failed (worker lost, cancelled)
    line: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 0


def prepare_shards(main: Any, folder: Path, count: int) -> list[Path]:
    """Shard files `folder/shard-<i>.duckdb`, copied from the main warehouse where missing
    (kept ones hold a previous run's answers: that is the resume)."""
    paths = [folder / f"shard-{i}.duckdb" for i in range(count)]
    missing = [p for p in paths if not p.exists()]
    if not missing:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    with main.write():    # bring the schema up to date first: shards then merge every column
        pass
    with main.read():     # a shared lock: no writer changes the file while it is copied
        wal = main.path.with_name(main.path.name + ".wal")
        for path in missing:
            tmp = path.with_name(path.name + ".tmp")
            shutil.copyfile(main.path, tmp)
            if wal.exists():
                shutil.copyfile(wal, tmp.with_name(tmp.name + ".wal"))
                os.replace(tmp.with_name(tmp.name + ".wal"), path.with_name(path.name + ".wal"))
            os.replace(tmp, path)
    return paths


def job_name(command: list[str]) -> str:
    """The command's leading words (`distill teach` -> distill-teach): a readable folder name."""
    words = []
    for token in command[:3]:
        if not token.replace("-", "").isalnum() or token.startswith("-"):
            break
        words.append(token)
    return "-".join(words) or "job"


def run_sharded(options: TeacherOptions) -> None:
    """The driver of `--executor ray`: copy, run every shard as a Ray task, merge, report."""
    from factory.cli import warehouse
    from factory.console import console, summary
    from factory.merge import merge_warehouses

    ray = _import_ray()
    argv = recorded_argv()
    if argv is None:
        raise FactoryError("--executor ray: the command line was not recorded; run it through "
                           "the `factory` command")
    count = options.shards or 1
    main = warehouse()
    if not main.path.exists():
        raise FactoryError(f"no warehouse at {main.path}: ingest a dataset first or pass "
                           "--warehouse")
    command = split_command(argv)
    job = job_name(command)
    folder = shard_folder(main.path.resolve(), job, command, count)
    paths = prepare_shards(main, folder, count)

    owned = not ray.is_initialized()
    if owned:
        if options.ray_address:
            probe_address(options.ray_address)
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            ray.init(address=options.ray_address, log_to_driver=False,
                     logging_level=logging.WARNING)
        except Exception as exc:       # a cluster that is down
            raise FactoryError(f"--executor ray: cannot start or reach Ray: "
                               f"{first_line(exc)}") from None
        finally:   # ray.init installs its own: SIGTERM must stop the shards as Ctrl-C does
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    console.print(f"ray: {count} shard(s) of {job} in {folder}", highlight=False,
                  soft_wrap=True, markup=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        if options.ray_gpus_per_shard > gpus:    # not refused: an autoscaler may add GPUs
            console.print(f"note: the Ray cluster has {gpus:g} GPU(s) now; shards wait for "
                          f"{options.ray_gpus_per_shard:g} each until it has them (Ctrl-C "
                          "to stop)", highlight=False, markup=False)
        results, stopped = _run_tasks(ray, options, command, paths, console)
    finally:
        if owned:
            ray.shutdown()

    if stopped is not None:      # merge what finished, then say what happened
        done = [r.path for r in results if r.ok]
        if done:
            merge_warehouses(main, done)
        raise Interrupted(f"interrupted ({stopped}); {len(done)} finished shard(s) merged, "
                          "the others stopped and keep what they got: re-run the same command "
                          "to resume", stopped)
    ended = [r for r in results if r.status is not None]
    if ended:
        merged = merge_warehouses(main, [r.path for r in ended])
        summary(f"merged {len(ended)} of {count} shard(s) into {main.path}",
                {f"shard {Path(s).stem.removeprefix('shard-')}/{count}":
                 ", ".join(f"{t} {n:,}" for t, n in sorted(c.items())) or "nothing new"
                 for s, c in merged.items()},
                "select run_id, job, status, counts from job_runs order by started_at desc"
                f" limit {count}")
    failed = [r for r in results if not r.ok]
    if failed:
        names = ", ".join(f"{r.index}/{count}" for r in failed)
        raise FactoryError(
            f"{len(failed)} of {count} shard(s) failed: {names} (logs: {folder}/shard-<i>.log);"
            " the others are merged; re-run the same command to retry (answers already paid "
            "for are cached)")


def _run_tasks(ray: Any, options: TeacherOptions, command: list[str], paths: list[Path],
               console: Any) -> tuple[list[ShardResult], str | None]:
    """Submit one task per shard; print a line as each ends; return them in shard order,
    and the signal that stopped them (None when they all ended)."""
    count = len(paths)
    task = ray.remote(run_shard)
    env, cwd = forwarded_env(), os.getcwd()
    results = {i: ShardResult(i, p) for i, p in enumerate(paths)}
    refs = {}
    for i, path in enumerate(paths):
        ref = task.options(num_cpus=1, num_gpus=options.ray_gpus_per_shard, max_retries=0,
                           name=f"factory shard {i}/{count}").remote(
            shard_command(command, path, i, count), cwd, env,
            str(path.with_suffix(".log")))
        refs[ref] = i
    pending = list(refs)
    try:
        while pending:
            # in slices: a signal handler runs only when the main thread is back in Python,
            # and an open-ended ray.wait would hold SIGTERM until a shard ends
            done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in done:
                result = results[refs[ref]]
                try:
                    result.status, result.line, result.seconds = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    cause = getattr(exc, "cause", None) or exc
                    result.line = f"ray task failed: {first_line(cause)}"
                tag = f"shard {result.index}/{count}"
                if result.ok:
                    console.print(f"{tag} ok ({result.seconds:.1f}s)", highlight=False,
                                  markup=False)
                else:
                    how = "" if result.status is None else f" (exit {result.status})"
                    console.print(f"{tag} failed{how}: {result.line}", highlight=False,
                                  soft_wrap=True, markup=False)
    except KeyboardInterrupt as exc:
        for ref in pending:
            ray.cancel(ref)
        # each shard gets its stop grace, then its own exit: wait for both before
        # ray.shutdown, which would kill the workers mid-stop
        grace = 2 * float(os.environ.get("FACTORY_STOP_GRACE", "10")) + 30
        ray.wait(pending, num_returns=len(pending), timeout=grace)
        return [results[i] for i in range(count)], stopping_signal(exc)
    return [results[i] for i in range(count)], None
