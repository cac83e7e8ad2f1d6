"""train/hstu.py and sampled softmax, on tiny synthetic caches (mirrors tests/test_train.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_synthetic import synthetic_cache

from train.config import Config, parse_args
from train.data import Cache, batches, next_item_labels
from train.hstu import HSTU
from train.loop import build_model, run
from train.metrics import metrics_from_ranks, target_ranks

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(2)
FAST = {"backbone": "hstu", "dim": 32, "batch_size": 64, "threads": 2, "lr": 3e-3}


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    return {
        "oracle": synthetic_cache(root / "oracle", steps="oracle"),
        "cycle": synthetic_cache(root / "cycle", pattern="cycle", times=True),
        "plain": synthetic_cache(root / "plain"),
    }


def _run(tmp_path: Path, cache: Path, name: str, **kw) -> dict:
    cfg = Config(cache=str(cache), out=str(tmp_path / name), **{**FAST, **kw})
    return run(cfg, log=lambda _msg: None)


def _model(cache: Path, **kw) -> torch.nn.Module:
    return build_model(Config(cache="", **{**FAST, **kw}), Cache(cache)).eval()


def test_hstu_is_registered_with_the_reference_ml1m_defaults() -> None:
    cfg = parse_args(["--cache", "c", "--backbone", "hstu"])
    assert (cfg.dim, cfg.layers, cfg.heads, cfg.dropout, cfg.lr, cfg.batch_size) == (
        50, 2, 1, 0.2, 1e-3, 128)
    assert (cfg.loss, cfg.negatives) == ("full", 128)
    sampled = parse_args(["--cache", "c", "--backbone", "sasrec", "--loss", "sampled",
                          "--negatives", "64"])
    assert (sampled.loss, sampled.negatives, sampled.softmax_temperature) == (
        "sampled", 64, 0.05)


def test_hstu_is_causal_and_rows_are_independent(caches: dict[str, Path]) -> None:
    cache = Cache(caches["cycle"])
    model = _model(caches["cycle"])
    assert isinstance(model.backbone, HSTU)
    seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]])
    time = torch.tensor([[0, 0, 10, 20, 400, 9_000, 50_000, 900_000]])
    changed = seq.clone()
    changed[0, 5:] = torch.tensor([20, 21, 22])
    with torch.no_grad():
        a, b = model.backbone(seq, time), model.backbone(changed, time)
        # query i reads the time of i + 1: times after i + 1 are invisible to it
        later = time.clone()
        later[0, 6:] += 10_000_000
        c = model.backbone(seq, later)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)  # the past never sees the future
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    assert torch.allclose(a[:, :5], c[:, :5], atol=1e-6)
    batch = next(batches(cache.splits["test"], 16))
    assert batch.time is not None
    with torch.no_grad():
        together = model.scores(batch.seq, None, batch.time)
        alone = model.scores(batch.seq[3:4], None, batch.time[3:4])
    assert torch.allclose(together[3:4], alone, atol=1e-5)  # no batch leak at ranking time


def _popularity_ndcg(cache: Cache) -> float:
    counts = np.bincount(np.asarray(cache.splits["train"].target), minlength=cache.n_items + 1)
    test = cache.splits["test"]
    scores = torch.tensor(counts, dtype=torch.float32).repeat(len(test), 1)
    scores[:, 0] = float("-inf")
    return metrics_from_ranks(target_ranks(scores, torch.from_numpy(
        np.asarray(test.target, dtype=np.int64))))["ndcg@10"]


def test_hstu_learns_a_planted_next_item_rule(caches: dict[str, Path], tmp_path: Path) -> None:
    result = _run(tmp_path, caches["cycle"], "cycle", epochs=8)
    popularity = _popularity_ndcg(Cache(caches["cycle"]))
    assert popularity < 0.4
    assert result["test"]["ndcg@10"] > 0.9 > popularity + 0.5
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < losses[0] / 2
    assert result["params"]["backbone"] == "hstu"


def test_informative_steps_help_hstu_and_shuffled_steps_do_not(
        caches: dict[str, Path], tmp_path: Path) -> None:
    cache = caches["oracle"]  # histories are random; the last step embeds the target's text
    fast = {"epochs": 6, "lr": 1e-2}
    base = _run(tmp_path, cache, "base", **fast)["test"]["ndcg@10"]
    fused = _run(tmp_path, cache, "fused", fusion="scoter", **fast)["test"]["ndcg@10"]
    shuffled = _run(tmp_path, cache, "shuffled", fusion="scoter", shuffle_steps=True,
                    **fast)["test"]["ndcg@10"]
    assert base < 0.25
    assert fused > base + 0.5
    assert shuffled < base + 0.08


def test_time_bias_counts_only_when_times_are_given(caches: dict[str, Path]) -> None:
    model = _model(caches["cycle"])
    seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]])
    close = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]])
    apart = torch.tensor([[0, 0, 1, 100, 10_000, 1_000_000, 2_000_000, 90_000_000]])
    rab = model.backbone.rab
    with torch.no_grad():
        rab.time_w.normal_(std=1.0)  # make the time weights matter
        plain, t_close, t_apart = (model.backbone(seq, t) for t in (None, close, apart))
        rab.time_w.normal_(std=1.0)
        plain_again = model.backbone(seq, None)
    assert not torch.allclose(t_close[:, -1], t_apart[:, -1], atol=1e-4)
    assert not torch.allclose(plain[:, -1], t_apart[:, -1], atol=1e-4)
    assert torch.equal(plain, plain_again)  # without times the time weights are unused
    # query i is bucketed by t[i + 1] - t[j]; the last query repeats its own time
    buckets = rab.time_buckets(apart)[0]
    assert buckets[3, 2] == int(np.log(10_000 - 1) / 0.301)
    assert buckets[7, 7] == 0 and buckets[7, 6] == int(np.log(88_000_000) / 0.301)


def test_a_cache_without_times_trains_and_says_so(caches: dict[str, Path],
                                                  tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = Config(cache=str(caches["plain"]), out=str(tmp_path / "p"), epochs=1, **FAST)
    run(cfg, log=lines.append)
    assert sum("no timestamps" in line for line in lines) == 1


def test_sampled_softmax_learns_and_never_counts_the_positive_as_a_negative(
        caches: dict[str, Path], tmp_path: Path) -> None:
    model = _model(caches["cycle"], loss="sampled", negatives=128)  # 40 items: many repeats
    split = Cache(caches["cycle"]).splits["train"]
    batch = next(batches(split, 64))
    labels = next_item_labels(batch.seq, batch.target)
    mask = labels > 0
    torch.manual_seed(0)
    with torch.no_grad():
        states = model.backbone(batch.seq, batch.time)[mask]
        logits, neg = model.sampled_logits(states, labels[mask])
    assert logits.shape == (int(mask.sum()), 129) and bool(torch.isfinite(logits[:, 0]).all())
    same = neg[None, :] == labels[mask][:, None]
    assert bool(same.any())  # the draw did hit positives ...
    assert bool(torch.isneginf(logits[:, 1:][same]).all())  # ... and they were masked out
    assert bool(torch.isfinite(logits[:, 1:][~same]).all())
    assert int(neg.min()) >= 1 and int(neg.max()) <= 40  # never the padding item
    torch.manual_seed(0)
    again = model.sampled_logits(states, labels[mask])[1]
    assert torch.equal(neg, again)  # seeded through torch's RNG
    result = _run(tmp_path, caches["cycle"], "sampled", epochs=6, loss="sampled",
                  negatives=16)
    assert result["test"]["ndcg@10"] > 0.9


def test_a_diverged_hstu_run_stops_with_one_line(caches: dict[str, Path],
                                                 tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "nan"
    done = subprocess.run(
        [sys.executable, "-m", "train", "--cache", str(caches["plain"]), "--backbone", "hstu",
         "--lr", "1e30", "--epochs", "2", "--dim", "16", "--threads", "1", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged" in errors[0]
    assert "Traceback" not in done.stderr and "recall@10" not in done.stdout
    assert not (out / "metrics.json").exists()
