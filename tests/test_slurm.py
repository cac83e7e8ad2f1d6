"""The Slurm array template, run as Slurm would run it (array tasks with the variables Slurm
sets, then the merge), with `vllm serve` replaced by the scripted OpenAI-compatible test
server and, where the job itself does not matter, `factory` by a recorder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from distill_fixtures import ChainTeacher, fake_student, ok

from factory.testing.openai_server import OpenAIServer
from factory.warehouse import Warehouse

SLURM = Path(__file__).resolve().parent.parent / "jobs" / "slurm"
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PYTHONPATH = os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])

# `vllm serve MODEL [--served-model-name NAME...] [--lora-modules NAME=DIR] --port P ...`:
# records how it was started (vllm-<task>-<pid>.json, before binding, as vLLM logs its args),
# serves the test server on P with /v1/models listing the served names as vLLM does, and logs
# every request it answers to requests-<port>.jsonl. FAKE_RESPONDER=chain answers chains,
# FAKE_LATENCY delays each answer.
FAKE_VLLM = '''
import json, os, sys, time
from pathlib import Path
from factory.testing import openai_server

argv = sys.argv[1:]
assert argv[0] == "serve", argv
opts, key = {"model": [argv[1]]}, None
for a in argv[2:]:
    if a.startswith("--"):
        key = a[2:]
        opts.setdefault(key, [])
    elif key is not None:
        opts[key].append(a)
port = int(opts["port"][0])
names = opts.get("served-model-name") or opts["model"]
loras = [m.split("=", 1)[0] for m in opts.get("lora-modules", [])]
out = Path(os.environ["FAKE_DIR"])
record = {"t": time.time(), "pid": os.getpid(), "port": port, "names": names,
          "loras": loras, "argv": argv, "tp": opts["tensor-parallel-size"][0],
          "max_lora_rank": (opts.get("max-lora-rank") or [None])[0]}
(out / f"vllm-{os.environ['SLURM_ARRAY_TASK_ID']}-{os.getpid()}.json").write_text(
    json.dumps(record))

def do_GET(self):
    data = [{"id": n, "object": "model"} for n in names + loras]
    self._send(200, json.dumps({"object": "list", "data": data}).encode())

openai_server._Handler.do_GET = do_GET
if os.environ.get("FAKE_RESPONDER") == "chain":
    from distill_fixtures import ChainTeacher
    inner = ChainTeacher()
else:
    inner = openai_server.default_responder
log = open(out / f"requests-{port}.jsonl", "a", buffering=1)

def responder(body):
    log.write(json.dumps({"port": port, "model": body.get("model")}) + "\\n")
    return inner(body)

server = openai_server.OpenAIServer(responder, latency=float(os.environ.get("FAKE_LATENCY", 0)))
server.start(port=port)
time.sleep(3600)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def fakes(tmp_path: Path, real_factory: bool) -> dict[str, str]:
    """bin/ with the fake vllm, an nvidia-smi that lists 8 GPUs (the whole node), and either
    the real factory or a recorder (factory-args-<task>; `sql` prints FAKE_STUDENT_ROW)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "fake_vllm.py").write_text(FAKE_VLLM)
    executable(bin_dir / "vllm", f'#!/bin/sh\nPYTHONPATH="{PYTHONPATH}" exec "{sys.executable}"'
                                 f' "{tmp_path}/fake_vllm.py" "$@"\n')
    executable(bin_dir / "nvidia-smi", "#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do"
                                       ' echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done\n')
    if real_factory:
        executable(bin_dir / "factory", f'#!/bin/sh\nPYTHONPATH="{PYTHONPATH}" exec'
                                        f' "{sys.executable}" -m factory "$@"\n')
    else:
        executable(bin_dir / "factory", f'''#!/bin/sh
if [ "$3" = sql ]; then printf 'row\\n%s\\n' "$FAKE_STUDENT_ROW"; exit 0; fi
echo "$@" > "{tmp_path}/factory-args-$SLURM_ARRAY_TASK_ID"
''')
    warehouse = tmp_path / "factory.duckdb"
    if not warehouse.exists():
        warehouse.write_bytes(b"a warehouse")
    # nothing from the environment this test runs in (a GPU node, a Slurm job) leaks in
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("CUDA_VISIBLE_DEVICES", "GPUS", "SHARDS", "PORT", "STUDENT", "MODEL",
                         "FACTORY_JOB", "VLLM_ARGS", "EXTRA_ARGS")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "FACTORY_WAREHOUSE": str(warehouse), "SHARD_DIR": str(tmp_path / "shards"),
            "FACTORY_BIN": str(bin_dir / "factory"), "VLLM_BIN": str(bin_dir / "vllm"),
            "FAKE_DIR": str(tmp_path), "SERVER_WAIT": "120", "FACTORY_JOB": "describe-items",
            "MODEL": "m"}


