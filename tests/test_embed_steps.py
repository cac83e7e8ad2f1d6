"""`factory embed-steps`: H_i matrices through the shared embedding cache, their files,
index and manifest, texts cut by the encoder's token limit, teacher chains for every part
(Table 4 "w/o Student Distill"), and the errors for stale, foreign or incomplete caches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from distill_fixtures import ChainTeacher, error_of, ok, tiny_table_dataset
from tiny_data import fake_encode

from factory.distill import find_step_cache
from factory.embeddings import Embedder
from factory.errors import FactoryError
from factory.step_cache import open_cache
from factory.testing.openai_server import OpenAIServer
from factory.warehouse import Warehouse

# tests marked slow run the embedded MiniLM encoder on a few dozen short texts; the others a
# fake sentence-transformers model (whitespace tokens, a token limit, hash vectors)


class FakeTokenizer:
    """Words as tokens, plus [CLS] and [SEP]."""

    def __call__(self, texts, add_special_tokens=True, truncation=False, verbose=True):
        assert truncation is False
        return {"input_ids": [[0] * (len(t.split()) + 2 * add_special_tokens) for t in texts]}


class FakeSentenceTransformer:
    """Stands in for sentence_transformers.SentenceTransformer: limit 8 tokens, positions 64."""

    loaded: list[FakeSentenceTransformer] = []

    def __init__(self, source, device=None):
        self.max_seq_length = 8
        self.tokenizer = FakeTokenizer()
        self.transformers_model = SimpleNamespace(
            config=SimpleNamespace(max_position_embeddings=64))
        FakeSentenceTransformer.loaded.append(self)

    def encode(self, texts, **kw):
        return fake_encode(list(texts))

    def get_sentence_embedding_dimension(self):
        return 8


@pytest.fixture()
def fake_st(monkeypatch: pytest.MonkeyPatch) -> type[FakeSentenceTransformer]:
    import sentence_transformers

    FakeSentenceTransformer.loaded = []
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", FakeSentenceTransformer)
    return FakeSentenceTransformer


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def fake_tokens(text: str) -> int:
    return len(text.strip().split()) + 2


def test_texts_longer_than_the_token_limit_are_counted(chains, fake_st) -> None:
    """MiniLM reads 256 tokens and drops the rest without a word: the run says how many step
    texts and whole chains were cut, and --max-seq-length moves the limit."""
    wh, spec, _ = chains
    result = ok(wh.path, "embed-steps", "--dataset", "ml-100k", "--chains", spec,
                "--whole-chain")
    with wh.read() as con:
        kept = con.execute("select steps from chains where verdict = 'kept'").fetchall()
        run = json.loads(con.execute("select counts from job_runs where job = 'embed-steps'"
                                     ).fetchone()[0])
    texts = {t for (steps,) in kept for t in steps}
    long_steps = sum(fake_tokens(t) > 8 for t in texts)
    assert 0 < long_steps < len(texts)               # the fake limit cuts some, not all
    _, directory, encoder, *_ = latest_cache(wh)
    m = json.loads((Path(directory) / "manifest.json").read_text())
    assert m["max_seq_length"] == 8 and encoder == m["encoder"] and "@" not in encoder
    assert (m["counts"]["truncated_steps"], m["counts"]["truncated_chains"]) == (long_steps, 5)
    assert (run["truncated_steps"], run["max_seq_length"]) == (long_steps, 8)
    out = " ".join(result.output.split())
    assert f"cut at 8 tokens: {long_steps} of {len(texts)} distinct step texts, 5 of 5 whole" \
        in out and "raise --max-seq-length" in out

    # a longer limit: nothing cut, the model reads 64 tokens, and the vectors are cached apart
    ok(wh.path, "embed-steps", "--dataset", "ml-100k", "--chains", spec, "--whole-chain",
       "--max-seq-length", "64")
    _, directory, encoder64, *_ = latest_cache(wh)
    m = json.loads((Path(directory) / "manifest.json").read_text())
    assert (m["max_seq_length"], m["counts"]["truncated_steps"],
            m["counts"]["truncated_chains"]) == (64, 0, 0)
    assert encoder64 == f"{encoder}@64tok" and fake_st.loaded[-1].max_seq_length == 64
    assert m["counts"]["cache_hits"] == 0            # not the 8-token vectors
    assert "has position embeddings for 64 tokens at most" in error_of(
        wh.path, "embed-steps", "--dataset", "ml-100k", "--chains", spec,
        "--max-seq-length", "65")


@pytest.mark.slow
def test_minilm_reads_256_tokens_unless_told_otherwise() -> None:
    """The real encoder: what follows token 256 does not reach the vector, unless the limit is
    raised (its positions allow 512)."""
    a, b = "x " * 300 + "cats", "x " * 300 + "dogs"
    default = Embedder(None)
    assert default.max_seq_length == 256 and default.count_truncated([a, "short"]) == 1
    va, vb = default.embed([a, b])
    np.testing.assert_allclose(va, vb, atol=1e-6)    # the endings were cut
    longer = Embedder(None, max_seq_length=512)
    assert longer.encoder_id == f"{default.encoder_id}@512tok"
    assert longer.count_truncated([a, "short"]) == 0
    va, vb = longer.embed([a, b])
    assert not np.allclose(va, vb, atol=1e-4)
    assert Embedder(None, max_seq_length=256).encoder_id == default.encoder_id


@pytest.fixture()
def tiny(tmp_path: Path) -> Warehouse:
    return tiny_table_dataset(tmp_path)


def test_teacher_chains_for_every_part_feed_the_training_cache(tiny: Warehouse, fake_st,
                                                               tmp_path: Path) -> None:
    """Table 4 "w/o Student Distill": the un-tuned teacher writes the chains of valid and test
    histories too, and H_i of every cache row comes from them."""
    from factory.distill import training_pairs

    with OpenAIServer(ChainTeacher()) as server:
        url = ("--teacher-url", server.url, "--teacher-model", "t")
        ok(tiny.path, "distill", "teach", "--dataset", "tiny", "--template", "two-step", *url)
        with tiny.read() as con:
            first = con.execute("select run_id from job_runs where job = 'distill-teach'"
                                ).fetchone()[0]
        spec = f"teacher:{first}"
        ok(tiny.path, "embed-steps", "--dataset", "tiny", "--chains", spec)
        message = error_of(tiny.path, "export", "cache", "--dataset", "tiny", "--chains", spec,
                           "--out", str(tmp_path / "c"))
        assert "has no valid chain for 6 sequence(s)" in message
        assert "distill teach --parts train,valid,test" in message
        assert "unknown split part 'dev'" in error_of(
            tiny.path, "distill", "teach", "--dataset", "tiny", "--template", "two-step",
            "--parts", "train,dev", *url)
        ok(tiny.path, "distill", "teach", "--dataset", "tiny", "--template", "two-step",
           "--parts", "train,valid,test", *url)
        assert server.count("ok") == 18              # 6 train answers came from the cache
    with tiny.read() as con:
        rows = con.execute("select part, user_id, history, source, verdict from chains"
                           " order by all").fetchall()
        split = dict(con.execute(
            "select user_id || '/' || part, list(item_id order by position)"
            " from split_interactions where dataset = 'tiny' group by all").fetchall())
        chain_set = con.execute("select any_value(chain_set) from chains").fetchone()[0]
        assert len(training_pairs(con, chain_set)) == 6   # a student learns from train only
    assert len(rows) == 18 and {r[3:] for r in rows} == {("teacher", "kept")}
    for part, user, history, *_ in rows:
        tr, va = split[f"{user}/train"], split[f"{user}/valid"]
        assert history == {"train": tr[:-1], "valid": tr, "test": tr + va}[part]
    ok(tiny.path, "embed-steps", "--dataset", "tiny", "--chains", spec)
    out = tmp_path / "cache"
    ok(tiny.path, "export", "cache", "--dataset", "tiny", "--chains", spec, "--out", str(out))
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert (steps["chain_source"], steps["K"], steps["D"], steps["max_seq_length"]) == (
        "teacher", 2, 8, 8)
    import pyarrow.parquet as pq

    with tiny.read() as con:
        texts = dict(con.execute("select part || '/' || user_id, steps from chains").fetchall())
    for part in ("train", "valid", "test"):
        users = pq.read_table(out / f"{part}.users.parquet")["user_id"].to_pylist()
        h = np.load(out / f"{part}.steps.npy").astype(np.float32)
        assert len(users) == 6
        for row, user in enumerate(users):
            np.testing.assert_allclose(h[row], fake_encode(texts[f"{part}/{user}"]), atol=1e-3)
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--cache", str(out), "--fusion", "scoter", "--epochs",
         "1", "--dim", "16", "--layers", "1", "--heads", "1", "--fusion-heads", "1",
         "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
