"""`factory embed-steps`: H_i matrices through the shared embedding cache, their files,
index and manifest, and the errors for stale, foreign or incomplete caches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from distill_fixtures import ChainTeacher, error_of, ok

from factory.distill import find_step_cache
from factory.embeddings import Embedder
from factory.errors import FactoryError
from factory.step_cache import open_cache
from factory.testing.openai_server import OpenAIServer
from factory.warehouse import Warehouse

pytestmark = pytest.mark.slow  # the embedded MiniLM encoder, a few dozen short texts


@pytest.fixture()
def chains(ml100k: Warehouse) -> tuple[Warehouse, str, ChainTeacher]:
    """Teacher chains (three-step) for 5 training sequences; returns the --chains spec."""
    teacher = ChainTeacher()
    with OpenAIServer(teacher) as server:
        ok(ml100k.path, "distill", "teach", "--dataset", "ml-100k", "--template", "three-step",
           "--teacher-url", server.url, "--teacher-model", "t", "--limit", "5")
    with ml100k.read() as con:
        run = con.execute("select run_id from job_runs where job = 'distill-teach'").fetchone()
    return ml100k, f"teacher:{run[0]}", teacher


def latest_cache(wh: Warehouse) -> tuple:
    with wh.read() as con:
        return con.execute("select cache_id, dir, encoder, dim, k, dtype, rows, n_steps,"
                           " n_unique, checksum from step_caches order by created_at desc"
                           " limit 1").fetchone()


def test_h_matrices_are_the_encoder_vectors_of_each_step(chains, tmp_path: Path) -> None:
    wh, spec, _ = chains
    ok(wh.path, "embed-steps", "--dataset", "ml-100k", "--chains", spec, "--dtype", "float32",
       "--whole-chain")
    cache_id, directory, encoder, dim, k, dtype, rows, n_steps, n_unique, checksum = \
        latest_cache(wh)
    assert (dim, k, dtype, json.loads(rows), n_steps) == (384, 3, "float32", {"train": 5}, 15)
    assert Path(directory) == wh.path.parent / "factory.files" / "steps" / cache_id
    cache = open_cache(Path(directory), encoder)
    m = cache.manifest
    assert (m["K"], m["D"], m["encoder"], m["template"], m["chain_source"], m["checksum"]) == (
        3, 384, encoder, "three-step", "teacher", checksum)
    assert m["template_steps"] == ["User Profile Summary", "User Interest Extraction",
                                   "Item Recommendation"]
    assert m["counts"]["sequences"] == 5 and set(m["files"]) == {
        "train.H.npy", "train.users.parquet", "train.chain.npy"}
    with wh.read() as con:
        kept = con.execute("select user_id, steps from chains order by user_id").fetchall()
        index = con.execute("select user_id, file, row from step_embeddings"
                            " where cache_id = ? order by row", [cache_id]).fetchall()
    users = cache.users("train")
    assert [u for u, _, _ in index] == users and {f for _, f, _ in index} == {"train.H.npy"}
    expected = Embedder(None).embed([t for _, steps in kept for t in steps]).reshape(5, 3, 384)
    got = cache.gather("train", [u for u, _ in kept])
    assert got.shape == (5, 3, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)   # row j = SentenceEncoder(c_ij)
    whole = cache.gather_chain("train", [kept[0][0]])
    np.testing.assert_allclose(whole[0], Embedder(None).embed(["\n\n".join(kept[0][1])])[0],
                               atol=1e-5)
    with pytest.raises(FactoryError, match="has no train chain for 1 sequence"):
        cache.gather("train", ["no-such-user"])
    with pytest.raises(FactoryError, match="has no 'test' part"):
        cache.matrix("test")


def test_identical_steps_are_encoded_once_and_reruns_hit_the_cache(ml100k: Warehouse) -> None:
    teacher = ChainTeacher()
    teacher.mode = "same"         # every chain has the same three step texts
    with OpenAIServer(teacher) as server:
        ok(ml100k.path, "distill", "teach", "--dataset", "ml-100k", "--template",
           "three-step", "--teacher-url", server.url, "--teacher-model", "t", "--limit", "4")
    with ml100k.read() as con:
        spec = "teacher:" + con.execute("select run_id from job_runs").fetchall()[-1][0]
    ok(ml100k.path, "embed-steps", "--dataset", "ml-100k", "--chains", spec)
    with ml100k.read() as con:
        counts = json.loads(con.execute("select counts from job_runs where job = 'embed-steps'"
                                        ).fetchone()[0])
    assert (counts["steps"], counts["unique_texts"], counts["encoded"]) == (12, 3, 3)
    ok(ml100k.path, "embed-steps", "--dataset", "ml-100k", "--chains", spec)
    with ml100k.read() as con:
        again = json.loads(con.execute("select counts from job_runs where job = 'embed-steps'"
                                       " order by started_at desc limit 1").fetchone()[0])
    assert (again["encoded"], again["cache_hits"]) == (0, 3)
    _, directory, *_ = latest_cache(ml100k)
    h = np.load(Path(directory) / "train.H.npy")
    assert h.dtype == np.float16 and h.shape == (4, 3, 384)   # float16 by default
    assert np.allclose(h[0], h[3])


def test_stale_foreign_and_incomplete_caches_are_refused(chains, tmp_path: Path) -> None:
    wh, spec, _ = chains
    out = tmp_path / "cache"
    ok(wh.path, "embed-steps", "--dataset", "ml-100k", "--chains", spec, "--out", str(out))
    cache_id, directory, encoder, *_ = latest_cache(wh)
    assert Path(directory) == out
    with wh.read() as con:
        assert find_step_cache(con, spec, "ml-100k", encoder).manifest["cache_id"] == cache_id
        with pytest.raises(FactoryError, match="built with encoder .* not other-encoder"):
            find_step_cache(con, spec, "ml-100k", "other-encoder")

    # the same directory again: --replace needed; a cache of another encoder says so
    assert f"{out} exists; pass --replace" in error_of(
        wh.path, "embed-steps", "--dataset", "ml-100k", "--chains", spec, "--out", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "encoder": "e5-large"}))
    assert "holds step embeddings from encoder 'e5-large'" in error_of(
        wh.path, "embed-steps", "--dataset", "ml-100k", "--chains", spec, "--out", str(out))
    with pytest.raises(FactoryError, match="was built with encoder 'e5-large', not"):
        open_cache(out, encoder)
    (out / "manifest.json").write_text(json.dumps(manifest))

    # a modified file, a missing file
    h = np.load(out / "train.H.npy")
    np.save(out / "train.H.npy", h * 2)
    with pytest.raises(FactoryError, match="is stale: train.H.npy does not match"):
        open_cache(out)
    (out / "train.H.npy").unlink()
    with pytest.raises(FactoryError, match="is incomplete: train.H.npy is missing"):
        open_cache(out)
    with pytest.raises(FactoryError, match="is not a step cache"):
        open_cache(tmp_path)

    # chains that changed after embedding make the cache stale
    ok(wh.path, "embed-steps", "--dataset", "ml-100k", "--chains", spec, "--out", str(out),
       "--replace")
    with wh.write() as con:
        con.execute("update chains set steps = ['a', 'b', 'c'] where user_id ="
                    " (select min(user_id) from chains)")
    with wh.read() as con, pytest.raises(FactoryError, match="is stale: the chains of"):
        find_step_cache(con, spec, "ml-100k")
    assert "--dtype must be float16 or float32" in error_of(
        wh.path, "embed-steps", "--dataset", "ml-100k", "--chains", spec, "--dtype", "int8")
