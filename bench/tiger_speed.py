"""TIGER speed on CPU: the old behaviour against the current one, in one run, interleaved
(the machine is shared: only the ratios measured side by side mean much).

1. Training: padded / real encoder tokens over a whole epoch, and seconds per epoch
   (extrapolated from N batches at evenly spaced quantiles of the batches' padded length,
   a stratified sample of each epoch), for the plain
   shuffled order (old) and the length-bucketed order (`train.data.bucketed_order`).
2. Evaluation: seconds per `--eval-rows` rows of the beam search, old (a copy of the
   KV-cached search with `reorder_cache`, kept only here) against `Tiger._beam_search`;
   their beams must be the same items with the same scores.
3. Attention: `sdpa` (transformers' default) against `eager`, per training batch and per
   evaluation, with the largest difference in loss and scores.

On an ml-100k-sized synthetic cache (943 users, 1682 items, 3-level SIDs of 32 codes), TIGER's
defaults (d_model 128, 4 + 4 layers, 6 heads of 64, d_ff 1024, batch 256, 20 beams):

    python bench/tiger_speed.py [--history 20 50] [--batches 4] [--eval-reps 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def old_beam_search(self, seq: torch.Tensor, reasoning: torch.Tensor | None, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """train/tiger.py's beam search before this bench (commit c36c263), for comparison:
    one decoder row per beam with the transformers KV cache, reordered per level."""
    from transformers import DynamicCache, EncoderDecoderCache

    from train.tiger import START

    h, mask, _, _ = self.encode(seq, reasoning)
    b = len(seq)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    score = torch.zeros(b, 1, device=seq.device)
    prefix = torch.zeros(b, 1, dtype=torch.long, device=seq.device)
    last = torch.full((b, 1), START, dtype=torch.long, device=seq.device)
    rows = torch.arange(b, device=seq.device)
    for lvl in range(self.levels):
        nb = score.shape[1]
        out = self.t5(encoder_outputs=(h[rows],), attention_mask=mask[rows].long(),
                      decoder_input_ids=last.reshape(-1, 1), cache=cache, use_cache=True)
        cache = out.cache
        size, lo = self.trie.sizes[lvl], self.offsets[lvl]
        logp = out.logits[:, -1].float().log_softmax(-1)[:, lo:lo + size].view(b, nb, size)
        cand = (score[:, :, None] + logp).masked_fill(~self.trie.allowed(lvl)[prefix],
                                                      float("-inf"))
        score, idx = cand.flatten(1).topk(min(k, nb * size), dim=1)
        beam, code = idx // size, idx % size
        prefix = self.trie.child(lvl)[prefix.gather(1, beam), code]
        prefix = prefix.masked_fill(score == float("-inf"), 0)
        last = code + lo
        if lvl + 1 < self.levels:
            flat = (beam + torch.arange(b, device=seq.device)[:, None] * nb).flatten()
            cache.reorder_cache(flat)
            rows = rows[flat]
    items = prefix.masked_fill(score == float("-inf"), 0)
    if items.shape[1] < k:
        pad = k - items.shape[1]
        items = F.pad(items, (0, pad), value=0)
        score = F.pad(score, (0, pad), value=float("-inf"))
    return items, score


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def train_batch(model, split, rows, cfg, opt) -> float:
    from train.data import batches, next_item_labels
    from train.loop import reasoning_kind

    batch = next(batches(split, len(rows), reasoning=reasoning_kind(cfg), order=rows))
    labels = next_item_labels(batch.seq, batch.target)
    out = model.losses(batch.seq, labels, batch.target, batch.reasoning, batch.time)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    return float(out["loss"].detach())


def bench(history: int, args: argparse.Namespace, work: Path) -> None:
    from train_synthetic import synthetic_cache

    from train.config import parse_args
    from train.data import Cache, bucketed_order
    from train.loop import build_model, seed_everything
    from train.tiger import Tiger

    path = synthetic_cache(work / f"h{history}", n_items=1682, n_users=943, length=history,
                           sid_levels=3, sid_codes=32, unique_sids=True)
    cfg = parse_args(["--cache", str(path), "--backbone", "tiger"])
    cache = Cache(path)
    seed_everything(0)
    model = build_model(cfg, cache)
    assert isinstance(model, Tiger)
    split = model.training_split(cache.splits["train"])
    n, bs = len(split), cfg.batch_size
    lengths = split.lengths * model.levels  # encoder tokens of each example
    orders = {"old": np.random.default_rng(cfg.seed).permutation(n),
              "new": bucketed_order(split.lengths, bs, np.random.default_rng(cfg.seed))}
    n_batches = -(-n // bs)
    print(f"\n== history {history}: {len(cache.splits['train'])} train rows, {n:,} training "
          f"examples, {n_batches} batches of {bs}, {model.levels} SID tokens per item")
    padded = {}
    for name, order in orders.items():
        chunks = [order[i:i + bs] for i in range(0, n, bs)]
        padded[name] = sum(int(lengths[c].max()) * len(c) for c in chunks)
        print(f"  {name}: padded / real encoder tokens {padded[name] / lengths.sum():.2f} "
              f"({padded[name]:,} / {int(lengths.sum()):,})")

    # seconds per epoch: in each order, N full batches at evenly spaced quantiles of their
    # padded length (a stratified sample of the epoch), timed old / new interleaved
    picks = {}
    for name, order in orders.items():
        tokens = np.array([int(lengths[order[i:i + bs]].max()) for i in range(0, n - bs + 1, bs)])
        ranked = np.argsort(tokens, kind="stable")
        picks[name] = ranked[((np.arange(args.batches) + 0.5) / args.batches
                              * len(ranked)).astype(int)]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    seconds: dict[str, list[float]] = {"old": [], "new": []}
    train_batch(model, split, orders["old"][:bs], cfg, opt)  # warm-up
    for i in range(args.batches):
        for name, order in orders.items():
            b = picks[name][i]
            t, _ = timed(lambda order=order, b=b: train_batch(
                model, split, order[b * bs:(b + 1) * bs], cfg, opt))
            seconds[name].append(t)
    for name in orders:
        mean = float(np.mean(seconds[name]))
        print(f"  {name}: {mean:.2f} s per sampled batch -> {mean * n_batches / 60:.1f} min "
              f"per epoch (extrapolated from {args.batches} batches)")
    print(f"  training speed-up (old / new seconds per epoch): "
          f"{np.mean(seconds['old']) / np.mean(seconds['new']):.2f}x")

    # evaluation: old and new beam search on the same rows, interleaved
    model.eval()
    seq = torch.from_numpy(np.asarray(cache.splits["valid"].seq[:args.eval_rows],
                                      dtype=np.int64))
    k = cfg.beam
    ev = {"old": [], "new": []}
    with torch.no_grad():
        model._beam_search(seq[:8], None, k)  # warm-up
        for _ in range(args.eval_reps):
            t_old, (items_old, score_old) = timed(lambda: old_beam_search(model, seq, None, k))
            t_new, (items_new, score_new) = timed(lambda: model._beam_search(seq, None, k))
            ev["old"].append(t_old)
            ev["new"].append(t_new)
    same = bool((items_old == items_new).all())
    diff = float((score_old - score_new).abs().max())
    print(f"  eval ({len(seq)} rows, {k} beams): old {np.mean(ev['old']):.2f} s, new "
          f"{np.mean(ev['new']):.2f} s: {np.mean(ev['old']) / np.mean(ev['new']):.2f}x; "
          f"same items {same}, largest score difference {diff:.1e}")

    if args.attention:
        attention(model, split, orders["new"], cfg, seq, k, args)


def attention(model, split, order, cfg, seq, k, args) -> None:
    """sdpa (the default) against eager, on bucketed training batches and evaluation."""
    bs = cfg.batch_size
    n_batches = len(order) // bs
    pick = np.random.default_rng(2).choice(n_batches, size=args.batches, replace=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: losses compare
    seconds: dict[str, list[float]] = {"sdpa": [], "eager": []}
    losses: dict[str, list[float]] = {"sdpa": [], "eager": []}
    model.train()
    for b in pick:
        for impl in seconds:
            model.t5.set_attn_implementation(impl)
            torch.manual_seed(int(b))  # same dropout masks
            t, loss = timed(lambda b=b: train_batch(model, split, order[b * bs:(b + 1) * bs],
                                                    cfg, opt))
            seconds[impl].append(t)
            losses[impl].append(loss)
    dl = max(abs(a - b) for a, b in zip(losses["sdpa"], losses["eager"], strict=True))
    print(f"  attention, training batch: sdpa {np.mean(seconds['sdpa']):.2f} s, eager "
          f"{np.mean(seconds['eager']):.2f} s (eager / sdpa "
          f"{np.mean(seconds['eager']) / np.mean(seconds['sdpa']):.2f}); "
          f"largest loss difference {dl:.1e}")
    model.eval()
    ev: dict[str, list[float]] = {"sdpa": [], "eager": []}
    got = {}
    with torch.no_grad():
        for _ in range(args.eval_reps):
            for impl in ev:
                model.t5.set_attn_implementation(impl)
                t, got[impl] = timed(lambda: model._beam_search(seq, None, k))
                ev[impl].append(t)
    model.t5.set_attn_implementation("sdpa")
    diff = float((got["sdpa"][1] - got["eager"][1]).abs().max())
    print(f"  attention, eval: sdpa {np.mean(ev['sdpa']):.2f} s, eager "
          f"{np.mean(ev['eager']):.2f} s (eager / sdpa "
          f"{np.mean(ev['eager']) / np.mean(ev['sdpa']):.2f}); same items "
          f"{bool((got['sdpa'][0] == got['eager'][0]).all())}, largest score difference "
          f"{diff:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--history", type=int, nargs="+", default=[20, 50],
                   help="items per synthetic user (the cache's max_len)")
    p.add_argument("--batches", type=int, default=4, help="training batches timed per order")
    p.add_argument("--eval-rows", type=int, default=128)
    p.add_argument("--eval-reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads [1: on a shared 2-core machine, 2 threads ran 2-5x "
                        "slower than 1 whenever other jobs held a core]")
    p.add_argument("--no-attention", dest="attention", action="store_false",
                   help="skip the sdpa / eager comparison")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for history in args.history:
            bench(history, args, Path(tmp))


if __name__ == "__main__":
    main()
