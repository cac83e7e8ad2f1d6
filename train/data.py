"""Reader for the exported cache (format in README.md, "Training caches"), and batching.

Arrays are opened with `np.load(mmap_mode="r")`; a batch reads only its own rows, so step
embeddings that do not fit in memory still train.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from train.format import FLOAT_DTYPES, FORMAT, SPLITS, VERSION, sha256_file


class TrainError(Exception):
    """Anything a user can fix (bad cache, unavailable device); the message is one line."""


class CacheError(TrainError):
    """A cache that is missing, malformed or inconsistent."""


@dataclass
class Split:
    """One split's rows: left-padded histories, next-item targets, optional reasoning."""

    name: str
    seq: np.ndarray  # (rows, max_len) int32, 0 = padding, most recent last
    target: np.ndarray  # (rows,) int32
    steps: np.ndarray | None  # (rows, K, D): H_i, one step embedding per reasoning step
    chain: np.ndarray | None  # (rows, D): the whole chain as one vector (ablation "single")
    time: np.ndarray | None = None  # (rows, max_len) int64 unix seconds, 0 = padding
    #: history items older than the window, ragged (row r: older[ptr[r]:ptr[r + 1]]), so
    #: the masked protocol leaves out the whole history; None in caches made before them
    older: tuple[np.ndarray, np.ndarray] | None = None  # (ptr (rows + 1,), items)
    #: (rows,) history lengths: where set, training batches are length-bucketed
    #: (`bucketed_order`), for models whose cost follows the batch's longest history
    lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.target.shape[0])


@dataclass
class Batch:
    rows: np.ndarray  # row numbers in the split
    seq: torch.Tensor  # (B, L) long
    target: torch.Tensor  # (B,) long
    reasoning: torch.Tensor | None  # (B, K, D) float32, or (B, 1, D) for a chain vector
    time: torch.Tensor | None = None  # (B, L) long unix seconds, where the cache has them
    older: torch.Tensor | None = None  # (B, M) long, history beyond the window, 0-padded

    def history(self) -> torch.Tensor:
        """Every history item of each row (0 = padding): the window and what is older."""
        return self.seq if self.older is None else torch.cat([self.seq, self.older], dim=1)

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)
        return Batch(self.rows, self.seq.to(device, non_blocking=True),
                     self.target.to(device, non_blocking=True), move(self.reasoning),
                     move(self.time), move(self.older))


