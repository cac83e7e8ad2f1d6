"""Backbones (SASRec, HSTU, TIGER) on MovieLens through the whole pipeline (ingest -> export
cache -> train), against published full-ranking figures and, optionally, RecBole's SASRec on
the very same split.

    python bench/train.py                                   # SASRec, ML-1M, max_len 200
    python bench/train.py --backbone sasrec,hstu --max-minutes 3   # both, same cache, one table
    python bench/train.py --backbone sasrec,tiger --dataset ml-100k --max-minutes 10
                          # TIGER: SIDs (factory sids, extra level on collisions), its own
                          # cache (--tiger-max-len, SCoTER's 20) and SCoTER's T5 settings
    python bench/train.py --epochs 200 --patience 20        # the published budget
    python bench/train.py --loss sampled                    # the published loss (128 negatives)
    python bench/train.py --recbole /tmp/recbole-venv/bin/python --dataset ml-100k
    python bench/train.py --reference --loss full,sampled   # epoch time vs a plain SASRec
    python bench/train.py --dataset ml-100k --max-len 50 --loss full,sampled --epochs 40
                          # time to the same valid NDCG@10: full vs sampled softmax

`--reference` times training epochs of train/ against a reference SASRec written here in
plain PyTorch (`RefSASRec`: the same architecture, loss, batch size and rows; the obvious
code: logits materialised, autograd's cross-entropy, a loss read every step; its sampled
softmax is generative-recommenders' with 128 negatives drawn per position), in one process
under the same thread settings, repeats interleaved, medians; it prints factory / reference
for wall, user and sys seconds per epoch. Each repeat runs the same `--batches` training
batches (a seeded sample of the train rows) from the same initial weights; seconds per
epoch are the median batch time x batches per epoch (a full ML-1M epoch is 48 batches of
~2-3 s on 2 cores: too long to repeat here).

Published reference (ML-1M, leave-one-out, full-catalog ranking, max_len 200, d=50, 2 blocks,
1 head, dropout 0.2, lr 1e-3, batch 128): facebookresearch/generative-recommenders README,
"MovieLens-1M" table (verified there 04/15/2024), rows SASRec (sampled softmax, 128
negatives): HR@10 0.2853, NDCG@10 0.1603; HSTU (same settings, configs/ml-1m/hstu-sampled-
softmax-n128-final.gin): 0.3097 / 0.1720; HSTU-large (8 blocks, 2 heads of 25): 0.3294 /
0.1893; rows BERT4Rec 0.2843 / 0.1537 and GRU4Rec
0.2811 / 0.1648 quoted there from Klenitskiy & Vasilev, RecSys 2023. With one target per
user HR@10 = Recall@10. Their ML-1M is BERT4Rec's (6,040 users, 3,416 items), which is what a
5-core ingest of ML-1M gives. `--recbole PY` runs RecBole's SASRec (CE loss) with the same
hyper-parameters on the same split, exported as RecBole atomic files with each
interaction's position as its timestamp, so both see identical sequences.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train.metrics import PROTOCOL_NAMES  # noqa: E402  (after the path is set)

#: (HR@10 = Recall@10, NDCG@10, protocol), ML-1M, leave-one-out, full-catalog ranking
PUBLISHED = {
    "SASRec (generative-recommenders README)": (0.2853, 0.1603, "masked"),
    "HSTU (generative-recommenders README)": (0.3097, 0.1720, "masked"),
    "HSTU-large (generative-recommenders README)": (0.3294, 0.1893, "masked"),
    "BERT4Rec (Klenitskiy & Vasilev 2023, via the same README)": (0.2843, 0.1537, "masked"),
}
#: the published figures' protocol: it also chooses our best epoch here
PUBLISHED_PROTOCOL = "masked"
RECBOLE_PROTOCOL = "masked"  # RecBole's full-sort evaluation sets history items to -inf

RECBOLE_DRIVER = """
import json, sys, logging
from recbole.quick_start import run_recbole
cfg = json.loads(sys.argv[1])
res = run_recbole(model="SASRec", dataset=cfg.pop("dataset"), config_dict=cfg)
print("RESULT " + json.dumps({k: (dict(v) if hasattr(v, "items") else v)
                              for k, v in res.items()}, default=float), flush=True)
