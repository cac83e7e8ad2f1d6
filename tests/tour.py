"""The README tour as data: the commands of README.md's "## Tour" bash blocks, in order, and
a runner that walks them against the simulated teacher. tests/test_tour.py runs it;
`python tests/tour.py DIR` runs it by hand and prints each command's time."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def tour_text() -> str:
    """README.md from "## Tour" to the next top-level section."""
    text = README.read_text()
    start = text.index("\n## Tour")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]

#: commands the walk does not run (matched by prefix), and why
SKIP: dict[str, str] = {
    "factory ingest amazon": "needs your Amazon files",
    "factory ingest table": "needs your own table files",
    "factory distill student": "LoRA training: minutes and GBs of memory on a CPU (issue 14 #4)",
    "factory distill generate": "needs a student (`distill student`)",
    "factory embed-steps --dataset ml-100k --chains student:": "needs a student",
    "factory ingest movielens --variant 1m": "ML-1M: 1M ratings, ~15 s to ingest and minutes "
    "for the jobs on it",
    "factory split --dataset ml-1m": "needs ML-1M",
    "factory gvm --dataset ml-1m": "needs ML-1M",
    "factory gvm transfer --from ml-1m": "needs a gvm run on ML-1M",
    "python -m train --cache factory.files/caches/ml-100k-loo-L20 --backbone tiger":
    "TIGER: ~5 min of CPU per ml-100k epoch, and as long again to decode (tests/test_tiger.py)",
    "factory train --dataset ml-100k --history 20 --backbone tiger": "TIGER: minutes per epoch",
    "factory twistar candidates --dataset ml-100k --from-file": "needs your own M_fast output",
}


@dataclass(frozen=True)
class Command:
    line: str        # as in the doc, continuation lines joined, comment removed
    block: int       # index of its bash block


def strip_comment(line: str) -> str:
    """The command without a trailing `# comment` (a `#` outside quotes after a space)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def tour_commands(text: str | None = None) -> list[Command]:
    """Every command of the bash blocks of the README's tour, in order."""
    text = tour_text() if text is None else text
    commands = []
    for b, block in enumerate(re.findall(r"```bash\n(.*?)```", text, re.S)):
        pending = ""
        for raw in block.splitlines():
            line = strip_comment(raw)
            if not line.strip():
                continue
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            commands.append(Command((pending + line.strip()).strip(), b))
            pending = ""
    return commands


def skip_reason(command: str) -> str | None:
    return next((why for prefix, why in SKIP.items() if command.startswith(prefix)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Result:
    command: str
    rc: int
    output: str
    seconds: float


class TourWalk:
    """Runs the tour in `workdir` (its ./factory.duckdb), one subprocess per command, with
    `factory` and `python` bound to this interpreter and this checkout."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("FACTORY_TEACHER", "FACTORY_WAREHOUSE"))}
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.server: subprocess.Popen[str] | None = None
        self.port = free_port()
        self.prelude = (f'factory() {{ {shlex.quote(sys.executable)} -m factory "$@"; }}\n'
                        f'python() {{ {shlex.quote(sys.executable)} "$@"; }}\n'
                        "export -f factory python\n")

    def _local(self, command: str) -> str:
        return command.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")

    def run(self, command: str, timeout: float = 300) -> Result:
        start = time.monotonic()
        if command.startswith("factory testing serve"):
            return self._serve(command, start)
        assign = re.fullmatch(r"([A-Z_]+)=\$\((.*)\)", command)
        export = re.fullmatch(r"export ((?:[A-Z_]+=\S+ ?)+)", command)
        if export:
            for pair in export.group(1).split():
                name, value = pair.split("=", 1)
                self.env[name] = self._local(value)
            return Result(command, 0, export.group(1), time.monotonic() - start)
        script = self.prelude + self._local(assign.group(2) if assign else command)
        proc = subprocess.run(["bash", "-c", script], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        output = proc.stdout + proc.stderr
        if assign and proc.returncode == 0:
            self.env[assign.group(1)] = proc.stdout.strip().splitlines()[-1]
        return Result(command, proc.returncode, output, time.monotonic() - start)

    def _serve(self, command: str, start: float) -> Result:
        args = shlex.split(command.rstrip("&").strip())[1:]
        args[args.index("--port") + 1] = str(self.port)
        self.server = subprocess.Popen([sys.executable, "-m", "factory", *args],
                                       cwd=self.workdir, env=self.env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.server.stdout is not None
        line = self.server.stdout.readline()
        return Result(command, 0 if f":{self.port}/v1" in line else 1, line,
                      time.monotonic() - start)

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()


def main() -> None:
    workdir = Path(sys.argv[1])
    workdir.mkdir(parents=True, exist_ok=True)
    walk = TourWalk(workdir)
    total = time.monotonic()
    try:
        for cmd in tour_commands():
            why = skip_reason(cmd.line)
            if why:
                print(f"SKIP  {cmd.line[:90]}  ({why})", flush=True)
                continue
            r = walk.run(cmd.line)
            print(f"{r.rc:>3} {r.seconds:6.1f}s {cmd.line[:100]}", flush=True)
            if r.rc:
                print(r.output[-2000:], flush=True)
    finally:
        walk.close()
    print(f"total {time.monotonic() - total:.1f}s")


if __name__ == "__main__":
    main()
