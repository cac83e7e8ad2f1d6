"""Step-wise embedding caches (SCoTER 3.3.1, Alg. 2 lines 13-18): H_i = [e_i1; ...; e_iK].

A cache is a directory beside the warehouse, one per `embed-steps` run:

    manifest.json          format, dataset, split, chain run and source, template and its K
                           step names, encoder, its token limit (max_seq_length), D, K,
                           dtype, rows per part, counts (truncated_steps, truncated_chains:
                           distinct texts longer than the limit, cut by the encoder), and the
                           SHA-256 of every file plus one checksum over all of them
    {part}.H.npy           (rows, K, D) float16 or float32, row r = the r-th sequence
    {part}.users.parquet   row, user_id: which sequence each row is
    {part}.chain.npy       optional (rows, D): one embedding of the whole chain (the
                           "w/o step-wise embedding" ablation, SCoTER Table 4)

The warehouse table `step_embeddings` indexes the same rows by (dataset, split, part,
user_id, chain run), and `step_caches` holds the manifest. Readers memory-map the .npy
files, so gathering the H matrices of a batch reads only those rows.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from factory.errors import FactoryError
from train.format import FLOAT_DTYPES, sha256_file

FORMAT, VERSION = "factory-steps", 1
PARTS = ("train", "valid", "test")
DTYPES = FLOAT_DTYPES  # the training cache's: H files are copied into it as they are


def files_dir(warehouse_path: Path) -> Path:
    """Where a warehouse's files live (caches/, runs/, steps/, models/, plots/, sft/,
    journal/, shards/): `factory.duckdb` -> `factory.files/`."""
    return warehouse_path.parent / f"{warehouse_path.stem}.files"


def staging_dir(out: Path) -> Path:
    """An empty sibling of `out` to write into and rename into place. Made with the
    umask's mode: tempfile.mkdtemp's 0700 made finished caches unreadable to anyone else."""
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def combined_checksum(files: dict[str, str]) -> str:
    """One checksum for the whole cache: SHA-256 over the sorted (name, file hash) pairs."""
    text = "\n".join(f"{name} {digest}" for name, digest in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class PartWriter:
    """Fills one part's H file row block by row block (the file is a memory map)."""

    path: Path
    users: list[str]
    k: int
    d: int
    dtype: str
    chain_path: Path | None = None
    _h: Any = field(default=None, repr=False)
    _c: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._h = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype,
                                            shape=(len(self.users), self.k, self.d))
        if self.chain_path is not None:
            self._c = np.lib.format.open_memmap(self.chain_path, mode="w+", dtype=self.dtype,
                                                shape=(len(self.users), self.d))

    def write(self, start: int, h: np.ndarray, chain: np.ndarray | None = None) -> None:
        if h.shape[1:] != (self.k, self.d):
            raise FactoryError(f"step block has shape {h.shape}, expected (n, {self.k}, "
                               f"{self.d})")
        if not np.isfinite(h).all():
            raise FactoryError("the encoder returned NaN or infinite values")
        self._h[start:start + len(h)] = h.astype(self.dtype)
        if self._c is not None:
            if chain is None:
                raise FactoryError("this cache stores whole-chain embeddings; none given")
            self._c[start:start + len(chain)] = chain.astype(self.dtype)

    def close(self) -> None:
        for arr in (self._h, self._c):
            if arr is not None:
                arr.flush()
        self._h = self._c = None