def array_task(task: int, ids: range, job_id: int = 100) -> dict[str, str]:
    """The variables Slurm sets in task `task` of `sbatch --array=<ids>` (ids a range with a
    step): a re-submitted `--array=3` is range(3, 4)."""
    return {"SLURM_ARRAY_JOB_ID": str(job_id), "SLURM_JOB_ID": str(job_id + 1 + task),
            "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(ids[0]),
            "SLURM_ARRAY_TASK_MAX": str(ids[-1]), "SLURM_ARRAY_TASK_STEP": str(ids.step),
            "SLURM_ARRAY_TASK_COUNT": str(len(ids))}


def run_task(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SLURM / "teacher_array.sbatch")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def servers(tmp_path: Path, task: int) -> list[dict[str, Any]]:
    """How each `vllm serve` of a task was started, in order."""
    found = [json.loads(p.read_text()) for p in tmp_path.glob(f"vllm-{task}-*.json")]
    return sorted(found, key=lambda r: r["t"])


def job_arg(tmp_path: Path, task: int, flag: str) -> str:
    """The value of `flag` in the (recorded) job command of a task."""
    args = (tmp_path / f"factory-args-{task}").read_text().split()
    return args[args.index(flag) + 1]


def requests(tmp_path: Path, port: int) -> list[dict[str, Any]]:
    path = tmp_path / f"requests-{port}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_array_tasks_shard_the_student_and_merge(ml100k: Warehouse, tmp_path: Path) -> None:
    with OpenAIServer(ChainTeacher()) as server:
        ok(ml100k.path, "distill", "teach", "--dataset", "ml-100k", "--template",
           "three-step", "--teacher-url", server.url, "--teacher-model", "t", "--limit", "1")
    with ml100k.write() as con:
        chain_set = con.execute("select any_value(chain_set) from chains").fetchone()[0]
        model_id = fake_student(con, "distill-student-s", chain_set, tmp_path / "adapter")
    env = {**fakes(tmp_path, real_factory=True), "FACTORY_WAREHOUSE": str(ml100k.path),
           "GPUS": "1", "STUDENT": "distill-student-s", "DATASET": "ml-100k",
           "SPLITS": "test", "EXTRA_ARGS": "--limit 2", "FAKE_RESPONDER": "chain"}
    for task in (0, 1):      # a full --array=0-1, no SHARDS: the array says 2
        proc = run_task({**env, **array_task(task, range(2)), "PORT": str(free_port())},
                        tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        [vllm] = servers(tmp_path, task)
        args = " ".join(vllm["argv"])
        assert f"--lora-modules {model_id}={tmp_path / 'adapter'}" in args
        assert vllm["tp"] == "1" and vllm["max_lora_rank"] == "8"
        assert {r["model"] for r in requests(tmp_path, vllm["port"])} == {model_id}
    proc = subprocess.run(["bash", str(SLURM / "merge.sbatch")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no shard file" not in proc.stderr
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

    env = {**fakes(tmp_path, real_factory=True), **array_task(0, range(1)),
           "FACTORY_WAREHOUSE": str(ml100k.path), "GPUS": "1", "PORT": str(free_port()),
           "FACTORY_JOB": "describe-items --dataset ml-100k", "MODEL": "m",
           "EXTRA_ARGS": "--limit 600", "CONCURRENCY": "4", "FACTORY_STOP_GRACE": "2",
           "FAKE_LATENCY": "0.2"}
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


# -- re-submitting one task --------------------------------------------------------------------

@pytest.mark.parametrize("task", [0, 3])
def test_a_resubmitted_task_runs_its_own_shard_only(tmp_path: Path, task: int) -> None:
    """`sbatch --array=3` sets COUNT=1 and MIN=MAX=3: the shard count comes from SHARDS, and
    without it the task refuses, also for id 0, whose array 0-0 looks complete."""
    env = {**fakes(tmp_path, real_factory=False), **array_task(task, range(task, task + 1))}
    proc = run_task({**env, "SHARDS": "16"}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert job_arg(tmp_path, task, "--shard") == f"{task}/16"

    (tmp_path / f"factory-args-{task}").unlink()
    proc = run_task(env, tmp_path)                        # SHARDS forgotten
    assert proc.returncode != 0
    [line] = proc.stderr.splitlines()
    assert "SHARDS=16" in line                            # the count the job's tasks recorded
    assert not (tmp_path / f"factory-args-{task}").exists()
    assert len(servers(tmp_path, task)) == 1              # no server started for it


def test_a_full_array_needs_no_shard_count_and_a_partial_one_does(tmp_path: Path) -> None:
    env = fakes(tmp_path, real_factory=False)
    proc = run_task({**env, **array_task(5, range(16))}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert job_arg(tmp_path, 5, "--shard") == "5/16"

    for ids in (range(0, 16, 2), range(1, 16)):          # --array=0-15:2, --array=1-15
        other = tmp_path / f"other-{ids.step}-{ids[0]}"
        other.mkdir()
        proc = run_task({**env, **array_task(4 if ids.step == 2 else 1, ids),
                         "SHARD_DIR": str(other / "shards")}, other)
        assert proc.returncode != 0
        [line] = proc.stderr.splitlines()
        assert "set SHARDS" in line


def test_a_task_outside_the_shard_count_is_refused(tmp_path: Path) -> None:
    env = {**fakes(tmp_path, real_factory=False), **array_task(16, range(16, 17))}
    proc = run_task({**env, "SHARDS": "16"}, tmp_path)
    assert proc.returncode != 0 and "not a shard of 16" in proc.stderr
    assert not list(tmp_path.glob("vllm-*.json"))


def test_submit_hands_the_shard_count_to_the_tasks_and_the_merge(tmp_path: Path) -> None:
    env = fakes(tmp_path, real_factory=False)
    executable(tmp_path / "bin" / "sbatch", f'''#!/bin/sh
echo "SHARDS=$SHARDS $*" >> "{tmp_path}/sbatch.log"
echo 42
''')
    proc = subprocess.run(["bash", str(SLURM / "submit.sh"), "16"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    array, merge = (tmp_path / "sbatch.log").read_text().splitlines()
    assert array.startswith("SHARDS=16 ") and "--array=0-15" in array
    assert merge.startswith("SHARDS=16 ") and "afterany:42" in merge


def test_merge_names_the_shards_that_never_ran(tmp_path: Path) -> None:
    env = {**fakes(tmp_path, real_factory=False), "SHARDS": "4"}
    (tmp_path / "shards").mkdir()
    for i in (0, 2):
        (tmp_path / "shards" / f"shard-{i}.duckdb").write_bytes(b"")
    proc = subprocess.run(["bash", str(SLURM / "merge.sbatch")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    # what exists is merged (the fake factory ran), but the job fails: afterok must not go on
    assert proc.returncode == 1, proc.stderr
    assert "task(s) 1 3 of 4" in proc.stderr and "--array=1,3 " in proc.stderr


# -- two tasks on one node ---------------------------------------------------------------------

def test_two_tasks_on_one_node_each_use_their_own_server(ml100k: Warehouse,
                                                         tmp_path: Path) -> None:
    """Both tasks start from the same port (as both used 8000): the second must not take the
    first's server for its own, nor send it a single request."""
    port = free_port()
    env = {**fakes(tmp_path, real_factory=True), "FACTORY_WAREHOUSE": str(ml100k.path),
           "GPUS": "1", "PORT": str(port), "SHARDS": "2",
           "FACTORY_JOB": "describe-items --dataset ml-100k", "EXTRA_ARGS": "--limit 2"}
    first = subprocess.Popen(["bash", str(SLURM / "teacher_array.sbatch")], cwd=tmp_path,
                             env={**env, **array_task(0, range(2))}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:                  # the second task starts once the first's server listens
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    second = run_task({**env, **array_task(1, range(2))}, tmp_path)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert second.returncode == 0, second.stdout + second.stderr
    [a], [b] = servers(tmp_path, 0), servers(tmp_path, 1)
    assert a["port"] == port and b["port"] != port
    assert a["names"][0] == b["names"][0] == "m" and a["names"][1] != b["names"][1]
    for server in (a, b):        # two items each, asked of its own task's server by name
        assert [r["model"] for r in requests(tmp_path, server["port"])] == ["m", "m"]


def test_a_port_taken_as_the_server_starts_is_given_up(tmp_path: Path) -> None:
    """A port nothing listens on yet that vLLM still cannot bind (another server between the
    check and the bind): the task starts the server again on another port."""
    env = {**fakes(tmp_path, real_factory=False), **array_task(0, range(1))}
    with socket.socket() as held:           # bound, not listening: connect fails, bind too
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        proc = run_task({**env, "PORT": str(port)}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    first, second = servers(tmp_path, 0)
    assert first["port"] == port and second["port"] > port
    assert job_arg(tmp_path, 0, "--teacher-url") == f"http://127.0.0.1:{second['port']}/v1"


# -- GPUs and LoRA rank ------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "tp"), [
    ({"CUDA_VISIBLE_DEVICES": "3"}, "1"),                     # --gres=gpu:1, no device cgroup
    ({"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b", "SLURM_GPUS_ON_NODE": "2"}, "2"),
    ({"SLURM_GPUS_ON_NODE": "4"}, "4"),
    ({"SLURM_JOB_GPUS": "2,5"}, "2"),
    ({}, "1"),
    ({"GPUS": "2", "CUDA_VISIBLE_DEVICES": "0"}, "2"),        # GPUS overrides
])
def test_tensor_parallel_size_is_the_gpus_the_job_was_given(tmp_path: Path, given: dict[str, str],
                                                            tp: str) -> None:
    """nvidia-smi lists the node's 8 GPUs; the job was given fewer."""
    env = {**fakes(tmp_path, real_factory=False), **array_task(0, range(1)), **given}
    proc = run_task(env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    [server] = servers(tmp_path, 0)
    assert server["tp"] == tp


@pytest.mark.parametrize(("rank", "served"), [("100", "128"), ("300", "320"), ("512", "512"),
                                              ("513", None)])
def test_the_lora_rank_limit_holds_the_adapter(tmp_path: Path, rank: str,
                                               served: str | None) -> None:
    env = {**fakes(tmp_path, real_factory=False), **array_task(0, range(1)),
           "STUDENT": "distill-student-s", "DATASET": "ml-100k",
           "FAKE_STUDENT_ROW": f"/models/base\t{tmp_path}/adapter\tstudent/s\t{rank}"}
    proc = run_task(env, tmp_path)
    if served is None:
        assert proc.returncode != 0
        [line] = proc.stderr.splitlines()
        assert "rank '513'" in line and "512" in line
        assert not list(tmp_path.glob("vllm-*.json"))
    else:
        assert proc.returncode == 0, proc.stderr
        [server] = servers(tmp_path, 0)
        assert server["max_lora_rank"] == served and server["loras"] == ["student/s"]