class Cache:
    """An exported cache directory, validated on open (sha256 of every file when `verify`)."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise CacheError(f"{self.path}: no manifest.json (not an exported cache)")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CacheError(f"{manifest_path}: unreadable manifest: {exc}") from None
        m = self.manifest
        if m.get("format") != FORMAT:
            raise CacheError(f"{manifest_path}: format is {m.get('format')!r}, not {FORMAT!r}")
        if m.get("version") != VERSION:
            raise CacheError(f"{manifest_path}: cache version {m.get('version')!r}; this "
                             f"reader knows version {VERSION}")
        try:
            self.n_items = int(m["n_items"])
            self.max_len = int(m["max_len"])
            rows = {s: int(m["rows"][s]) for s in SPLITS}
            files = dict(m["files"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheError(f"{manifest_path}: missing or bad field {exc}") from None
        for name, digest in files.items():
            f = self.path / name
            if not f.is_file():
                raise CacheError(f"{self.path}: manifest lists {name}, which is missing")
            if verify and sha256_file(f) != digest:
                raise CacheError(f"{f}: sha256 differs from the manifest (changed or truncated)")
        self.steps_meta: dict | None = m.get("steps")
        self.chain_meta: dict | None = m.get("chain")
        self.time_meta: dict | None = m.get("time")  # optional in version 1: older caches
        self.item_text = self._array("item_text.npy", (self.n_items + 1, None), FLOAT_DTYPES,
                                     required=m.get("item_text") is not None)
        self.sid = self._read_sid()
        self.splits = {s: self._read_split(s, rows[s]) for s in SPLITS}

    # -- reading -------------------------------------------------------------------------
    def _array(self, name: str, shape: tuple[int | None, ...], dtypes: tuple[str, ...],
               required: bool) -> np.ndarray | None:
        f = self.path / name
        if not required:
            return None
        if not f.is_file():
            raise CacheError(f"{self.path}: {name} is missing")
        try:
            arr = np.load(f, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise CacheError(f"{f}: not a NumPy array file: {exc}") from None
        if arr.dtype.name not in dtypes:
            raise CacheError(f"{f}: dtype {arr.dtype}, expected {' or '.join(dtypes)}")
        if len(arr.shape) != len(shape) or any(
            want is not None and got != want for got, want in zip(arr.shape, shape, strict=True)
        ):
            want_s = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
            raise CacheError(f"{f}: shape {tuple(arr.shape)}, expected {want_s}")
        return arr

    def _read_sid(self) -> np.ndarray | None:
        """Semantic-ID codes as (n_items + 1, levels) int64, row 0 (padding) all -1."""
        f = self.path / "items.parquet"
        if not f.is_file():
            raise CacheError(f"{self.path}: items.parquet is missing")
        schema = pq.read_schema(f)
        if "item_idx" not in schema.names:
            raise CacheError(f"{f}: no item_idx column")
        idx = pq.read_table(f, columns=["item_idx"])["item_idx"].to_numpy()
        if not np.array_equal(np.sort(idx), np.arange(1, self.n_items + 1)):
            raise CacheError(f"{f}: item_idx is not exactly 1..{self.n_items}")
        if "sid" not in schema.names:
            return None
        col = pq.read_table(f, columns=["sid"])["sid"].to_pylist()
        if any(c is None for c in col) or len({len(c) for c in col}) != 1:
            raise CacheError(f"{f}: sid codes must be present and of one length for every item")
        codes = np.full((self.n_items + 1, len(col[0])), -1, dtype=np.int64)
        codes[idx] = np.asarray(col, dtype=np.int64)
        if (codes[1:] < 0).any():
            raise CacheError(f"{f}: negative sid code")
        return codes

    def _read_split(self, s: str, rows: int) -> Split:
        seq = self._array(f"{s}.seq.npy", (rows, self.max_len), ("int32",), required=True)
        target = self._array(f"{s}.target.npy", (rows,), ("int32",), required=True)
        assert seq is not None and target is not None
        if rows and (int(seq.min()) < 0 or int(seq.max()) > self.n_items):
            raise CacheError(f"{self.path}/{s}.seq.npy: item index outside 0..{self.n_items}")
        if rows and (int(target.min()) < 1 or int(target.max()) > self.n_items):
            raise CacheError(f"{self.path}/{s}.target.npy: item index outside 1..{self.n_items}")
        if rows and int(seq[:, -1].min()) == 0:
            raise CacheError(f"{self.path}/{s}.seq.npy: a row has an empty history (histories "
                             "are left-padded, most recent item last)")
        steps = chain = None
        if self.steps_meta is not None:
            k, d = int(self.steps_meta["K"]), int(self.steps_meta["D"])
            steps = self._array(f"{s}.steps.npy", (rows, k, d), FLOAT_DTYPES, required=True)
        if self.chain_meta is not None:
            chain = self._array(f"{s}.chain.npy", (rows, int(self.chain_meta["D"])),
                                FLOAT_DTYPES, required=True)
        time = None
        if self.time_meta is not None:
            time = self._array(f"{s}.time.npy", (rows, self.max_len), ("int64",), required=True)
            assert time is not None
            if rows and bool((np.asarray(time)[np.asarray(seq) == 0] != 0).any()):
                raise CacheError(f"{self.path}/{s}.time.npy: a time where the history is "
                                 "padding (0 is padding)")
        older = None
        if self.manifest.get("older"):
            ptr = self._array(f"{s}.older_ptr.npy", (rows + 1,), ("int64",), required=True)
            items = self._array(f"{s}.older.npy", (None,), ("int32",), required=True)
            assert ptr is not None and items is not None
            if rows and (ptr[0] != 0 or ptr[-1] != len(items) or (np.diff(ptr) < 0).any()):
                raise CacheError(f"{self.path}/{s}.older_ptr.npy: offsets do not index "
                                 f"{s}.older.npy")
            if len(items) and (int(items.min()) < 1 or int(items.max()) > self.n_items):
                raise CacheError(f"{self.path}/{s}.older.npy: item index outside "
                                 f"1..{self.n_items}")
            older = (np.asarray(ptr), np.asarray(items))
        return Split(s, seq, target, steps, chain, time, older)


# -- batching ----------------------------------------------------------------------------
REASONING = ("none", "steps", "chain")


def batches(split: Split, batch_size: int, *, reasoning: str = "none",
            order: np.ndarray | None = None, reasoning_rows: np.ndarray | None = None,
            older: bool = True) -> Iterator[Batch]:
    """Yield batches over `order` (default: row order). Rows within a batch are read in
    increasing order so memmapped reads stay local. `reasoning_rows[i]` names the row whose
    reasoning row i receives (a permutation for the shuffled-steps control). `older`: also
    the history beyond the window (only ranking needs it: the masked protocol)."""
    if reasoning not in REASONING:
        raise ValueError(f"reasoning must be one of {REASONING}")
    source = {"none": None, "steps": split.steps, "chain": split.chain}[reasoning]
    if reasoning != "none" and source is None:
        raise CacheError(f"split {split.name} has no {reasoning} array in this cache")
    order = np.arange(len(split)) if order is None else order
    for start in range(0, len(order), batch_size):
        rows = np.sort(order[start:start + batch_size])
        seq = torch.from_numpy(np.asarray(split.seq[rows], dtype=np.int64))
        target = torch.from_numpy(np.asarray(split.target[rows], dtype=np.int64))
        r = None
        if source is not None:
            src_rows = rows if reasoning_rows is None else reasoning_rows[rows]
            picked = np.asarray(source[np.sort(src_rows)], dtype=np.float32)
            picked = picked[np.argsort(np.argsort(src_rows))]  # back to `rows` order
            r = torch.from_numpy(picked if picked.ndim == 3 else picked[:, None, :])
        time = (None if split.time is None
                else torch.from_numpy(np.asarray(split.time[rows], dtype=np.int64)))
        old = (None if split.older is None or not older
               else torch.from_numpy(_ragged(*split.older, rows)))
        yield Batch(rows, seq, target, r, time, old)


def _ragged(ptr: np.ndarray, items: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` of a ragged array as one (len(rows), longest) int64 array, 0-padded."""
    starts, counts = ptr[rows], ptr[rows + 1] - ptr[rows]
    width = int(counts.max()) if len(rows) else 0
    out = np.zeros((len(rows), width), np.int64)
    if width:
        col = np.arange(width)
        inside = col[None, :] < counts[:, None]
        out[inside] = items[(starts[:, None] + col[None, :])[inside]]
    return out


def bucketed_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                   chunk: int = 50) -> np.ndarray:
    """A random order of all rows whose consecutive `batch_size` slices (the batches) hold
    rows of similar length: shuffle, sort each run of `chunk` batches by length, then
    shuffle the whole batches (a last, partial, batch stays last). Every row once, drawn
    from `rng` only."""
    order = rng.permutation(len(lengths))
    span = batch_size * chunk
    for start in range(0, len(order), span):
        part = order[start:start + span]
        order[start:start + span] = part[np.argsort(lengths[part], kind="stable")]
    full = len(order) // batch_size * batch_size
    batched = order[:full].reshape(-1, batch_size)
    return np.concatenate([batched[rng.permutation(len(batched))].reshape(-1), order[full:]])


def next_item_labels(seq: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Labels for every position of a training row: the item after it, 0 where the input is
    padding. The last position's label is the row's target; no label is ever an input at
    or before its own position."""
    labels = torch.cat([seq[:, 1:], target[:, None]], dim=1)
    return labels.masked_fill(seq == 0, 0)