class CacheWriter:
    """Writes a cache into a temporary sibling directory and renames it into place at the
    end, so a crash never leaves a half-written cache that looks complete."""

    def __init__(self, out: Path, meta: dict[str, Any], replace: bool = False):
        self.out = Path(out)
        if meta.get("dtype") not in DTYPES:
            raise FactoryError(f"--dtype must be float16 or float32, not {meta.get('dtype')}")
        if self.out.exists():
            if not replace:
                raise FactoryError(f"{self.out} exists; pass --replace to overwrite it")
            if any(self.out.iterdir()) and not (self.out / "manifest.json").is_file():
                raise FactoryError(f"{self.out} is not a step cache (no manifest.json); "
                                   "refusing to replace it")
        self.meta = meta
        self.tmp = staging_dir(self.out)
        self.parts: dict[str, PartWriter] = {}

    def part(self, name: str, users: list[str], with_chain: bool = False) -> PartWriter:
        pq.write_table(pa.table({
            "row": pa.array(np.arange(len(users), dtype=np.int64)),
            "user_id": pa.array(users, pa.string())}), self.tmp / f"{name}.users.parquet")
        writer = PartWriter(self.tmp / f"{name}.H.npy", users, int(self.meta["K"]),
                            int(self.meta["D"]), self.meta["dtype"],
                            self.tmp / f"{name}.chain.npy" if with_chain else None)
        self.parts[name] = writer
        return writer

    def commit(self, counts: dict[str, Any]) -> dict[str, Any]:
        """Close the files, write the manifest, move the directory into place."""
        for w in self.parts.values():
            w.close()
        files = {f.name: sha256_file(f) for f in sorted(self.tmp.iterdir())}
        manifest = {
            "format": FORMAT, "version": VERSION, **self.meta,
            "rows": {name: len(w.users) for name, w in self.parts.items()},
            "whole_chain": any(w.chain_path is not None for w in self.parts.values()),
            "counts": counts, "files": files, "checksum": combined_checksum(files),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=2),
                                                encoding="utf-8")
        if self.out.exists():
            shutil.rmtree(self.out)
        self.tmp.rename(self.out)
        return manifest

    def abort(self) -> None:
        for w in self.parts.values():
            w.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class StepCache:
    """A cache directory opened for reading; H files are memory-mapped on first use."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self._h: dict[str, np.ndarray] = {}
        self._c: dict[str, np.ndarray] = {}
        self._rows: dict[str, dict[str, int]] = {}

    @property
    def k(self) -> int:
        return int(self.manifest["K"])

    @property
    def d(self) -> int:
        return int(self.manifest["D"])

    def users(self, part: str) -> list[str]:
        return pq.read_table(self.path / f"{part}.users.parquet",
                             columns=["user_id"])["user_id"].to_pylist()

    def matrix(self, part: str) -> np.ndarray:
        """The part's (rows, K, D) array, memory-mapped (nothing is read until indexed)."""
        if part not in self.manifest["rows"]:
            raise FactoryError(f"step cache {self.path} has no {part!r} part")
        if part not in self._h:
            self._h[part] = np.load(self.path / f"{part}.H.npy", mmap_mode="r")
        return self._h[part]

    def _index(self, part: str) -> None:
        if part not in self._rows:
            known = part in self.manifest["rows"]  # a part without any kept chain has no file
            self._rows[part] = {u: i for i, u in enumerate(self.users(part))} if known else {}

    def rows(self, part: str, user_ids: Iterable[str]) -> np.ndarray:
        """Row numbers of these users' sequences; a user without a chain is an error."""
        self._index(part)
        index = self._rows[part]
        out, missing = [], []
        for u in user_ids:
            r = index.get(u)
            if r is None:
                missing.append(u)
            else:
                out.append(r)
        if missing:
            redo = ("`factory distill generate --redraw-rejected` (new draws for the rejected "
                    "only; a plain re-run replays the same answers)"
                    if self.manifest.get("chain_source") != "teacher"
                    else "`factory distill teach --parts train,valid,test`")
            raise FactoryError(
                f"step cache {self.manifest.get('cache_id', self.path)} "
                f"({self.manifest.get('chains')}) has no {part} chain for {len(missing)} "
                f"sequence(s) (e.g. user {missing[0]}): none was asked for (--limit) or kept; "
                f"run {redo}, "
                "then `factory embed-steps`, or export with `--missing skip` to mark them "
                "(zero H rows, has_steps false)")
        return np.asarray(out, dtype=np.int64)

    def has(self, part: str, user_ids: Iterable[str]) -> np.ndarray:
        """Whether each of these sequences has a row (a kept chain), in the order given."""
        self._index(part)
        index = self._rows[part]
        return np.fromiter((u in index for u in user_ids), dtype=bool)

    def gather_or_zero(self, part: str, user_ids: Iterable[str]) -> np.ndarray:
        """`gather`, with zero rows for sequences that have no chain (`--missing skip`)."""
        users = list(user_ids)
        mask = self.has(part, users)
        out = np.zeros((len(users), self.k, self.d), dtype=self.manifest["dtype"])
        if mask.any():
            out[mask] = self.gather(part, [u for u, m in zip(users, mask, strict=True) if m])
        return out

    def gather_chain_or_zero(self, part: str, user_ids: Iterable[str]) -> np.ndarray:
        users = list(user_ids)
        mask = self.has(part, users)
        out = np.zeros((len(users), self.d), dtype=self.manifest["dtype"])
        if mask.any():
            out[mask] = self.gather_chain(part, [u for u, m in zip(users, mask, strict=True)
                                                 if m])
        return out

    def gather(self, part: str, user_ids: Iterable[str]) -> np.ndarray:
        """(len(user_ids), K, D) for these sequences, in the order given."""
        rows = self.rows(part, user_ids)
        return np.asarray(self.matrix(part)[rows])

    def gather_chain(self, part: str, user_ids: Iterable[str]) -> np.ndarray:
        if not self.manifest.get("whole_chain"):
            raise FactoryError(f"step cache {self.path} has no whole-chain embeddings "
                               "(build it with `factory embed-steps --whole-chain`)")
        if part not in self._c:
            self._c[part] = np.load(self.path / f"{part}.chain.npy", mmap_mode="r")
        return np.asarray(self._c[part][self.rows(part, user_ids)])


