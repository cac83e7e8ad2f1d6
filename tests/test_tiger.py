"""train/tiger.py: TIGER's SID trie, constrained beam search, sliding-prefix training,
SCoTER-T fusion, and its runs through train.loop, on tiny synthetic caches."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_synthetic import synthetic_cache

import train.loop
from train.config import Config, parse_args
from train.data import Cache, CacheError, batches, bucketed_order
from train.loop import build_model, evaluate, run, train_epoch
from train.metrics import MISS, list_ranks, metrics_from_ranks
from train.tiger import Tiger, Trie, prefix_split

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
TINY = {"backbone": "tiger", "dim": 32, "layers": 1, "heads": 2, "d_kv": 16, "ffn_dim": 64,
        "batch_size": 64, "lr": 3e-3, "threads": 1}


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiger")
    sid = {"sid_levels": 2, "unique_sids": True}
    return {
        "cycle": synthetic_cache(root / "cycle", pattern="cycle", **sid),
        "oracle": synthetic_cache(root / "oracle", steps="oracle", **sid),
        "small": synthetic_cache(root / "small", n_items=6, n_users=20, length=5, **sid),
        "sparse": synthetic_cache(root / "sparse", n_items=30, n_users=20, sid_levels=3,
                                  unique_sids=True),  # 30 of 512 possible SIDs
        "plain": synthetic_cache(root / "plain"),
        "collide": synthetic_cache(root / "collide", sid_levels=1),  # 40 items, 8 codes
    }


def _model(cache: Path, seed: int = 0, **kw) -> Tiger:
    torch.manual_seed(seed)
    model = build_model(Config(cache="", **{**TINY, **kw}), Cache(cache))
    assert isinstance(model, Tiger)
    return model.eval()


def _run(tmp_path: Path, cache: Path, name: str, **kw) -> dict:
    cfg = Config(cache=str(cache), out=str(tmp_path / name), **{**TINY, **kw})
    return run(cfg, log=lambda _msg: None)


def _seqs(cache: Path, split: str = "test", n: int = 64) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Cache(cache).splits[split].seq[:n], dtype=np.int64))


# -- trie and beam search ------------------------------------------------------------------
def test_trie_admits_exactly_the_catalogue(caches: dict[str, Path]) -> None:
    sid = Cache(caches["sparse"]).sid
    trie = Trie(sid)
    every = torch.tensor(list(itertools.product(*(range(s) for s in trie.sizes))))
    found = trie.item(every)
    catalogue = {tuple(c): i for i, c in enumerate(sid.tolist()) if i > 0}
    for codes, item in zip(every.tolist(), found.tolist(), strict=True):
        assert item == catalogue.get(tuple(codes), 0)
    assert int((found > 0).sum()) == 30
    # each level's table allows exactly the codes some catalogue item continues with
    assert int(trie.allowed(0).sum()) == len({c[:1] for c in catalogue})
    assert int(trie.allowed(1).sum()) == len({c[:2] for c in catalogue})
    assert int(trie.allowed(2).sum()) == 30
    assert trie.item(torch.tensor([[-1, 0, 0], [99, 0, 0]])).tolist() == [0, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beams_are_catalogue_items_even_from_an_untrained_model(caches: dict[str, Path],
                                                                seed: int) -> None:
    model = _model(caches["sparse"], seed=seed)
    seq = _seqs(caches["sparse"])
    items, scores = model.ranked(seq, None, 25)
    assert items.shape == scores.shape == (len(seq), 25)
    assert bool(torch.isfinite(scores).all()) and bool((items >= 1).all())
    assert bool((items <= 30).all())
    assert all(len(set(row)) == 25 for row in items.tolist())  # one beam per SID
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # best first
    # an unconstrained decoder would leave the catalogue: its greedy SID mostly is not one
    h, mask, _, _ = model.encode(seq, None)
    dec = torch.full((len(seq), 1), 1)
    with torch.no_grad():
        for _ in range(3):
            logits = model.t5(encoder_outputs=(h,), attention_mask=mask.long(),
                              decoder_input_ids=dec).logits[:, -1]
            dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], 1)
    codes = dec[:, 1:] - torch.tensor(model.offsets)
    assert float((model.trie.item(codes) == 0).float().mean()) > 0.5
    # a beam's score is its SID's summed log-probability under teacher forcing
    want = model.item_tokens[items[:, 3]]
    dec = torch.cat([torch.ones_like(want[:, :1]), want[:, :-1]], 1)
    with torch.no_grad():
        logp = model.t5(encoder_outputs=(h,), attention_mask=mask.long(),
                        decoder_input_ids=dec).logits.log_softmax(-1)
    assert torch.allclose(logp.gather(2, want[..., None]).sum((1, 2)), scores[:, 3], atol=1e-4)


def test_every_beams_score_is_its_teacher_forced_log_probability(
        caches: dict[str, Path]) -> None:
    model = _model(caches["sparse"], seed=3)
    seq = _seqs(caches["sparse"], n=16)
    items, scores = model.ranked(seq, None, 12)
    want = model.item_tokens[items]  # (rows, beams, levels)
    h, mask, _, _ = model.encode(seq, None)
    dec = torch.cat([torch.ones_like(want[..., :1]), want[..., :-1]], -1).flatten(0, 1)
    with torch.no_grad():
        logp = model.t5(encoder_outputs=(h.repeat_interleave(12, 0),),
                        attention_mask=mask.repeat_interleave(12, 0).long(),
                        decoder_input_ids=dec).logits.log_softmax(-1)
    forced = logp.gather(2, want.flatten(0, 1)[..., None]).sum((1, 2)).view(16, 12)
    assert torch.allclose(forced, scores, atol=1e-4)


def test_a_small_catalogue_gives_fewer_beams(caches: dict[str, Path]) -> None:
    model = _model(caches["small"])
    items, scores = model.ranked(_seqs(caches["small"]), None, 20)
    assert items.shape == (20, 20)
    assert bool((items[:, :6] > 0).all()) and bool(torch.isfinite(scores[:, :6]).all())
    assert all(sorted(row[:6]) == list(range(1, 7)) for row in items.tolist())
    assert bool((items[:, 6:] == 0).all()) and bool((scores[:, 6:] == -math.inf).all())


def test_beam_ranked_lists_by_hand(caches: dict[str, Path]) -> None:
    """Beams come as SIDs; the trie maps them to items, list_ranks ranks the target."""
    sid = Cache(caches["sparse"]).sid
    trie = Trie(sid)
    beams = torch.tensor(sid[[[3, 7, 9, 4], [5, 6, 2, 1], [8, 8, 8, 8], [2, 3, 4, 5]]])
    beams[2, 1:] = -1  # row 2: one beam, then nothing (fewer SIDs than beams)
    items = trie.item(beams)
    assert items.tolist() == [[3, 7, 9, 4], [5, 6, 2, 1], [8, 0, 0, 0], [2, 3, 4, 5]]
    inf = math.inf
    scores = torch.tensor([[-1.0, -2.0, -3.0, -4.0],   # target 9: rank 2
                           [-1.0, -2.0, -2.0, -3.0],   # target 2 ties with 6: rank 2
                           [-1.0, -inf, -inf, -inf],   # target 5 not listed: a miss
                           [-1.0, -2.0, -3.0, -4.0]])  # target 4, history holds 2 and 3
    targets = torch.tensor([9, 2, 5, 4])
    history = torch.tensor([[0, 1], [0, 1], [0, 1], [2, 3]])
    full = list_ranks(items, scores, targets)
    masked = list_ranks(items, scores, targets, exclude=history)
    assert full.tolist() == [2, 2, MISS, 2]
    assert masked.tolist() == [2, 2, MISS, 0]
    m = metrics_from_ranks(masked, ks=(1, 3, 5), depth=4)
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@3"] == pytest.approx(3 / 4)
    assert m["ndcg@3"] == pytest.approx((2 / math.log2(4) + 1) / 4)
    assert m["recall@5"] is None and m["ndcg@5"] is None  # beyond the 4 beams
    # through the loop: a TIGER run's metrics stop at its --beam depth
    model = _model(caches["cycle"])
    got = evaluate(model, Cache(caches["cycle"]).splits["valid"],
                   Config(cache="", **{**TINY, "beam": 5}), torch.device("cpu"))
    for proto in ("full", "masked"):
        assert got[proto]["recall@5"] is not None
        assert got[proto]["recall@10"] is None and got[proto]["ndcg@50"] is None


# -- training examples and fusion ------------------------------------------------------------
def test_training_examples_are_sliding_prefixes_without_their_target(
        caches: dict[str, Path]) -> None:
    train = Cache(caches["oracle"]).splits["train"]
    seq, target = np.asarray(train.seq), np.asarray(train.target)
    perm = np.random.default_rng(0).permutation(len(train))
    ex = prefix_split(train, perm)
    assert len(ex) == int((seq > 0).sum())  # one example per history item
    every = np.arange(len(ex))
    windows, targets = ex.seq[every], ex.target
    assert not (windows == targets[:, None]).any()
    steps = ex.steps[every]
    k = 0
    for r in range(len(train)):
        items = [int(i) for i in seq[r] if i]
        full = items + [int(target[r])]
        for t in range(1, len(full)):
            hist = windows[k][windows[k] > 0].tolist()
            assert hist == full[:t] and targets[k] == full[t]
            assert windows[k][-1] == full[t - 1]  # left-padded, most recent last
            own = t == len(full) - 1  # only the row itself gets the row's reasoning
            want = np.asarray(train.steps[perm[r]], np.float32) if own else 0.0
            assert np.array_equal(steps[k], np.broadcast_to(want, steps[k].shape))
            k += 1
    batch = next(batches(ex, 32, reasoning="steps", order=every[::-1].copy()))
    assert batch.reasoning.shape == (32, 3, 16)


def test_bucketed_batches_visit_every_example_once_and_are_seeded(
        caches: dict[str, Path]) -> None:
    ex = prefix_split(Cache(caches["cycle"]).splits["train"])
    n, every = len(ex), np.arange(len(ex))
    assert np.array_equal(ex.lengths, (ex.seq[every] > 0).sum(1))  # items per example

    def order(seed: int, size: int = 64, chunk: int = 4) -> np.ndarray:
        return bucketed_order(ex.lengths, size, np.random.default_rng(seed), chunk=chunk)

    def padded(o: np.ndarray, size: int = 64) -> int:
        return sum(int(ex.lengths[o[i:i + size]].max()) * len(o[i:i + size])
                   for i in range(0, n, size))

    for size, chunk in itertools.product((64, 100, n, n + 1), (1, 4, 50)):
        assert np.array_equal(np.sort(order(0, size, chunk)), every)  # each example once
    assert np.array_equal(order(0), order(0)) and not np.array_equal(order(0), order(1))
    assert padded(order(0, chunk=50)) < 1.05 * ex.lengths.sum()  # shuffled: about 5/3
    assert padded(order(0)) < padded(order(0, chunk=1))  # more batches sorted together
    assert padded(np.random.default_rng(0).permutation(n)) > 1.5 * ex.lengths.sum()
    # the loop batches TIGER's epoch in that order: every example once, similar lengths
    seen: list[np.ndarray] = []

    def recording(*args, **kw):
        for batch in batches(*args, **kw):
            seen.append(batch.rows)
            yield batch
    model = _model(caches["cycle"]).train()
    cfg = Config(cache="", **TINY)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    original, train.loop.batches = train.loop.batches, recording
    try:
        train_epoch(model, ex, cfg, torch.device("cpu"), opt,
                    torch.amp.GradScaler("cuda", enabled=False), np.random.default_rng(7),
                    None)
    finally:
        train.loop.batches = original
    assert np.array_equal(np.sort(np.concatenate(seen)), every)
    assert np.array_equal(np.concatenate(seen), np.concatenate(
        [np.sort(b) for b in np.array_split(bucketed_order(
            ex.lengths, cfg.batch_size, np.random.default_rng(7)),
            range(cfg.batch_size, n, cfg.batch_size))]))


def test_rows_without_steps_keep_their_plain_encoder_states(caches: dict[str, Path]) -> None:
    model = _model(caches["oracle"], fusion="scoter")
    seq = _seqs(caches["oracle"], n=3)
    steps = torch.randn(3, 3, 16)
    steps[1] = 0.0
    with torch.no_grad():
        fused, _, z, has = model.encode(seq, steps)
        model.fusion, keep = None, model.fusion
        plain, _, _, _ = model.encode(seq, None)
        model.fusion = keep
    assert has.tolist() == [True, False, True] and z.shape == (2, 32)
    assert torch.allclose(fused[1], plain[1]) and not torch.allclose(fused[0], plain[0])
    out = model.train().losses(seq, seq, torch.tensor([5, 6, 7]), steps)
    assert {"rec", "nce", "loss"} <= set(out) and bool(torch.isfinite(out["loss"]))
    assert "nce" not in _model(caches["oracle"], fusion="scoter", ablate=["contrastive"]
                               ).train().losses(seq, seq, torch.tensor([5, 6, 7]), steps)


# -- learning ------------------------------------------------------------------------------
def test_tiger_overfits_a_tiny_dataset(tmp_path: Path) -> None:
    cache = synthetic_cache(tmp_path / "tiny", n_items=30, n_users=24, length=6,
                            sid_levels=2, unique_sids=True)  # random histories: memorise
    result = _run(tmp_path, cache, "tiny", epochs=60, lr=1e-2, dropout=0.0, beam=10,
                  save_model=True, patience=100, eval_every=20)
    model = _model(cache, dropout=0.0)
    model.load_state_dict(torch.load(Path(result["out"]) / "model.pt"))
    got = evaluate(model, Cache(cache).splits["train"], Config(cache="", **TINY, beam=10),
                   torch.device("cpu"))
    assert got["full"]["recall@10"] == 1.0


def test_tiger_learns_a_planted_rule_well_above_popularity(caches: dict[str, Path],
                                                            tmp_path: Path) -> None:
    cache = Cache(caches["cycle"])  # the next item is the last one plus one
    counts = np.bincount(np.asarray(cache.splits["train"].target), minlength=41)
    top10 = np.argsort(-counts)[:10]
    popularity = float(np.isin(np.asarray(cache.splits["test"].target), top10).mean())
    result = _run(tmp_path, caches["cycle"], "cycle", epochs=10)
    assert popularity < 0.35
    assert result["test"]["recall@10"] > popularity + 0.4
    assert result["history"][-1]["loss"] < result["history"][0]["loss"] / 2


def test_oracle_steps_lift_fused_tiger_and_shuffled_steps_do_not(
        caches: dict[str, Path], tmp_path: Path) -> None:
    cache = caches["oracle"]  # random histories; the last step embeds the target's text
    kw = {"epochs": 8, "lr": 5e-3}
    base = _run(tmp_path, cache, "base", **kw)["test"]["ndcg@10"]
    fused = _run(tmp_path, cache, "fused", fusion="scoter", **kw)
    shuffled = _run(tmp_path, cache, "shuffled", fusion="scoter", shuffle_steps=True,
                    **kw)["test"]["ndcg@10"]
    assert "nce" in fused["history"][0]
    assert base < 0.25
    assert fused["test"]["ndcg@10"] > base + 0.3
    assert shuffled < base + 0.08


# -- errors and the command line -------------------------------------------------------------
def test_caches_without_or_with_shared_sids_are_refused(caches: dict[str, Path]) -> None:
    for name, says in (("plain", "no sid column"), ("collide", "share a semantic ID")):
        with pytest.raises(CacheError, match=says) as err:
            build_model(Config(cache="", **TINY), Cache(caches[name]))
        msg = str(err.value)
        assert "\n" not in msg and "factory sids --collisions extra-level" in msg
        assert "factory export cache --sids" in msg


def test_tiger_defaults_follow_scoter_table8() -> None:
    cfg = parse_args(["--cache", "x", "--backbone", "tiger"])
    assert (cfg.dim, cfg.layers, cfg.heads, cfg.d_kv, cfg.ffn_dim) == (128, 4, 6, 64, 1024)
    assert (cfg.lr, cfg.batch_size, cfg.dropout, cfg.beam) == (1e-4, 256, 0.1, 20)
    assert parse_args(["--cache", "x"]).d_kv is None  # SASRec has no d_kv


def _cli(tmp_path: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    small = ["--dim", "16", "--layers", "1", "--heads", "2", "--d-kv", "8", "--ffn-dim", "32",
             "--threads", "1"]
    return subprocess.run([sys.executable, "-m", "train", "--cache", str(cache),
                           "--backbone", "tiger", *small, *args],
                          cwd=tmp_path, capture_output=True, text=True, env=env)


def test_a_nan_loss_stops_a_tiger_run_with_one_line(caches: dict[str, Path],
                                                    tmp_path: Path) -> None:
    out = tmp_path / "nan"
    done = _cli(tmp_path, caches["cycle"], "--lr", "1e30", "--epochs", "2", "--out", str(out))
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged" in errors[0]
    assert "Traceback" not in done.stderr and not (out / "metrics.json").exists()


def test_predict_writes_beam_candidates(caches: dict[str, Path], tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "cands.parquet"
    done = _cli(tmp_path, caches["cycle"], "--epochs", "1", "--predict", "--top-k", "7",
                "--out", str(path))
    assert done.returncode == 0, done.stderr
    cache = Cache(caches["cycle"])
    con = duckdb.connect()
    rows = con.execute(f"select part, count(*), min(len(item_ids)), max(len(item_ids)) "
                       f"from '{path}' group by part order by part").fetchall()
    assert rows == [(p, len(cache.splits[p]), 7, 7) for p in ("test", "train", "valid")]
    ordered = con.execute(f"select bool_and(list_sort(scores, 'DESC') = scores) "
                          f"from '{path}'").fetchone()[0]
    assert ordered
    listed = {r[0] for r in con.execute(f"select distinct unnest(item_ids) from '{path}'")
              .fetchall()}
    assert listed <= {f"i{i}" for i in range(1, 41)}
    targets = con.execute(f"select target_item_id from '{path}' where part = 'test' "
                          "order by row").fetchall()
    assert [t[0] for t in targets] == [f"i{i}" for i in cache.splits["test"].target]
