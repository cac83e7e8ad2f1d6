"""The Slurm array template, run as Slurm would run it (two array tasks, then the merge), with
`vllm serve` replaced by the scripted OpenAI-compatible test server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from distill_fixtures import ChainTeacher, fake_student, ok

from factory.testing.openai_server import OpenAIServer
from factory.warehouse import Warehouse

SLURM = Path(__file__).resolve().parent.parent / "jobs" / "slurm"
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.mark.slow
def test_array_tasks_shard_the_student_and_merge(ml100k: Warehouse, tmp_path: Path) -> None:
    with OpenAIServer(ChainTeacher()) as server:
        ok(ml100k.path, "distill", "teach", "--dataset", "ml-100k", "--template",
           "three-step", "--teacher-url", server.url, "--teacher-model", "t", "--limit", "1")
    with ml100k.write() as con:
        chain_set = con.execute("select any_value(chain_set) from chains").fetchone()[0]
        model_id = fake_student(con, "distill-student-s", chain_set, tmp_path / "adapter")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(root), str(TESTS), os.environ.get("PYTHONPATH", "")])
    executable(bin_dir / "factory", f'#!/bin/sh\nPYTHONPATH="{path}" exec "{sys.executable}"'
                                    ' -m factory "$@"\n')
    # `vllm serve BASE ... --port P ...`: the scripted server, logging what it was asked
    executable(bin_dir / "vllm", f'''#!/bin/sh
echo "$@" > "{tmp_path}/vllm-args-$SLURM_ARRAY_TASK_ID"
while [ "$1" != "--port" ]; do shift; done
PYTHONPATH="{path}" exec "{sys.executable}" -c "
import time
from distill_fixtures import ChainTeacher
from factory.testing.openai_server import OpenAIServer
OpenAIServer(ChainTeacher()).start(port=$2)
time.sleep(3600)"
''')
    env = {**os.environ, "FACTORY_WAREHOUSE": str(ml100k.path),
           "SHARD_DIR": str(tmp_path / "shards"), "FACTORY_BIN": str(bin_dir / "factory"),
           "VLLM_BIN": str(bin_dir / "vllm"), "GPUS": "1", "SLURM_ARRAY_TASK_COUNT": "2",
           "SLURM_JOB_ID": "7", "STUDENT": "distill-student-s", "DATASET": "ml-100k",
           "SPLITS": "test", "EXTRA_ARGS": "--limit 2", "SERVER_WAIT": "120"}
    for task in ("0", "1"):
        proc = subprocess.run(["bash", str(SLURM / "teacher_array.sbatch")], cwd=tmp_path,
                              env={**env, "SLURM_ARRAY_TASK_ID": task, "PORT": str(free_port())},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        args = (tmp_path / f"vllm-args-{task}").read_text()
        assert f"--lora-modules {model_id}={tmp_path / 'adapter'}" in args
        assert "--tensor-parallel-size 1" in args and "--max-lora-rank 8" in args
    proc = subprocess.run(["bash", str(SLURM / "merge.sbatch")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with ml100k.read() as con:
        rows = con.execute("select user_id, verdict, model from chains where source ="
                           " 'student' order by user_id").fetchall()
        runs = con.execute("select params->'teacher'->>'shard' from job_runs where job ="
                           " 'distill-generate' order by 1").fetchall()
    assert len(rows) == 4 and len({u for u, _, _ in rows}) == 4   # disjoint shards
    assert {(v, m) for _, v, m in rows} == {("kept", model_id)}
    assert runs == [("0/2",), ("1/2",)]


def test_a_time_limited_task_passes_sigterm_to_the_job(ml100k: Warehouse, tmp_path: Path) -> None:
    """Slurm signals the batch shell (--signal=B:TERM@120); the shell hands SIGTERM to the job,
    which stores what came back, marks its run interrupted and exits 143."""
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    executable(bin_dir / "factory", f'#!/bin/sh\nPYTHONPATH="{path}" exec "{sys.executable}"'
                                    ' -m factory "$@"\n')
    executable(bin_dir / "vllm", f'''#!/bin/sh
while [ "$1" != "--port" ]; do shift; done
PYTHONPATH="{path}" exec "{sys.executable}" -c "
import time
from factory.testing.openai_server import OpenAIServer
OpenAIServer(latency=0.2).start(port=$2)
time.sleep(3600)"
''')
    env = {**os.environ, "FACTORY_WAREHOUSE": str(ml100k.path),
           "SHARD_DIR": str(tmp_path / "shards"), "FACTORY_BIN": str(bin_dir / "factory"),
           "VLLM_BIN": str(bin_dir / "vllm"), "GPUS": "1", "SLURM_ARRAY_TASK_COUNT": "1",
           "SLURM_ARRAY_TASK_ID": "0", "SLURM_JOB_ID": "8", "PORT": str(free_port()),
           "FACTORY_JOB": "describe-items --dataset ml-100k", "MODEL": "m",
           "EXTRA_ARGS": "--limit 600", "SERVER_WAIT": "120", "CONCURRENCY": "4",
           "FACTORY_STOP_GRACE": "2"}
    task = subprocess.Popen(["bash", str(SLURM / "teacher_array.sbatch")], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    journal = tmp_path / "shards"
    deadline = time.monotonic() + 120
    while not list(journal.glob("*.files/journal/*.jsonl")):
        assert task.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(2)
    task.send_signal(signal.SIGTERM)
    out, _ = task.communicate(timeout=60)
    assert task.returncode == 143, out
    assert "interrupted (SIGTERM)" in out
    shard = next(journal.glob("*.duckdb"))
    with Warehouse(shard).read() as con:
        status, ok_items = con.execute(
            "select status, counts->>'ok' from job_runs where job = 'describe-items'").fetchone()
    assert status == "interrupted" and 0 < int(ok_items) < 600
