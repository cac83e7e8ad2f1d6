"""End to end on a tiny dataset: student chains for every sequence -> embed-steps ->
`factory export cache --chains` -> H_i aligned with the cache rows -> `python -m train`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from distill_fixtures import ChainTeacher, error_of, fake_student, ok, tiny_table_dataset

from factory.testing.openai_server import OpenAIServer
from factory.warehouse import Warehouse

pytestmark = pytest.mark.slow  # the embedded MiniLM encoder


@pytest.fixture()
def tiny(tmp_path: Path) -> Warehouse:
    return tiny_table_dataset(tmp_path)


def test_exported_steps_are_aligned_with_the_rows(tiny: Warehouse, tmp_path: Path) -> None:
    with OpenAIServer(ChainTeacher()) as server:
        ok(tiny.path, "distill", "teach", "--dataset", "tiny", "--template", "two-step",
           "--teacher-url", server.url, "--teacher-model", "t")
        with tiny.write() as con:
            chain_set = con.execute("select any_value(chain_set) from chains").fetchone()[0]
            fake_student(con, "distill-student-t", chain_set, tmp_path / "adapter",
                         dataset="tiny")
        ok(tiny.path, "distill", "generate", "--dataset", "tiny", "--student",
           "distill-student-t", "--teacher-url", server.url, "--splits", "train,valid")
        spec = "student:distill-student-t"
        ok(tiny.path, "embed-steps", "--dataset", "tiny", "--chains", spec)
        # test chains are missing: the export says which and what to run
        message = error_of(tiny.path, "export", "cache", "--dataset", "tiny", "--chains", spec,
                           "--out", str(tmp_path / "c"))
        assert "has no test chain for 6 sequence(s)" in message
        assert "distill generate" in message
        ok(tiny.path, "distill", "generate", "--dataset", "tiny", "--student",
           "distill-student-t", "--teacher-url", server.url)
    # new chains since the last embedding: the cache is stale until embedded again
    assert "is stale: the chains of student:distill-student-t changed" in error_of(
        tiny.path, "export", "cache", "--dataset", "tiny", "--chains", spec, "--out",
        str(tmp_path / "c"))
    ok(tiny.path, "embed-steps", "--dataset", "tiny", "--chains", spec)
    assert "built with encoder" in error_of(
        tiny.path, "export", "cache", "--dataset", "tiny", "--chains", spec, "--out",
        str(tmp_path / "c"), "--step-encoder", "some/other-encoder")
    out = tmp_path / "cache"
    ok(tiny.path, "export", "cache", "--dataset", "tiny", "--chains", spec, "--out", str(out))

    manifest = json.loads((out / "manifest.json").read_text())
    steps = manifest["steps"]
    assert (steps["K"], steps["D"], steps["template"], steps["chain_source"]) == (
        2, 384, "two-step", "student")
    with tiny.read() as con:
        cache_dir = con.execute("select dir from step_caches order by created_at desc limit 1"
                                ).fetchone()[0]
    for part in ("train", "valid", "test"):
        h = np.load(out / f"{part}.steps.npy")
        users = pq.read_table(out / f"{part}.users.parquet")["user_id"].to_pylist()
        own = np.load(Path(cache_dir) / f"{part}.H.npy")
        own_users = pq.read_table(Path(cache_dir) / f"{part}.users.parquet")[
            "user_id"].to_pylist()
        assert h.shape == (len(users), 2, 384) and len(users) == 6
        for row, user in enumerate(users):
            np.testing.assert_array_equal(h[row], own[own_users.index(user)])
    # train/ consumes it: SCoTER fusion over these H matrices, one tiny epoch
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--cache", str(out), "--fusion", "scoter", "--epochs",
         "1", "--dim", "16", "--layers", "1", "--heads", "1", "--fusion-heads", "1",
         "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
