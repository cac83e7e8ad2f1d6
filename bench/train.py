"""Baseline SASRec on MovieLens through the whole pipeline (ingest -> export cache -> train),
against published full-ranking figures and, optionally, RecBole on the very same split.

    python bench/train.py                                   # ML-1M, max_len 200, 30 epochs
    python bench/train.py --epochs 200 --patience 20        # the published budget
    python bench/train.py --recbole /tmp/recbole-venv/bin/python --dataset ml-100k

Published reference (ML-1M, leave-one-out, full-catalog ranking, max_len 200, d=50, 2 blocks,
1 head, dropout 0.2, lr 1e-3, batch 128): facebookresearch/generative-recommenders README,
"MovieLens-1M" table (verified there 04/15/2024), row SASRec (sampled softmax, 128
negatives): HR@10 0.2853, NDCG@10 0.1603; rows BERT4Rec 0.2843 / 0.1537 and GRU4Rec
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

#: (HR@10 = Recall@10, NDCG@10, protocol), ML-1M, leave-one-out, full-catalog ranking
PUBLISHED = {
    "SASRec (generative-recommenders README)": (0.2853, 0.1603, "masked"),
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


def prepare(work: Path, variant: str, max_len: int) -> tuple[Path, Path]:
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
    cache = work / f"{name}-loo-L{max_len}"
    if not (cache / "manifest.json").exists():
        t = time.perf_counter()
        export_cache(wh, name, "loo", cache, max_len)
        print(f"exported the cache in {time.perf_counter() - t:.1f}s", flush=True)
    return wh.path, cache


def run_ours(cache: Path, args: argparse.Namespace, out: Path) -> dict:
    from train.config import Config
    from train.loop import run

    cfg = Config(cache=str(cache), out=str(out), dim=50, layers=2, heads=1, dropout=0.2,
                 lr=1e-3, batch_size=128, epochs=args.epochs, patience=args.patience,
                 threads=args.threads, seed=args.seed, max_minutes=args.max_minutes,
                 protocol=PUBLISHED_PROTOCOL)
    return run(cfg, log=lambda m: print("  ours: " + m, flush=True))


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml-1m", choices=["ml-1m", "ml-100k"])
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--max-minutes", type=float, help="training time budget (ours)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work", type=Path, help="keep the warehouse and cache here")
    p.add_argument("--recbole", metavar="PYTHON", help="python of a venv with recbole==1.2.1")
    p.add_argument("--recbole-epochs", type=int,
                   help="RecBole's epoch budget [--epochs]; its epochs hold one sample per "
                        "prefix, about L/2 times our gradient steps")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    warehouse, cache = prepare(work, args.dataset.removeprefix("ml-"), args.max_len)
    ours = run_ours(cache, args, work / "ours")
    by = ours["protocols"]
    spe, be = ours["seconds_per_epoch"], f"{ours['best_epoch']}/{ours['epochs_run']}"
    print(f"\n{args.dataset}, max_len {args.max_len}, test split, leave-one-out, full-catalog "
          f"ranking; best epoch chosen under {ours['protocol']!r}; {args.epochs} epochs at "
          f"most (RecBole {args.recbole_epochs or args.epochs}), {args.threads} threads")
    rb = run_recbole(args.recbole, warehouse, args.dataset, args, work) if args.recbole else None
    head = f"{'model':<58} {'R@10':>7} {'N@10':>7} {'s/epoch':>8} {'best/run':>9}"
    for proto in ("masked", "full"):
        print(f"\nprotocol {proto}: {by[proto]['name']}")
        print(head)
        r10, n10 = by[proto]["test"]["recall@10"], by[proto]["test"]["ndcg@10"]
        print(f"{'ours (train/)':<58} {r10:>7.4f} {n10:>7.4f} {spe:>8.1f} {be:>9}")
        published = {k: v for k, v in PUBLISHED.items() if v[2] == proto}
        if args.dataset == "ml-1m":
            for name, (pr, pn, _) in published.items():
                print(f"{'published ' + name:<58} {pr:>7.4f} {pn:>7.4f}")
            for name, (pr, pn, _) in list(published.items())[:1]:
                print(f"ratio ours / published {name.split(' (')[0]}: R@10 {r10 / pr:.3f}, "
                      f"N@10 {n10 / pn:.3f}")
        if not published or args.dataset != "ml-1m":
            print("(no published figure under this protocol on this dataset)")
        if rb is not None and proto == RECBOLE_PROTOCOL:
            t = rb["test_result"]
            print(f"{'RecBole 1.2.1 SASRec':<58} {t['recall@10']:>7.4f} {t['ndcg@10']:>7.4f} "
                  f"{rb['seconds_per_epoch']:>8.1f} {'-/' + str(rb['epochs_run']):>9}")
            print(f"ratio ours / RecBole: R@10 {r10 / t['recall@10']:.3f}, N@10 "
                  f"{n10 / t['ndcg@10']:.3f}, s/epoch {spe / rb['seconds_per_epoch']:.3f}")
    print(f"files: {work}")


if __name__ == "__main__":
    main()
