"""The shared embedding service: order, de-dup, content-addressed cache, batched writes."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_data import fake_encode, fake_model

from factory.embeddings import Embedder, resolve_encoder, text_key
from factory.errors import FactoryError
from factory.warehouse import Warehouse


def test_order_dedup_and_cache(wh: Warehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_model(monkeypatch)
    texts = ["b", "a", "b", "c", "a"]
    emb = Embedder(wh, write_every=2)
    vecs = emb.embed(texts)
    assert vecs.dtype == np.float32 and vecs.shape == (5, 8)
    np.testing.assert_allclose(vecs, fake_encode(texts), rtol=1e-6)
    assert (emb.stats.seen, emb.stats.unique, emb.stats.cache_hits, emb.stats.encoded) == (
        5, 3, 0, 3)
    assert sorted(t for batch in fake for t in batch) == ["a", "b", "c"]
    assert max(len(b) for b in fake) == 2          # written every 2 texts
    with wh.read() as con:
        rows = con.execute("select encoder, text_sha256, dim, len(vector) from embedding_cache"
                           " order by text_sha256").fetchall()
    assert {r[1] for r in rows} == {text_key(t) for t in "abc"}
    assert {(r[0], r[2], r[3]) for r in rows} == {(emb.encoder_id, 8, 8)}

    again = Embedder(wh)
    fake.clear()
    vecs2 = again.embed(["c", "d", "a"])
    assert fake == [["d"]]
    assert (again.stats.cache_hits, again.stats.encoded) == (2, 1)
    np.testing.assert_array_equal(vecs2[[0, 2]], vecs[[3, 1]])   # read back bit-exact


def test_without_warehouse(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_model(monkeypatch)
    emb = Embedder(None)
    assert emb.embed(["x", "x"]).shape == (2, 8)
    assert emb.stats.encoded == 1


def test_encoder_ids(tmp_path) -> None:
    _, default_id = resolve_encoder(None)
    assert default_id.startswith("all-MiniLM-L6-v2#")
    assert resolve_encoder("some/hub-name") == ("some/hub-name", "some/hub-name")
    model = tmp_path / "enc"
    model.mkdir()
    (model / "config.json").write_text("{}")
    first = resolve_encoder(str(model))[1]
    (model / "config.json").write_text('{"changed": 1}')
    assert resolve_encoder(str(model))[1] != first    # a changed model never reuses vectors
    (model / "weights.bin").write_text("x")
    with pytest.raises(FactoryError, match="not a model directory"):
        resolve_encoder(str(model / "weights.bin"))


def test_missing_encoder_is_a_clear_error() -> None:
    emb = Embedder(None, encoder="no-such-org/no-such-model")
    with pytest.raises(FactoryError, match="cannot load encoder 'no-such-org/no-such-model'"):
        emb.embed(["x"])


@pytest.mark.slow
def test_real_default_encoder(wh: Warehouse) -> None:
    emb = Embedder(wh)
    vecs = emb.embed(["Toy Story (1995)", "Heat (1995)", "Toy Story (1995)"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vecs[0], vecs[2])
    assert emb.stats.encoded == 2
    assert emb.embed([]).shape == (0, 384)


def test_counts_add_up_over_calls(wh: Warehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    """A text stored by an earlier call is found in the cache by a later one: it was encoded
    now, not "from the cache" (embed-steps showed distinct 2,645 = 2,105 cached + 2,645 new)."""
    fake_model(monkeypatch)
    Embedder(wh).embed(["old"])
    emb = Embedder(wh)
    emb.embed(["old", "a", "b"])
    emb.embed(["b", "c", "a"])
    s = emb.stats
    assert (s.seen, s.unique, s.cache_hits, s.encoded) == (6, 4, 1, 3)
    assert s.unique == s.cache_hits + s.encoded


def test_encodes_one_batch_at_a_time(wh: Warehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress moves per batch: the encoder gets batch_size texts at a time, longest first
    (as sentence-transformers orders them), and the vectors come back in input order."""
    fake = fake_model(monkeypatch)
    texts = ["a", "ccc", "bb", "eeeee", "dddd"]
    vecs = Embedder(wh, batch_size=2).embed(texts)
    assert fake == [["eeeee", "dddd"], ["ccc", "bb"], ["a"]]
    np.testing.assert_allclose(vecs, fake_encode(texts), rtol=1e-6)
