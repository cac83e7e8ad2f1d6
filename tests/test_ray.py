"""`--executor ray`: a teacher job's shards as tasks of a local Ray on this CPU machine, with the
scripted OpenAI-compatible server standing in for vLLM. One Ray session serves the module
(ray.init takes about 10 s); the driver runs in-process and finds it already started."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_data import add_dataset
from typer.testing import CliRunner

from factory.cli import app
from factory.errors import FactoryError
from factory.teacher.ray_executor import job_name, last_error_line, split_command
from factory.testing.openai_server import OpenAIServer, default_responder
from factory.warehouse import Warehouse

ROOT = Path(__file__).resolve().parent.parent
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install "
                               "'factory[ray]'); the --executor ray tests need it")
runner = CliRunner()
DATASET = "ml-100k-40"
#: every row column but run_id: which shard's run wrote a row is the only allowed difference
ROW_SQL = ("select item_id, description, work_key, call_key, prompt_name, prompt_hash, backend,"
           " model, sample, draws, cached, status, error from item_descriptions"
           f" where dataset = '{DATASET}' order by item_id")


def cli(path: Path, *args: str) -> object:
    return runner.invoke(app, ["--warehouse", str(path), "describe-items", "--dataset", DATASET,
                               "--teacher-model", "test-model", "--attempts", "1", *args])


def rows(path: Path, sql: str = ROW_SQL) -> list[tuple]:
    with Warehouse(path).read() as con:
        return con.execute(sql).fetchall()


@pytest.fixture(scope="module")
def base(ml100k_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(ml100k_warehouse, tmp_path_factory)


def make_base(ml100k_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ml-100k plus its first 40 items as their own dataset: the whole job is 40 requests (a
    run with --limit would differ by design: the limit applies per shard, as with Slurm)."""
    path = tmp_path_factory.mktemp("ray") / "base.duckdb"
    shutil.copy(ml100k_warehouse, path)
    with Warehouse(path).read() as con:
        seqs = con.execute(
            "select user_id, list(item_id order by position) from interactions"
            " where dataset = 'ml-100k' and try_cast(item_id as int) <= 40 group by 1").fetchall()
        titles = dict(con.execute("select item_id, title from items where dataset = 'ml-100k'"
                                  " and try_cast(item_id as int) <= 40").fetchall())
    add_dataset(Warehouse(path), DATASET, dict(seqs), titles)
    return path


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer() as s:
        yield s


@pytest.fixture(scope="module")
def reference(base: Path, server: OpenAIServer,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tuple], set[str]]:
    """The single-machine run: its rows, and the prompts whose work falls in shard 1 of 3."""
    path = tmp_path_factory.mktemp("single") / "single.duckdb"
    shutil.copy(base, path)
    result = cli(path, "--teacher-url", server.url)
    assert result.exit_code == 0, result.output
    server.reset()
    shard1 = {r[0] for r in rows(path, (
        "select c.request->'messages'->-1->>'content' from item_descriptions d join llm_calls c"
        " on c.key = d.work_key where ('0x' || left(d.work_key, 16))::ubigint % 3 = 1"))}
    return rows(path), shard1


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    if not HAVE_RAY:
        pytest.skip("ray is not installed (pip install 'factory[ray]')")
    import ray

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "FACTORY_STOP_GRACE")}
    # Ray's workers inherit this environment: the shards import this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved["PYTHONPATH"]]))
    os.environ["FACTORY_STOP_GRACE"] = "1"
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             object_store_memory=80 * 1024**2)
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fresh(base: Path, tmp_path: Path) -> Path:
    path = tmp_path / "factory.duckdb"
    shutil.copy(base, path)
    return path


@needs_ray
def test_ray_shards_give_the_single_machine_rows_and_rerun_from_cache(
        ray_session: None, base: Path, server: OpenAIServer, reference: tuple, tmp_path: Path):
    expected, _ = reference
    main = fresh(base, tmp_path)
    result = cli(main, "--teacher-url", server.url, "--executor", "ray", "--shards", "3")
    assert result.exit_code == 0, result.output
    for i in range(3):
        assert f"shard {i}/3 ok" in result.output
    assert rows(main) == expected
    assert server.count() == len(expected)             # each item asked once, none twice
    runs = rows(main, "select params->'teacher'->>'shard', status, params->'teacher' from"
                      " job_runs where job = 'describe-items' order by 1")
    assert [r[:2] for r in runs] == [("0/3", "succeeded"), ("1/3", "succeeded"),
                                     ("2/3", "succeeded")]
    assert all('"executor"' not in r[2] for r in runs)  # provenance as a local run's
    shard_dirs = list((tmp_path / "factory.files" / "shards").iterdir())
    assert len(shard_dirs) == 1 and shard_dirs[0].name.startswith("describe-items-")

    server.reset()
    again = cli(main, "--teacher-url", server.url, "--executor", "ray", "--shards", "3")
    assert again.exit_code == 0, again.output
    assert server.count() == 0                          # the shard files are reused
    assert rows(main) == expected


