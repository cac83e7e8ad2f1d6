"""Training loop: seeded, early stopping on validation NDCG@10, deterministic evaluation,
CPU by default and CUDA (with mixed precision) when present; writes metrics and curves."""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from train.config import GENERATIVE, Config
from train.data import (
    Batch,
    Cache,
    CacheError,
    Split,
    TrainError,
    batches,
    bucketed_order,
    next_item_labels,
)
from train.fusion import ScoterFusion
from train.metrics import (
    PROTOCOL_NAMES,
    PROTOCOLS,
    list_ranks,
    listed_in,
    metrics_from_ranks,
    target_ranks,
)
from train.model import ItemTable, Recommender

Log = Callable[[str], None]
#: progress(stage, done, total) after each batch; stage: "epoch 3/50", "valid 3", "test"
Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def n_batches(rows: int, batch_size: int) -> int:
    return -(-rows // batch_size)


class DivergedError(TrainError):
    """A non-finite training loss or ranking score: the run stops, nothing is ranked or
    reported (as RecBole stops on "Training loss is nan")."""


def usable_cores(root: Path = Path("/")) -> int:
    """Cores this process may actually run on: physical cores (not SMT siblings) among the
    CPUs of its affinity mask, capped by a cgroup CPU quota (a container's `--cpus`).
    torch's own default counts the host's cores, so in a 2-CPU container on a 64-core host
    it starts dozens of OpenMP threads that time-share two CPUs and spend their time in
    the kernel (the sys time of issue 18)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
        range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = root / f"sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(),
                       (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    n = max(1, len(cores))
    quota = _cgroup_quota(root)
    return max(1, min(n, math.ceil(quota))) if quota else n


def _cgroup_quota(root: Path) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`, None if unlimited."""
    try:
        quota, period = (root / "sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        v1 = root / "sys/fs/cgroup/cpu"
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        period_us = int((v1 / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def default_threads() -> int:
    """OMP_NUM_THREADS where the user set it, else `usable_cores()`."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else usable_cores()


def set_threads(threads: int | None) -> int:
    """Intra-op threads for this run: `threads`, else `default_threads()`; returns the
    number set. Inter-op threads go to 1 where torch still allows it: the loop runs no
    parallel graph branches, so more only add threads."""
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only before the process's first inter-op work
        torch.set_num_interop_threads(1)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda asked for, but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def reasoning_kind(cfg: Config) -> str:
    if cfg.fusion == "none":
        return "none"
    return "chain" if "single" in cfg.ablate else "steps"


def build_fusion(cfg: Config, cache: Cache, dim: int) -> ScoterFusion | None:
    """SCoTER fusion of width `dim` (the backbone's), or None without --fusion."""
    fusion = None
    kind = reasoning_kind(cfg)
    if kind != "none":
        meta = cache.steps_meta if kind == "steps" else cache.chain_meta
        if meta is None:
            what = ("step embeddings (steps)" if kind == "steps"
                    else "whole-chain embeddings (chain), needed by --ablate single: run "
                    "`factory embed-steps --whole-chain` for its chains, then `factory export "
                    "cache --chains` again")
            raise CacheError(f"{cache.path}: --fusion scoter needs {what}; this cache has none "
                             "(`factory embed-steps --chains <chains>`, then `factory export "
                             "cache --chains <chains>`)")
        fusion = ScoterFusion(int(meta["D"]), dim, int(meta.get("K", 1)), cfg.fusion_heads,
                              cfg.fusion_dropout, frozenset(cfg.ablate), cfg.fusion_head_dim)
    return fusion


def build_model(cfg: Config, cache: Cache) -> nn.Module:
    """The backbone named by cfg.backbone (module train.<backbone>), with its fusion.

    A dense backbone's module has `build(cfg, items, max_len) -> encoder`, wrapped in a
    Recommender. A generative backbone's has `build(cfg, cache, fusion) -> model`, where
    `fusion(dim)` builds the fusion for its width; the model has the Recommender's `losses`
    and `fusion`, and `ranked(seq, reasoning, k) -> (items, scores)`: its beams, best first
    (item 0 / -inf where fewer than k exist)."""
    module = importlib.import_module(f"train.{cfg.backbone}")  # TIGER imports transformers
    if cfg.backbone in GENERATIVE:
        return module.build(cfg, cache, lambda dim: build_fusion(cfg, cache, dim))
    sid = None
    if cfg.sid:
        if cache.sid is None:
            raise CacheError(f"{cache.path}: --sid needs a sid column in items.parquet")
        sid = torch.from_numpy(cache.sid)
    items = ItemTable(cache.n_items, cfg.dim, sid)
    encoder = module.build(cfg, items, cache.max_len)
    return Recommender(encoder, build_fusion(cfg, cache, cfg.dim), cfg.lam, cfg.temperature,
                       cfg.loss, cfg.negatives, cfg.softmax_temperature)


def _autocast(device: torch.device, enabled: bool) -> Any:
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _check_finite(scores: torch.Tensor, split: Split, where: str) -> None:
    bad = ~torch.isfinite(scores)
    if bad.any():
        n = int(bad.any(dim=1).sum())
        raise DivergedError(f"training diverged: non-finite ranking scores for {n} "
                            f"{split.name} rows{where}; the run is not ranked or "
                            "reported (lower --lr?)")


def list_depth(cfg: Config) -> int | None:
    """How deep a generative model's ranked list goes (its beams); None for dense models,
    which rank the whole catalog."""
    return cfg.beam if cfg.backbone in GENERATIVE else None


def _score(model: nn.Module, batch: Batch, cfg: Config
           ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(None, scores of every item) from a dense model, or (items, scores) of a generative
    model's `cfg.beam` beams: what both evaluation and --predict rank."""
    with _autocast(batch.seq.device, cfg.amp):
        if isinstance(model, Recommender):
            return None, model.scores(batch.seq, batch.reasoning, batch.time).float()
        items, scores = model.ranked(batch.seq, batch.reasoning, cfg.beam)
        return items, scores.float()


@torch.no_grad()
def rank_batch(model: nn.Module, batch: Batch, cfg: Config, split: Split, where: str
               ) -> dict[str, torch.Tensor]:
    """The batch's 0-based target ranks under both protocols (train.metrics). A NaN or
    infinite score raises DivergedError: such a model is never ranked."""
    items, scores = _score(model, batch, cfg)
    if items is None:
        _check_finite(scores[:, 1:], split, where)  # column 0 (padding) is -inf by design
        full = target_ranks(scores, batch.target)
        scores.scatter_(1, batch.history(), float("-inf"))  # padding 0 is -inf already
        return {"full": full, "masked": target_ranks(scores, batch.target)}
    _check_finite(scores.masked_fill(items == 0, 0.0), split, where)
    return {"full": list_ranks(items, scores, batch.target),
            "masked": list_ranks(items, scores, batch.target, exclude=batch.history())}


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, cfg: Config, device: torch.device,
             reasoning_rows: np.ndarray | None = None, where: str = "",
             progress: Progress = _no_progress, stage: str = "evaluate"
             ) -> dict[str, dict[str, float | None]]:
    """Ranking of each row's target under both protocols (train.metrics): {"full":
    metrics, "masked": metrics}; rows in file order, no dropout."""
    model.eval()
    ranks: dict[str, list[torch.Tensor]] = {p: [] for p in PROTOCOLS}
    total = n_batches(len(split), cfg.eval_batch_size)
    for done, batch in enumerate(batches(split, cfg.eval_batch_size,
                                         reasoning=reasoning_kind(cfg),
                                         reasoning_rows=reasoning_rows), 1):
        for p, r in rank_batch(model, batch.to(device), cfg, split, where).items():
            ranks[p].append(r.cpu())
        progress(stage, done, total)
    if not ranks["full"]:
        return {p: {} for p in PROTOCOLS}
    return {p: metrics_from_ranks(torch.cat(r), depth=list_depth(cfg))
            for p, r in ranks.items()}


@torch.no_grad()
def predict(model: nn.Module, split: Split, cfg: Config, device: torch.device,
            reasoning_rows: np.ndarray | None = None, progress: Progress = _no_progress
            ) -> tuple[np.ndarray, np.ndarray]:
    """The top `cfg.top_k` items (item_idx, 0 = none) and scores of every row, ranked as
    `cfg.protocol` ranks (masked: history items left out); a generative model's are its
    `cfg.beam` beams, the very lists the metrics were computed on."""
    model.eval()
    items_out, scores_out = [], []
    total = n_batches(len(split), cfg.eval_batch_size)
    for done, batch in enumerate(batches(split, cfg.eval_batch_size,
                                         reasoning=reasoning_kind(cfg),
                                         reasoning_rows=reasoning_rows), 1):
        batch = batch.to(device)
        items, scores = _score(model, batch, cfg)
        if items is None:
            if cfg.protocol == "masked":
                scores.scatter_(1, batch.history(), float("-inf"))
            top, items = scores.topk(min(cfg.top_k, scores.shape[1] - 1), dim=1)
        else:
            top = scores
            if cfg.protocol == "masked":
                top = top.masked_fill(listed_in(items, batch.history()), float("-inf"))
                top, order = top.sort(dim=1, descending=True, stable=True)
                items = items.gather(1, order)
            items, top = items[:, :cfg.top_k], top[:, :cfg.top_k]
        items = items.masked_fill(~torch.isfinite(top), 0)
        items_out.append(items.cpu().numpy())
        scores_out.append(top.cpu().numpy())
        progress(f"predict {split.name}", done, total)
    return np.concatenate(items_out), np.concatenate(scores_out)


#: batches whose losses go to the host together: reading a loss each batch makes a CUDA
#: run wait for every step before queueing the next (on the CPU it costs nothing either way)
LOSS_READ_EVERY = 32


def train_epoch(model: Recommender, split: Split, cfg: Config, device: torch.device,
                opt: torch.optim.Optimizer, scaler: Any, rng: np.random.Generator,
                reasoning_rows: np.ndarray | None, epoch: int = 0,
                progress: Progress = _no_progress, stage: str = "train"
                ) -> dict[str, float]:
    """One pass over `split`; the mean of each loss term. Losses are read back every
    LOSS_READ_EVERY batches and at the end: a non-finite one raises DivergedError naming its
    batch (the run is abandoned, so the few steps taken after it change nothing reported)."""
    model.train()
    sums: dict[str, float] = {}
    # per batch not yet read: its loss terms' names and values (a batch of TIGER rows
    # without reasoning steps has no "nce")
    pending: list[tuple[list[str], torch.Tensor]] = []
    n = 0
    total = n_batches(len(split), cfg.batch_size)
    order = (rng.permutation(len(split)) if split.lengths is None
             else bucketed_order(split.lengths, cfg.batch_size, rng))

    def read() -> None:
        flat = torch.cat([v for _, v in pending]).tolist()  # the one device-to-host copy
        first, at = n - len(pending) + 1, 0
        for i, (keys, _) in enumerate(pending):
            row = flat[at:at + len(keys)]
            at += len(keys)
            if not all(math.isfinite(v) for v in row):
                shown = ", ".join(f"{k} {v}" for k, v in zip(keys, row, strict=True))
                raise DivergedError(f"training diverged at epoch {epoch}, batch {first + i}: "
                                    f"{shown}; the run is not ranked or reported (lower --lr?)")
            for k, v in zip(keys, row, strict=True):
                sums[k] = sums.get(k, 0.0) + v
        pending.clear()

    for batch in batches(split, cfg.batch_size, reasoning=reasoning_kind(cfg), older=False,
                         order=order, reasoning_rows=reasoning_rows):
        batch = batch.to(device)
        labels = next_item_labels(batch.seq, batch.target)
        with _autocast(device, cfg.amp):
            out = model.losses(batch.seq, labels, batch.target, batch.reasoning, batch.time)
        pending.append((list(out), torch.stack([v.detach().float() for v in out.values()])))
        opt.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.step(opt)
        scaler.update()
        n += 1
        if len(pending) == LOSS_READ_EVERY:
            read()
        progress(stage, n, total)
    if pending:
        read()
    return {k: v / max(n, 1) for k, v in sums.items()}


def _permutations(cache: Cache, cfg: Config) -> dict[str, np.ndarray | None]:
    """The shuffled-steps control: a fixed random other row's reasoning for every row."""
    if not cfg.shuffle_steps:
        return {s: None for s in cache.splits}
    rng = np.random.default_rng(cfg.seed + 1)
    return {s: rng.permutation(len(split)) for s, split in cache.splits.items()}


def default_out(cfg: Config) -> Path:
    variant = cfg.backbone if cfg.fusion == "none" else f"{cfg.backbone}-{cfg.fusion}"
    if cfg.ablate:
        variant += "-no-" + "-".join(cfg.ablate)
    if cfg.shuffle_steps:
        variant += "-shuffled"
    name = f"{Path(cfg.cache).name}-{variant}-{datetime.now():%Y%m%d-%H%M%S}"
    return runs_root(Path(cfg.cache)) / name


def runs_root(cache: Path) -> Path:
    """`runs/` beside the cache's `caches/` folder (`<warehouse>.files/caches/X` ->
    `<warehouse>.files/runs/`, `caches/X` -> `runs/`), else beside the cache itself."""
    parent = cache.resolve().parent
    return (parent.parent if parent.name == "caches" else parent) / "runs"


def run(cfg: Config, log: Log = print, progress: Progress = _no_progress) -> dict[str, Any]:
    """Train, early-stop on valid NDCG@10 under `cfg.protocol`, test the best epoch under
    both protocols; write metrics.json and curves.png (and model.pt with save_model) into
    the output directory. A non-finite loss or score raises DivergedError (nothing written).
    `progress` is called after every batch (an ml-1m epoch is minutes long)."""
    cfg.check()
    threads = set_threads(cfg.threads)
    seed_everything(cfg.seed)
    cache = Cache(cfg.cache, verify=cfg.verify)
    if len(cache.splits["train"]) == 0 or len(cache.splits["valid"]) == 0:
        raise CacheError(f"{cache.path}: the train and valid splits must have rows")
    if cfg.loss == "sampled" and cfg.negatives >= cache.n_items:
        raise CacheError(f"--negatives {cfg.negatives}: the catalog has {cache.n_items:,} "
                         "items; sample fewer, or use --loss full")
    device = pick_device(cfg.device)
    model = build_model(cfg, cache).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_scaler = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    perms = _permutations(cache, cfg)
    out = Path(cfg.out) if cfg.out else default_out(cfg)  # made once there is a result
    rng = np.random.default_rng(cfg.seed)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"ndcg": -1.0, "epoch": 0, "state": None, "valid": {}}
    proto = cfg.protocol
    train_seconds: list[float] = []
    waited = 0
    log(f"training {sum(p.numel() for p in model.parameters()):,} parameters on {device} "
        f"({threads} thread{'s' * (threads > 1)}): "
        f"{len(cache.splits['train']):,} train rows, {cache.n_items:,} items, "
        f"max_len {cache.max_len}")
    train_split, train_perm = cache.splits["train"], perms["train"]
    if hasattr(model, "training_split"):  # TIGER: one example per next item of each row
        train_split, train_perm = model.training_split(train_split, train_perm), None
        log(f"{len(train_split):,} training examples (sliding prefixes of the train rows)")
    if cache.splits["test"].older is None:
        log("this cache predates {split}.older.npy: the masked protocol leaves out only the "
            f"last {cache.max_len} history items; export it again to mask the whole history")
    if getattr(getattr(model, "backbone", None), "uses_time", False) and (
            cache.splits["train"].time is None):
        log(f"{cfg.backbone}: the cache has no timestamps ({{split}}.time.npy): relative "
            "position bias only")
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        losses = train_epoch(model, train_split, cfg, device, opt, scaler, rng,
                             train_perm, epoch, progress, f"epoch {epoch}/{cfg.epochs}")
        train_seconds.append(time.perf_counter() - t0)
        row: dict[str, Any] = {"epoch": epoch, "seconds": train_seconds[-1], **losses}
        over_time = (cfg.max_minutes is not None
                     and sum(train_seconds) > 60 * cfg.max_minutes)
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs or over_time:
            both = evaluate(model, cache.splits["valid"], cfg, device, perms["valid"],
                            where=f" at epoch {epoch}", progress=progress,
                            stage=f"valid {epoch}")
            row["valid"], row["valid_by_protocol"] = both[proto], both
            if both[proto]["ndcg@10"] > best["ndcg"]:
                best = {"ndcg": both[proto]["ndcg@10"], "epoch": epoch, "valid": both,
                        "state": copy.deepcopy(model.state_dict())}
                waited = 0
            else:
                waited += 1
        history.append(row)
        log(f"epoch {epoch}: loss {losses.get('loss', float('nan')):.4f}"
            + (f" (nce {losses['nce']:.4f})" if "nce" in losses else "")
            + (f", valid R@10 {row['valid']['recall@10']:.4f} N@10 "
               f"{row['valid']['ndcg@10']:.4f} ({proto})" if "valid" in row else "")
            + f", {train_seconds[-1]:.1f}s")
        if waited >= cfg.patience:
            log(f"early stop: no better valid NDCG@10 ({proto}) in {cfg.patience} evaluations")
            break
        if over_time:
            log(f"time budget of {cfg.max_minutes:g} minutes spent: stopping")
            break

    model.load_state_dict(best["state"])
    test = evaluate(model, cache.splits["test"], cfg, device, perms["test"],
                    where=" (test)", progress=progress, stage="test")
    result = {
        "cache": str(cache.path), "dataset": cache.manifest.get("dataset"),
        "split": cache.manifest.get("split"), "out": str(out), "device": str(device),
        "best_epoch": best["epoch"], "epochs_run": len(history),
        "seconds_per_epoch": float(np.mean(train_seconds)),
        # valid/test: under `protocol`, which chose the best epoch; `protocols`: both
        "protocol": proto, "valid": best["valid"][proto], "test": test[proto],
        "protocols": {p: {"name": PROTOCOL_NAMES[p], "valid": best["valid"][p],
                          "test": test[p]} for p in PROTOCOLS},
        "params": {**cfg.as_dict(), "fusion_head_dim": model.fusion.head_dim
                   if model.fusion is not None else None,    # the width used
                   "threads": threads},                      # the threads used
        "history": history,
    }
    out.mkdir(parents=True, exist_ok=True)
    if cfg.predict:
        path = Path(cfg.candidates) if cfg.candidates else out / "candidates.parquet"
        result["candidates"] = result["params"]["candidates"] = str(path)
        write_candidates(model, cache, cfg, device, perms, path, progress)
        log(f"candidates: top {cfg.top_k} of every train/valid/test row written to {path}")
    (out / "metrics.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot_curves(history, best["epoch"], out / "curves.png", proto)
    if cfg.save_model:
        torch.save(best["state"], out / "model.pt")
    return result


def write_candidates(model: nn.Module, cache: Cache, cfg: Config, device: torch.device,
                     perms: dict[str, np.ndarray | None], path: Path,
                     progress: Progress = _no_progress) -> None:
    """One Parquet row per cache row of every split: part, row, user_id, target_item_id,
    item_ids (the top K, best first) and scores, ranked as `predict` ranks; written to a
    temporary name and renamed, so a reader never sees half a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = pq.read_table(cache.path / "items.parquet", columns=["item_idx", "item_id"])
    item_id = np.empty(cache.n_items + 1, dtype=object)
    item_id[ids["item_idx"].to_numpy()] = ids["item_id"].cast(pa.string()).to_numpy(
        zero_copy_only=False)
    tables = []
    for name, split in cache.splits.items():
        if not len(split):
            continue
        items, scores = predict(model, split, cfg, device, perms[name], progress)
        users = pq.read_table(cache.path / f"{name}.users.parquet", columns=["row", "user_id"])
        keep = items > 0   # fewer than K beams: the list is shorter
        offsets = pa.array(np.concatenate([[0], np.cumsum(keep.sum(1))]), pa.int32())

        def lists(values: np.ndarray, kind: pa.DataType, offsets: pa.Array = offsets
                  ) -> pa.Array:
            return pa.ListArray.from_arrays(offsets, pa.array(values, kind))
        tables.append(pa.table({
            "part": pa.array([name] * len(split)),
            "row": users["row"], "user_id": users["user_id"].cast(pa.string()),
            "target_item_id": pa.array(item_id[np.asarray(split.target)], pa.string()),
            "item_ids": lists(item_id[items[keep]], pa.string()),
            "scores": lists(scores[keep], pa.float32()),
        }))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.concat_tables(tables), tmp)
    tmp.replace(path)


def plot_curves(history: list[dict[str, Any]], best_epoch: int, path: Path,
                protocol: str = "full") -> None:
    """Training losses and validation Recall/NDCG@10 per epoch (PNG, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [h["epoch"] for h in history]
    fused = any("nce" in h for h in history)
    for key in ("loss", "rec", "nce") if fused else ("loss",):
        if any(key in h for h in history):
            ax1.plot(epochs, [h.get(key, np.nan) for h in history], label=key)
    ax1.set_xlabel("epoch")
    ax1.set_title("training loss")
    ax1.legend()
    evals = [h for h in history if "valid" in h]
    for key in ("recall@10", "ndcg@10"):
        ax2.plot([h["epoch"] for h in evals], [h["valid"][key] for h in evals], marker=".",
                 label=f"valid {key}")
    ax2.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
    ax2.set_xlabel("epoch")
    ax2.set_title(f"validation ({protocol} ranking)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