def refuse_other_encoder(path: Path, encoder: str) -> None:
    """Before writing into an existing directory: say what is there instead of overwriting."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return  # CacheWriter gives the plain "exists" error
    try:
        there = json.loads(manifest.read_text(encoding="utf-8")).get("encoder")
    except ValueError:
        return
    if there != encoder:
        raise FactoryError(f"{path} holds step embeddings from encoder {there!r}, not "
                           f"{encoder!r}; pass --replace to overwrite it or choose another --out")


def open_cache(path: Path, encoder: str | None = None, verify: bool = True) -> StepCache:
    """Open a cache directory, refusing one that is incomplete, modified or built with
    another encoder than `encoder`."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise FactoryError(f"{path} is not a step cache (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise FactoryError(f"{manifest_path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise FactoryError(f"{path} is not a step cache (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise FactoryError(f"{path}: step cache version {manifest.get('version')}, this "
                           f"factory reads version {VERSION}; rebuild it with embed-steps")
    if encoder is not None and manifest.get("encoder") != encoder:
        raise FactoryError(f"step cache {path} was built with encoder "
                           f"{manifest.get('encoder')!r}, not {encoder!r}; rebuild it with "
                           f"`factory embed-steps --encoder {encoder}`")
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise FactoryError(f"step cache {path} is incomplete: {name} is missing")
        if verify and sha256_file(f) != digest:
            raise FactoryError(f"step cache {path} is stale: {name} does not match the "
                               "checksum in its manifest; rebuild it with embed-steps")
    return StepCache(path, manifest)


def step_source(cache: StepCache, missing: str = "fail") -> Any:
    """The cache as the training-cache exporter's StepSource (H_i aligned to its rows).
    `missing`: 'fail' (a row without a chain is an error naming what to re-run) or 'skip'
    (zero rows, reported through the source's `has`, so the cache marks and counts them)."""
    from factory.exports.cache import StepSource

    m = cache.manifest
    meta = {key: m[key] for key in ("K", "D", "encoder", "template", "template_steps",
                                    "chain_source", "chains", "chain_set", "cache_id")}
    # what the encoder cut (caches written before these were counted lack them)
    meta.update({key: m[key] for key in ("max_seq_length",) if key in m})
    meta.update({key: m["counts"][key] for key in ("truncated_steps", "truncated_chains")
                 if key in m.get("counts", {})})
    if missing == "skip":
        return StepSource(meta=meta, steps=cache.gather_or_zero,
                          chain=cache.gather_chain_or_zero if m.get("whole_chain") else None,
                          dtype=m["dtype"], has=cache.has)
    return StepSource(meta=meta, steps=cache.gather,
                      chain=cache.gather_chain if m.get("whole_chain") else None,
                      dtype=m["dtype"])