@needs_ray
def test_a_failed_shard_is_named_and_a_rerun_pays_only_for_it(
        ray_session: None, base: Path, server: OpenAIServer, reference: tuple, tmp_path: Path):
    expected, shard1 = reference
    assert 0 < len(shard1) < len(expected)
    main = fresh(base, tmp_path)

    def down_for_shard_1(body: dict) -> str:
        if body["messages"][-1]["content"] in shard1:
            raise RuntimeError("GPU node lost")         # the server answers 500
        return default_responder(body)

    server.responder = down_for_shard_1
    try:
        result = cli(main, "--teacher-url", server.url, "--executor", "ray", "--shards", "3")
    finally:
        server.responder = default_responder
    assert isinstance(result.exception, FactoryError), result.output
    assert str(result.exception).startswith("1 of 3 shard(s) failed: 1/3 (logs: ")
    assert "shard 0/3 ok" in result.output and "shard 2/3 ok" in result.output
    assert "shard 1/3 failed (exit 1): error: describe-items: all " in result.output
    merged = rows(main)                               # the others (and the failures) merged
    assert len(merged) == len(expected)
    assert sum(r[11] == "failed" for r in merged) == len(shard1)

    server.reset()
    fixed = cli(main, "--teacher-url", server.url, "--executor", "ray", "--shards", "3")
    assert fixed.exit_code == 0, fixed.output
    assert server.count() == len(shard1)               # only the missing items are paid for
    assert rows(main) == expected


def test_refusals_are_one_line(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    main = fresh(base, tmp_path)
    url = ("--teacher-url", "http://127.0.0.1:9/v1")
    for args, line in [
        (("--executor", "ray", "--shards", "0"), "--shards 0: needs at least 1 shard"),
        (("--executor", "ray", "--shards", "2", "--shard", "0/2"),
         "--executor ray runs every shard itself: drop --shard i/N"),
        (("--executor", "ray"), "--executor ray needs --shards N"),
        (("--shards", "2"), "--shards needs --executor ray (one process runs one shard with "
                            "--shard i/N)"),
    ]:
        result = cli(main, *url, *args)
        assert isinstance(result.exception, FactoryError), result.output
        assert str(result.exception) == line
    monkeypatch.setitem(__import__("sys").modules, "ray", None)     # `import ray` fails
    result = cli(main, *url, "--executor", "ray", "--shards", "2")
    assert str(result.exception) == "--executor ray needs Ray: pip install 'factory[ray]'"
    assert not (tmp_path / "factory.files").exists()    # nothing was copied


def test_each_shard_runs_the_users_command_on_its_own_file():
    argv = ["--warehouse=/w/main.duckdb", "distill", "teach", "--dataset", "x",
            "--executor=ray", "--shards", "4", "--ray-gpus-per-shard", "1", "--limit", "3"]
    command = split_command(argv)
    assert command == ["distill", "teach", "--dataset", "x", "--limit", "3"]
    assert split_command(["--warehouse", "/w/m.duckdb", *command]) == command
    assert job_name(command) == "distill-teach"
    assert last_error_line("progress\nerror: unknown dataset 'x'\n\n") == (
        "error: unknown dataset 'x'")


def test_operational_options_keep_the_shard_folder(tmp_path: Path) -> None:
    from factory.teacher.ray_executor import shard_folder

    wh = tmp_path / "w.duckdb"
    cmd = ["describe-items", "--dataset", "d", "--limit", "20"]
    same = shard_folder(wh, "describe-items", cmd, 3)
    assert shard_folder(wh, "describe-items", [*cmd, "--concurrency", "64", "--rpm=100"],
                        3) == same
    assert shard_folder(wh, "describe-items", cmd[:-1] + ["30"], 3) != same
    assert shard_folder(wh, "describe-items", cmd, 4) != same


def test_an_unreachable_ray_address_is_one_line_in_seconds() -> None:
    """ray.init retries an address where nothing listens for ever; the driver asks first."""
    import socket

    from factory.teacher.ray_executor import probe_address

    with socket.socket() as s:            # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FactoryError, match=f"nothing answers at 127.0.0.1:{port}"):
        probe_address(f"127.0.0.1:{port}")
    with pytest.raises(FactoryError, match="expected host:port"):
        probe_address("nonsense")
    probe_address("auto")                 # left to Ray