"""


def prepare(work: Path, variant: str, max_len: int, sids: bool = False) -> tuple[Path, Path]:
    """The warehouse and a cache of `max_len`; with `sids`, semantic IDs from `factory sids`
    (3 levels of 256, an extra level where items collide: TIGER decodes one item per SID)."""
    from factory.datasets.ingest import NormaliseOptions, dataset_exists, ingest
    from factory.datasets.movielens import load_movielens
    from factory.exports.cache import export_cache
    from factory.warehouse import Warehouse

    wh = Warehouse(work / "bench.duckdb")
    name = f"ml-{variant}"
    exists = False
    if wh.path.exists():
        with wh.read() as con:
            exists = dataset_exists(con, name)
    if not exists:
        t = time.perf_counter()
        ingest(wh, name, load_movielens(variant), NormaliseOptions(core=5))
        print(f"ingested {name} in {time.perf_counter() - t:.1f}s", flush=True)
    cache = work / f"{name}-loo-L{max_len}" if not sids else work / f"{name}-loo-L{max_len}-sid"
    if sids and not (cache / "manifest.json").exists():
        from jobs.sids import run_sids

        t = time.perf_counter()
        run_sids(wh, name, collisions="extra-level")
        print(f"semantic IDs in {time.perf_counter() - t:.1f}s", flush=True)
    if not (cache / "manifest.json").exists():
        t = time.perf_counter()
        export_cache(wh, name, "loo", cache, max_len, sids=sids)
        print(f"exported the cache in {time.perf_counter() - t:.1f}s", flush=True)
    return wh.path, cache


#: each backbone's published row, the one its ratios are taken against
REFERENCE = {"sasrec": "SASRec (generative-recommenders README)",
             "hstu": "HSTU (generative-recommenders README)",
             "tiger": None}  # no binding public ML-1M TIGER figure


def run_ours(cache: Path, args: argparse.Namespace, out: Path, backbone: str) -> dict:
    """One backbone: the published ML-1M settings for SASRec and HSTU (the same for both),
    SCoTER's T5 settings (TIGER's own defaults) for TIGER."""
    from train.config import Config
    from train.loop import run

    dense = {"dim": 50, "layers": 2, "heads": 1, "dropout": 0.2, "lr": 1e-3,
             "batch_size": 128} if backbone != "tiger" else {}
    cfg = Config(cache=str(cache), out=str(out), backbone=backbone, **dense, epochs=args.epochs,
                 patience=args.patience, threads=args.threads, seed=args.seed,
                 max_minutes=args.max_minutes, protocol=PUBLISHED_PROTOCOL,
                 loss=args.loss if backbone != "tiger" else "full",
                 negatives=args.negatives, device=args.device)
    t = time.perf_counter()
    result = run(cfg, log=lambda m: print(f"  {backbone}: " + m, flush=True))
    result["wall_seconds"] = time.perf_counter() - t
    return result


def write_atomic(warehouse: Path, dataset: str, root: Path) -> None:
    from factory.warehouse import Warehouse

    (root / dataset).mkdir(parents=True, exist_ok=True)
    with Warehouse(warehouse).read() as con:
        rows = con.execute(
            "select user_id, item_id, position from split_interactions"
            " where dataset = ? and split = 'loo' order by user_id, position", [dataset]
        ).fetchall()
    with open(root / dataset / f"{dataset}.inter", "w", encoding="utf-8") as fh:
        fh.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user, item, pos in rows:
            fh.write(f"{user}\t{item}\t{pos}\n")


def run_recbole(python: str, warehouse: Path, dataset: str, args: argparse.Namespace,
                work: Path) -> dict:
    root = work / "recbole"
    write_atomic(warehouse, dataset, root)
    cfg = {
        "dataset": dataset, "data_path": str(root), "checkpoint_dir": str(root / "saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": args.max_len,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full",
                      "group_by": "user"},
        "metrics": ["Recall", "NDCG"], "topk": [5, 10, 20], "valid_metric": "NDCG@10",
        "train_neg_sample_args": None, "loss_type": "CE",
        "hidden_size": 50, "inner_size": 50, "n_layers": 2, "n_heads": 1,
        "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2, "hidden_act": "relu",
        "learning_rate": 1e-3, "train_batch_size": 128, "eval_batch_size": 512,
        "epochs": args.recbole_epochs or args.epochs, "stopping_step": args.patience,
        "seed": args.seed,
        "reproducibility": True, "use_gpu": False, "device": "cpu", "show_progress": False,
        "worker": 0, "save_dataset": False, "save_dataloaders": False,
    }
    t = time.perf_counter()
    done = subprocess.run(
        [python, "-c", RECBOLE_DRIVER, json.dumps(cfg)], capture_output=True, text=True,
        # RecBole 1.2.1 reloads its own checkpoints, which torch >= 2.6 refuses by default
        env={"OMP_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin",
             "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}, cwd=root)
    log = done.stdout + done.stderr
    (work / "recbole.log").write_text(log, encoding="utf-8")
    if done.returncode != 0:
        tail = "\n".join(log.strip().splitlines()[-5:])
        raise RuntimeError(f"RecBole failed (log in {work / 'recbole.log'}):\n{tail}")
    result = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])
    epochs = [float(s) for s in re.findall(r"training \[time: ([\d.]+)s", log)]
    result["seconds_per_epoch"] = sum(epochs) / max(len(epochs), 1)
    result["epochs_run"] = len(epochs)
    result["wall_seconds"] = time.perf_counter() - t
    return result


# -- epoch time against a plain reference SASRec (--reference) ------------------------------
class RefSASRec:
    """Namespace for the reference: SASRec in plain PyTorch, written for this bench only.

    Pre-LayerNorm blocks (LayerNorm -> single-head causal self-attention -> dropout ->
    residual; LayerNorm -> Linear-ReLU-Dropout-Linear -> dropout -> residual), item
    embeddings x sqrt(d) plus learned positions, a final LayerNorm, keys that are padding
    masked out (a padding query sees itself), dropout on the attention weights; items
    scored by the dot product with the item embedding table. This is the architecture of
    train/sasrec.py, written out without its helpers."""

    @staticmethod
    def build(n_items: int, max_len: int, dim: int, layers: int, dropout: float):
        import torch
        from torch import nn

        class Attention(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
                self.o = nn.Linear(dim, dim)
                self.drop = nn.Dropout(dropout)

            def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
                w = self.q(x) @ self.k(x).transpose(1, 2) / dim ** 0.5
                w = torch.softmax(w.masked_fill(blocked, float("-inf")), dim=-1)
                return self.o(self.drop(w) @ self.v(x))

        class Model(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)
                self.pos = nn.Embedding(max_len, dim)
                self.drop = nn.Dropout(dropout)
                self.ln_a = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
                self.ln_f = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
                self.att = nn.ModuleList(Attention() for _ in range(layers))
                self.ffn = nn.ModuleList(
                    nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(dim, dim)) for _ in range(layers))
                self.ln = nn.LayerNorm(dim)

            def forward(self, seq: torch.Tensor) -> torch.Tensor:
                length = seq.shape[1]
                pad = seq == 0
                future = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
                blocked = future | (pad[:, None, :] & ~torch.eye(length, dtype=torch.bool))
                h = self.item(seq) * dim ** 0.5 + self.pos.weight[:length]
                h = self.drop(h).masked_fill(pad[..., None], 0.0)
                for ln_a, att, ln_f, ffn in zip(self.ln_a, self.att, self.ln_f, self.ffn,
                                                strict=True):
                    h = h + self.drop(att(ln_a(h), blocked))
                    h = h + self.drop(ffn(ln_f(h)))
                    h = h.masked_fill(pad[..., None], 0.0)
                return self.ln(h)

        return Model()

    @staticmethod
    def loss(model, seq, target, loss: str, negatives: int, temperature: float):
        """Next-item loss at every non-padding position: the full softmax over the catalog
        (column 0, padding, excluded), or generative-recommenders' sampled softmax (cosine /
        temperature, `negatives` uniform items per position, a negative equal to the
        positive masked)."""
        import torch
        import torch.nn.functional as F

        h = model(seq)
        labels = torch.cat([seq[:, 1:], target[:, None]], 1).masked_fill(seq == 0, 0)
        keep = labels > 0
        h, y = h[keep], labels[keep]
        if loss == "full":
            logits = h @ model.item.weight.T
            logits[:, 0] = float("-inf")
            return F.cross_entropy(logits, y)
        n_items = model.item.num_embeddings - 1
        neg = torch.randint(1, n_items + 1, (len(y), negatives))
        q = F.normalize(h, dim=-1, eps=1e-6)
        pos = (q * F.normalize(model.item(y), dim=-1, eps=1e-6)).sum(-1, keepdim=True)
        negl = torch.einsum("md,mnd->mn", q, F.normalize(model.item(neg), dim=-1, eps=1e-6))
        negl = negl.masked_fill(neg == y[:, None], float("-inf"))
        logits = torch.cat([pos, negl], 1) / temperature
        return -F.log_softmax(logits, 1)[:, 0].mean()


def _usage() -> tuple[float, float, float]:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime


def _timed_repeats(cache, cache_path: Path, part, loss: str, args: argparse.Namespace,
                   epoch_batches: int) -> dict[str, list[tuple[float, float, float]]]:
    """(wall, user, sys) seconds per epoch of each repeat, train/ and the reference
    alternating, each from the same initial weights over the same rows."""
    import numpy as np
    import torch

    from train.config import Config
    from train.loop import build_model, train_epoch

    cfg = Config(cache=str(cache_path), dim=50, layers=2, heads=1, dropout=0.2, lr=1e-3,
                 batch_size=128, loss=loss, negatives=args.negatives, device="cpu")
    torch.manual_seed(args.seed)
    ours0 = build_model(cfg, cache).state_dict()
    torch.manual_seed(args.seed)
    ref0 = RefSASRec.build(cache.n_items, cache.max_len, 50, 2, 0.2).state_dict()

    def ours(fused: bool = True) -> None:
        model = build_model(cfg, cache)
        model.load_state_dict(ours0)
        model.fused_ce = fused
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        train_epoch(model, part, cfg, torch.device("cpu"), opt, scaler,
                    np.random.default_rng(args.seed), None)

    def ref() -> None:
        model = RefSASRec.build(cache.n_items, cache.max_len, 50, 2, 0.2)
        model.load_state_dict(ref0)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        order = np.random.default_rng(args.seed).permutation(len(part))
        for start in range(0, len(order), 128):
            b = np.sort(order[start:start + 128])
            seq = torch.from_numpy(part.seq[b].astype(np.int64))
            target = torch.from_numpy(part.target[b].astype(np.int64))
            out = RefSASRec.loss(model, seq, target, loss, args.negatives, 0.05)
            opt.zero_grad()
            out.backward()
            opt.step()
            if not np.isfinite(out.item()):
                raise RuntimeError("reference diverged")

    sides = {"factory": ours, "reference": ref}
    if loss == "full":  # what the in-place loss buys: train/ with autograd's cross-entropy
        sides["unfused"] = lambda: ours(fused=False)
    times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            t0, u0, s0 = _usage()
            fn()
            t1, u1, s1 = _usage()
            per = epoch_batches / -(-len(part) // 128)
            times[name].append(((t1 - t0) * per, (u1 - u0) * per, (s1 - s0) * per))
    return times


def reference_ratio(cache_path: Path, args: argparse.Namespace, losses: list[str]) -> None:
    """Seconds per training epoch, train/ vs RefSASRec, per loss; see the module doc."""
    import numpy as np
    import torch

    from train.config import Config
    from train.data import Cache, Split
    from train.loop import build_model, evaluate, set_threads, usable_cores

    threads = set_threads(args.threads)
    cache = Cache(cache_path, verify=False)
    full = cache.splits["train"]
    rows = np.sort(np.random.default_rng(args.seed).choice(
        len(full), size=min(len(full), args.batches * 128), replace=False))
    part = Split("train", np.asarray(full.seq[rows]), np.asarray(full.target[rows]), None, None)
    epoch_batches = -(-len(full) // 128)
    print(f"\n{args.dataset}, max_len {cache.max_len}, {cache.n_items:,} items, d 50, 2 blocks, "
          f"1 head, dropout 0.2, batch 128, Adam lr 1e-3; {threads} threads (usable cores "
          f"{usable_cores()}), inter-op 1; {args.batches} batches x {args.repeats} "
          f"interleaved repeats; an epoch is {epoch_batches} batches")
    for loss in losses:
        times = _timed_repeats(cache, cache_path, part, loss, args, epoch_batches)
        med = {k: [float(np.median([t[i] for t in v])) for i in range(3)]
               for k, v in times.items()}
        print(f"loss {loss}" + (f" ({args.negatives} negatives; the reference draws them per "
                                "position, train/ per batch)" if loss == "sampled" else
                                " (softmax over the whole catalog)"))
        for k in med:
            w, u, s_ = med[k]
            label = {"unfused": "factory, loss as before issue 18 (autograd cross-entropy)"
                     }.get(k, k)
            print(f"  {label:<9} s/epoch wall {w:7.1f}  user {u:7.1f}  sys {s_:6.1f}")
        (fw, fu, fs), (rw, ru, rs) = med["factory"], med["reference"]
        print(f"  ratio factory/reference: wall {fw / rw:.2f}, user {fu / ru:.2f}, "
              f"sys {fs / rs if rs > 0.05 else float('nan'):.2f} "
              f"(sys share of CPU: factory {fs / max(fu + fs, 1e-9):.0%}, reference "
              f"{rs / max(ru + rs, 1e-9):.0%})")
    # evaluation is not in an epoch's training seconds, but runs after every epoch by default
    valid = cache.splits["valid"]
    cfg = Config(cache=str(cache_path), dim=50, layers=2, heads=1, dropout=0.2, device="cpu")
    model = build_model(cfg, cache)
    t0, u0, s0 = _usage()
    evaluate(model, valid, cfg, torch.device("cpu"))
    t1, u1, s1 = _usage()
    print(f"one validation pass of train/ ({len(valid):,} rows, full ranking, both protocols): "
          f"wall {t1 - t0:.1f} s, user {u1 - u0:.1f}, sys {s1 - s0:.1f} "
          "(--eval-every N runs it every N epochs)")


# -- full vs sampled softmax: time to the same valid NDCG@10 ---------------------------------
def time_to_ndcg(cache: Path, args: argparse.Namespace, losses: list[str], work: Path) -> None:
    """Train SASRec with each loss (the published settings), evaluate valid NDCG@10 under
    the masked protocol every epoch, and report the training seconds and epoch at which
    each first reaches the target: --target-ndcg, else the lower of the losses' best valid
    NDCG@10 (a level both reach). Training seconds exclude evaluation, timed apart."""
    from train.config import Config
    from train.loop import run

    results = {}
    for loss in losses:
        cfg = Config(cache=str(cache), out=str(work / f"ttn-{loss}"), backbone="sasrec", dim=50,
                     layers=2, heads=1, dropout=0.2, lr=1e-3, batch_size=128,
                     epochs=args.epochs, patience=args.patience, threads=args.threads,
                     seed=args.seed, protocol="masked", loss=loss, negatives=args.negatives,
                     device="cpu", max_minutes=args.max_minutes)
        t = time.perf_counter()
        results[loss] = run(cfg, log=lambda m, loss=loss: print(f"  {loss}: {m}", flush=True))
        results[loss]["wall_seconds"] = time.perf_counter() - t
    best = {k: max(h["valid"]["ndcg@10"] for h in r["history"] if "valid" in h)
            for k, r in results.items()}
    target = args.target_ndcg or min(best.values())
    print(f"\n{args.dataset}, max_len {args.max_len}, SASRec d 50, batch 128, lr 1e-3; valid "
          f"NDCG@10 under the masked protocol each epoch; target {target:.4f}"
          + (" (the lower best of the two)" if not args.target_ndcg else ""))
    print(f"{'loss':<8} {'s/epoch':>8} {'best N@10':>10} {'epoch':>6} {'train s':>8} "
          f"{'to target':>10}")
    for loss, r in results.items():
        spent, hit = 0.0, None
        for h in r["history"]:
            spent += h["seconds"]
            if "valid" in h and h["valid"]["ndcg@10"] >= target:
                hit = (h["epoch"], spent)
                break
        reach = f"{hit[0]:>6} {hit[1]:>8.1f}" if hit else f"{'-':>6} {'-':>8}"
        print(f"{loss:<8} {r['seconds_per_epoch']:>8.2f} {best[loss]:>10.4f} {reach} "
              f"{'reached' if hit else 'not reached':>10}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml-1m", choices=["ml-1m", "ml-100k"])
    p.add_argument("--backbone", default="sasrec",
                   help="comma-separated backbones (sasrec, hstu, tiger); the dense ones "
                        "share one cache, TIGER has its own with SIDs [sasrec]")
    p.add_argument("--loss", default="full",
                   help="full softmax, or the published sampled softmax; a list (full,sampled) "
                        "times each, and without --reference compares their time to the "
                        "same valid NDCG@10 [full]")
    p.add_argument("--reference", action="store_true",
                   help="epoch time of train/ against a plain-PyTorch reference SASRec")
    p.add_argument("--batches", type=int, default=6,
                   help="--reference: training batches per timed repeat [6]")
    p.add_argument("--repeats", type=int, default=3, help="--reference: repeats [3]")
    p.add_argument("--target-ndcg", type=float,
                   help="time-to-NDCG: the valid NDCG@10 to reach [the lower best]")
    p.add_argument("--negatives", type=int, default=128, help="sampled softmax [128]")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--tiger-max-len", type=int, default=20,
                   help="TIGER's history length (its own cache, with SIDs) [20, SCoTER A.1]")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--max-minutes", type=float, help="training time budget of each backbone")
    p.add_argument("--threads", type=int,
                   help="torch threads [usable physical cores, as python -m train]")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work", type=Path, help="keep the warehouse and cache here")
    p.add_argument("--recbole", metavar="PYTHON", help="python of a venv with recbole==1.2.1")
    p.add_argument("--recbole-epochs", type=int,
                   help="RecBole's epoch budget [--epochs]; its epochs hold one sample per "
                        "prefix, about L/2 times our gradient steps")
    args = p.parse_args()
    from train.loop import default_threads

    args.threads = args.threads or default_threads()
    losses = [x.strip() for x in args.loss.split(",") if x.strip()]
    if not losses or set(losses) - {"full", "sampled"}:
        p.error(f"--loss: full, sampled or full,sampled (got {args.loss!r})")
    if args.reference or len(losses) > 1:
        work = args.work or Path(tempfile.mkdtemp(prefix="bench-train-"))
        work.mkdir(parents=True, exist_ok=True)
        cache = prepare(work, args.dataset.removeprefix("ml-"), args.max_len)[1]
        if args.reference:
            reference_ratio(cache, args, losses)
        else:
            time_to_ndcg(cache, args, losses, work)
        print(f"files: {work}")
        return
    args.loss = losses[0]
    backbones = [b.strip() for b in args.backbone.split(",") if b.strip()]
    unknown = [b for b in backbones if b not in REFERENCE]
    if unknown or not backbones:
        p.error(f"--backbone: choose among {', '.join(REFERENCE)} (got {args.backbone!r})")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    variant = args.dataset.removeprefix("ml-")
    warehouse, cache = prepare(work, variant, args.max_len)
    caches = {b: cache for b in backbones}
    if "tiger" in backbones:
        caches["tiger"] = prepare(work, variant, args.tiger_max_len, sids=True)[1]
    ours = {b: run_ours(caches[b], args, work / b, b) for b in backbones}
    budget = (f"{args.max_minutes:g} minutes of training each" if args.max_minutes
              else f"{args.epochs} epochs at most")
    print(f"\n{args.dataset}, max_len {args.max_len}, test split, leave-one-out, full-catalog "
          f"ranking; {args.loss} softmax; best epoch chosen under {PUBLISHED_PROTOCOL!r}; "
          f"{budget}; {args.threads} threads")
    rb = run_recbole(args.recbole, warehouse, args.dataset, args, work) if args.recbole else None
    w = 2 + max(len("published " + name) for name in PUBLISHED)
    head = (f"{'model':<{w}} {'R@10':>7} {'N@10':>7} {'R/pub':>6} {'N/pub':>6} {'s/epoch':>8} "
            f"{'best/run':>9} {'wall s':>7}")
    for proto in ("masked", "full"):
        print(f"\nprotocol {proto}: {PROTOCOL_NAMES[proto]}")
        print(head)
        published = {k: v for k, v in PUBLISHED.items() if v[2] == proto}
        for b, res in ours.items():
            r10, n10 = (res["protocols"][proto]["test"][m] for m in ("recall@10", "ndcg@10"))
            ref = published.get(REFERENCE[b] or "") if args.dataset == "ml-1m" else None
            ratios = (f"{r10 / ref[0]:>6.3f} {n10 / ref[1]:>6.3f}" if ref
                      else f"{'-':>6} {'-':>6}")
            label = f"ours {b} (train/" + (f", L{args.tiger_max_len})" if b == "tiger" else ")")
            print(f"{label:<{w}} {r10:>7.4f} {n10:>7.4f} {ratios} "
                  f"{res['seconds_per_epoch']:>8.1f} "
                  f"{str(res['best_epoch']) + '/' + str(res['epochs_run']):>9} "
                  f"{res['wall_seconds']:>7.0f}")
        if args.dataset == "ml-1m":
            for name, (pr, pn, _) in published.items():
                print(f"{'published ' + name:<{w}} {pr:>7.4f} {pn:>7.4f}")
        if not published or args.dataset != "ml-1m":
            print("(no published figure under this protocol on this dataset; R/pub and N/pub "
                  "are ours over the same backbone's published row)")
        if rb is not None and proto == RECBOLE_PROTOCOL and "sasrec" in ours:
            t = rb["test_result"]
            r10 = ours["sasrec"]["protocols"][proto]["test"]["recall@10"]
            n10 = ours["sasrec"]["protocols"][proto]["test"]["ndcg@10"]
            spe = ours["sasrec"]["seconds_per_epoch"]
            print(f"{'RecBole 1.2.1 SASRec':<{w}} {t['recall@10']:>7.4f} {t['ndcg@10']:>7.4f} "
                  f"{'':>13} {rb['seconds_per_epoch']:>8.1f} {'-/' + str(rb['epochs_run']):>9}")
            print(f"ratio ours sasrec / RecBole: R@10 {r10 / t['recall@10']:.3f}, N@10 "
                  f"{n10 / t['ndcg@10']:.3f}, s/epoch {spe / rb['seconds_per_epoch']:.3f}")
    for b in ("hstu", "tiger"):
        if "sasrec" in ours and b in ours:
            ratio = ours[b]["seconds_per_epoch"] / ours["sasrec"]["seconds_per_epoch"]
            print(f"epoch time {b} / sasrec: {ratio:.2f}")
    print(f"files: {work}")


if __name__ == "__main__":
    main()
