"""train/: metrics, reader, model, SCoTER fusion and ablations, on tiny synthetic caches."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from train_synthetic import synthetic_cache

from train.config import ArgumentError, Config, parse_args
from train.data import Cache, CacheError, batches, next_item_labels
from train.fusion import ABLATIONS, ScoterFusion
from train.loop import build_model, run
from train.metrics import metrics_from_ranks, target_ranks

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(2)
FAST = {"dim": 32, "batch_size": 64, "threads": 2, "lr": 3e-3}


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    return {
        "oracle": synthetic_cache(root / "oracle", steps="oracle"),
        "cycle": synthetic_cache(root / "cycle", pattern="cycle", sid_levels=2),
        "plain": synthetic_cache(root / "plain"),
    }


def _run(tmp_path: Path, cache: Path, name: str, **kw) -> dict:
    cfg = Config(cache=str(cache), out=str(tmp_path / name), **{**FAST, **kw})
    return run(cfg, log=lambda _msg: None)


# -- metrics -----------------------------------------------------------------------------
def test_metrics_match_hand_computed_ranks() -> None:
    scores = torch.tensor([
        [0.0, 0.9, 0.1, 0.5, 0.3],  # target 3 (0.5): only 0.9 above -> rank 1
        [0.0, 0.2, 0.8, 0.4, 0.6],  # target 1 (0.2): 3 above -> rank 3
        [0.0, 0.7, 0.7, 0.1, 0.2],  # target 2 ties with item 1: pessimistic rank 1
        [0.0, 0.1, 0.2, 0.3, 0.9],  # target 4 is top -> rank 0
    ])
    ranks = target_ranks(scores, torch.tensor([3, 1, 2, 4]))
    assert ranks.tolist() == [1, 3, 1, 0]
    m = metrics_from_ranks(ranks, ks=(1, 2, 4))
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@2"] == pytest.approx(3 / 4)
    assert m["recall@4"] == pytest.approx(1.0)
    assert m["ndcg@1"] == pytest.approx(1 / 4)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3) * 2 + 1) / 4)
    assert m["ndcg@4"] == pytest.approx((2 / math.log2(3) + 1 / math.log2(5) + 1) / 4)


def test_constant_scores_earn_nothing() -> None:
    ranks = target_ranks(torch.zeros(3, 50), torch.tensor([1, 2, 3]))
    assert metrics_from_ranks(ranks)["recall@20"] == 0.0


# -- standing alone ----------------------------------------------------------------------
def test_train_imports_no_duckdb_factory_or_llm_libraries() -> None:
    code = ("import sys, train, train.data, train.model, train.sasrec, train.fusion, train.loop, "
            "train.metrics, train.config, train.__main__; "
            "print(','.join(sorted(m.split('.')[0] for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    loaded = set(out.stdout.strip().split(","))
    forbidden = {"duckdb", "factory", "jobs", "transformers", "sentence_transformers", "openai",
                 "llama_cpp", "vllm", "peft", "typer"}
    assert not loaded & forbidden, loaded & forbidden


# -- reader and leakage ------------------------------------------------------------------
def test_training_labels_are_strictly_after_their_inputs() -> None:
    seq = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    labels = next_item_labels(seq, torch.tensor([8, 6]))
    assert labels.tolist() == [[0, 0, 6, 7, 8], [2, 3, 4, 5, 6]]


def test_model_is_causal_and_rows_are_independent(caches: dict[str, Path]) -> None:
    cache = Cache(caches["oracle"])
    model = build_model(Config(cache="", fusion="scoter", dim=32), cache).eval()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]])
    changed = seq.clone()
    changed[0, 5:] = torch.tensor([20, 21, 22])
    with torch.no_grad():
        a, b = model.backbone(seq), model.backbone(changed)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)  # the past never sees the future
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    split = cache.splits["test"]
    batch = next(batches(split, 16, reasoning="steps"))
    with torch.no_grad():
        together = model.scores(batch.seq, batch.reasoning)
        alone = model.scores(batch.seq[3:4], batch.reasoning[3:4])
    assert torch.allclose(together[3:4], alone, atol=1e-5)  # no batch leak at ranking time


def test_reader_rows_never_contain_their_target(caches: dict[str, Path]) -> None:
    cache = Cache(caches["plain"])
    for split in cache.splits.values():
        seq, target = np.asarray(split.seq), np.asarray(split.target)
        assert not (seq == target[:, None]).any()
    train_rows, valid_rows = cache.splits["train"], cache.splits["valid"]
    # valid history = train history + train target: the valid target is later than all of it
    assert np.array_equal(np.asarray(valid_rows.seq)[:, -1], np.asarray(train_rows.target))


def test_reasoning_rows_follow_their_batch_rows(caches: dict[str, Path]) -> None:
    split = Cache(caches["oracle"]).splits["valid"]
    order = np.array([5, 2, 9, 0])
    perm = np.random.default_rng(0).permutation(len(split))
    batch = next(batches(split, 4, reasoning="steps", order=order, reasoning_rows=perm))
    assert batch.rows.tolist() == [0, 2, 5, 9]
    want = np.asarray(split.steps[perm[[0, 2, 5, 9]]], dtype=np.float32)
    assert np.array_equal(batch.reasoning.numpy(), want)


# -- learning ------------------------------------------------------------------------------
def test_sasrec_overfits_a_deterministic_pattern(caches: dict[str, Path], tmp_path: Path) -> None:
    result = _run(tmp_path, caches["cycle"], "cycle", epochs=8)
    assert result["test"]["ndcg@10"] > 0.9
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < losses[0] / 2
    out = Path(result["out"])
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == result["best_epoch"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_time_budget_stops_and_still_tests_the_best_epoch(caches: dict[str, Path],
                                                          tmp_path: Path) -> None:
    result = _run(tmp_path, caches["plain"], "budget", epochs=50, max_minutes=1e-9)
    assert result["epochs_run"] == 1 and result["best_epoch"] == 1
    assert "valid" in result["history"][0] and result["test"]["ndcg@10"] >= 0


def test_sid_embeddings_are_summed_into_items(caches: dict[str, Path], tmp_path: Path) -> None:
    cache = Cache(caches["cycle"])
    model = build_model(Config(cache="", sid=True, dim=16), cache)
    assert len(model.backbone.items.sid_emb) == 2
    items = torch.tensor([1, 2])
    table = model.backbone.items
    expected = table.item_emb(items) + sum(
        emb(table.sid[items, lvl]) for lvl, emb in enumerate(table.sid_emb))
    assert torch.allclose(model.backbone.items(items), expected)
    assert _run(tmp_path, caches["cycle"], "sid", sid=True, epochs=2)["epochs_run"] == 2
    with pytest.raises(CacheError, match="sid column"):
        build_model(Config(cache="", sid=True), Cache(caches["plain"]))


def test_informative_steps_beat_the_baseline_and_shuffled_steps_do_not(
        caches: dict[str, Path], tmp_path: Path) -> None:
    cache = caches["oracle"]  # histories are random; the last step embeds the target's text
    base = _run(tmp_path, cache, "base", epochs=8)["test"]["ndcg@10"]
    fused = _run(tmp_path, cache, "fused", epochs=8, fusion="scoter")["test"]["ndcg@10"]
    shuffled = _run(tmp_path, cache, "shuffled", epochs=8, fusion="scoter",
                    shuffle_steps=True)["test"]["ndcg@10"]
    assert base < 0.25
    assert fused > base + 0.3  # 8 epochs: about 0.58 against 0.10
    assert shuffled < base + 0.08


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_each_ablation_runs(ablation: str, caches: dict[str, Path], tmp_path: Path) -> None:
    result = _run(tmp_path, caches["oracle"], ablation, epochs=2, fusion="scoter",
                  ablate=[ablation])
    assert set(result["test"]) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 20, 50)}
    assert ("nce" in result["history"][0]) == (ablation != "contrastive")
    fusion = build_model(Config(cache="", fusion="scoter", ablate=[ablation], dim=32),
                         Cache(caches["oracle"])).fusion
    assert isinstance(fusion, ScoterFusion)
    if ablation == "position":
        assert fusion.step_pos is None
    elif ablation in ("mean", "last", "single"):
        assert fusion.step_pos.shape == (1, 32)
    else:
        assert fusion.step_pos.shape == (3, 32)


def test_collapsed_steps_are_the_mean_or_the_last() -> None:
    h = torch.randn(2, 3, 8)
    mean = ScoterFusion(8, 16, 3, heads=2, ablate=frozenset({"mean", "position"}))
    last = ScoterFusion(8, 16, 3, heads=2, ablate=frozenset({"last", "position"}))
    last.adapter.load_state_dict(mean.adapter.state_dict())
    assert torch.allclose(mean.steps(h), mean.adapter(h.mean(1, keepdim=True)))
    assert torch.allclose(last.steps(h), mean.adapter(h[:, -1:]))


# -- command line and errors ---------------------------------------------------------------
def test_argument_errors() -> None:
    with pytest.raises(ArgumentError, match="exclude each other"):
        parse_args(["--cache", "x", "--fusion", "scoter", "--ablate", "mean,last"])
    with pytest.raises(ArgumentError, match="unknown ablation"):
        parse_args(["--cache", "x", "--fusion", "scoter", "--ablate", "steps"])
    with pytest.raises(ArgumentError, match="need --fusion scoter"):
        parse_args(["--cache", "x", "--ablate", "position"])
    with pytest.raises(ArgumentError, match="--epochs must be at least 1"):
        parse_args(["--cache", "x", "--epochs", "0"])
    for threads in ("-1", "0"):         # torch raised on -1; 0 silently meant the default
        with pytest.raises(ArgumentError, match="--threads must be at least 1"):
            parse_args(["--cache", "x", "--threads", threads])
    cfg = parse_args(["--cache", "x", "--fusion", "scoter", "--ablate", "position",
                      "--ablate", "contrastive"])
    assert cfg.ablate == ["contrastive", "position"]


def test_cache_errors(caches: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="no manifest.json"):
        Cache(tmp_path)
    bad = synthetic_cache(tmp_path / "bad")
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(CacheError, match="cache version 99"):
        Cache(bad)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    np.save(bad / "test.target.npy", np.ones(300, dtype=np.int32))
    with pytest.raises(CacheError, match="sha256 differs"):
        Cache(bad)
    Cache(bad, verify=False)  # shapes still check out
    np.save(bad / "test.target.npy", np.ones(299, dtype=np.int32))
    with pytest.raises(CacheError, match=r"shape \(299,\), expected \(300\)"):
        Cache(bad, verify=False)
    with pytest.raises(CacheError, match="needs step embeddings"):
        _run(tmp_path, caches["plain"], "nosteps", fusion="scoter", epochs=1)


def test_python_m_train(caches: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "train", "--cache", str(caches["oracle"]), "--fusion", "scoter",
         "--ablate", "position", "--epochs", "2", "--dim", "16", "--threads", "1",
         "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "recall@10" in done.stdout and "best epoch" in done.stdout
    # progress inside an epoch; not a terminal, so plain lines (one per stage at least)
    assert re.search(r"^epoch 1/2 (\d+)/\1 batches .* in \d+:\d\d$", done.stderr, re.M)
    result = json.loads((out / "metrics.json").read_text())
    assert result["params"]["ablate"] == ["position"] and result["epochs_run"] == 2
    assert (out / "curves.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "train", "--cache", str(tmp_path)],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "no manifest.json" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "train", "--cache", "x", "--fusion", "gnn"],
                           capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    assert len(usage.stderr.strip().splitlines()) == 1        # one line, not the usage block



def test_out_of_range_options_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from train.__main__ import main

    for args, says in ((["--lr", "nan"], "--lr nan: must be a positive number"),
                       (["--lr", "-1"], "--lr -1: must be"),
                       (["--weight-decay", "nan"], "--weight-decay nan: must be"),
                       (["--dropout", "1.5"], "--dropout 1.5: must be in [0, 1)")):
        assert main(["--cache", "x", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], lines


def test_progress_is_reported_per_batch(caches: dict[str, Path], tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    cfg = Config(cache=str(caches["plain"]), out=str(tmp_path / "p"),
                 **{**FAST, "epochs": 2, "batch_size": 50})
    run(cfg, log=lambda _msg: None, progress=lambda *a: calls.append(a))
    cache = Cache(caches["plain"])
    stages = list(dict.fromkeys(stage for stage, _, _ in calls))
    assert stages == ["epoch 1/2", "valid 1", "epoch 2/2", "valid 2", "test"]
    train = [(d, t) for stage, d, t in calls if stage == "epoch 1/2"]
    n = math.ceil(len(cache.splits["train"]) / 50)
    assert train == [(i, n) for i in range(1, n + 1)]


def test_stderr_progress_lines_off_a_terminal() -> None:
    from train.__main__ import StderrProgress

    now = [0.0]
    out = io.StringIO()
    bar = StderrProgress(out, every=10.0, clock=lambda: now[0], tty=False)
    for done in range(1, 31):
        now[0] += 1.0
        bar("epoch 1/5", done, 30)
    assert out.getvalue().splitlines() == [
        "epoch 1/5 11/30 batches 1.0/s ETA 0:19",
        "epoch 1/5 21/30 batches 1.0/s ETA 0:09",
        "epoch 1/5 30/30 batches 1.0/s in 0:29"]


# -- issue 12: divergence, protocols, Table 8 settings ---------------------------------------
def test_a_nan_score_never_ranks_a_target_first() -> None:
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([
        [-inf, 0.1, nan, 0.3, 0.2],  # NaN target: last (rank 3 of 4 items), never first
        [-inf, nan, 0.9, 0.3, 0.2],  # a NaN elsewhere counts against the target
        [-inf, nan, nan, nan, nan],  # all NaN: last
        [-inf, 0.1, inf, 0.3, 0.2],  # +inf target is ahead of every finite score
    ])
    ranks = target_ranks(scores, torch.tensor([2, 2, 1, 2]))
    assert ranks.tolist() == [4, 1, 4, 0]
    m = metrics_from_ranks(torch.tensor([4, 4]), ks=(1, 5))
    assert m["recall@1"] == 0.0 and m["ndcg@1"] == 0.0
    with pytest.raises(ValueError, match="negative"):
        metrics_from_ranks(torch.tensor([-1]))


def test_a_diverged_run_stops_with_one_line_and_writes_nothing(caches: dict[str, Path],
                                                                tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "nan"
    done = subprocess.run(
        [sys.executable, "-m", "train", "--cache", str(caches["plain"]), "--lr", "1e30",
         "--epochs", "2", "--dim", "16", "--threads", "1", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "diverged" in errors[0] and "nan" in errors[0]
    assert "Traceback" not in done.stderr and "recall@10" not in done.stdout
    assert not (out / "metrics.json").exists()


def test_non_finite_scores_stop_the_evaluation(caches: dict[str, Path]) -> None:
    from train.loop import DivergedError, evaluate

    cache = Cache(caches["plain"])
    model = build_model(Config(cache="", dim=16), cache)
    with torch.no_grad():
        model.backbone.items.item_emb.weight[5] = float("nan")
    with pytest.raises(DivergedError, match="non-finite ranking scores"):
        evaluate(model, cache.splits["valid"], Config(cache=""), torch.device("cpu"))


def test_both_protocols_are_reported_and_full_ranking_is_the_default(
        caches: dict[str, Path], tmp_path: Path) -> None:
    assert Config(cache="").protocol == "full"
    assert parse_args(["--cache", "x"]).protocol == "full"
    assert parse_args(["--cache", "x", "--mask-history"]).protocol == "masked"
    result = _run(tmp_path, caches["plain"], "both", epochs=3)
    assert result["protocol"] == "full"
    full, masked = result["protocols"]["full"], result["protocols"]["masked"]
    assert "entire catalog" in full["name"] and "excluded" in masked["name"]
    assert result["test"] == full["test"] and result["valid"] == full["valid"]
    # masking the history can only lift the target: random histories make it differ
    for split in ("valid", "test"):
        assert masked[split]["recall@20"] >= full[split]["recall@20"]
    assert masked["test"]["recall@20"] > full["test"]["recall@20"]
    # early stopping follows the default protocol
    evals = [h for h in result["history"] if "valid" in h]
    best = max(evals, key=lambda h: h["valid_by_protocol"]["full"]["ndcg@10"])
    assert result["best_epoch"] == best["epoch"]
    saved = json.loads((Path(result["out"]) / "metrics.json").read_text())
    assert saved["protocol"] == "full" and set(saved["protocols"]) == {"full", "masked"}
    chosen = _run(tmp_path, caches["plain"], "masked", epochs=1, protocol="masked")
    assert chosen["test"] == chosen["protocols"]["masked"]["test"]


@pytest.mark.parametrize(("dim", "heads", "head_dim", "want"), [
    (50, 4, None, 13),  # SCoTER Table 8: d=50, 4 cross-attention heads
    (128, 6, None, 22),  # SCoTER-T: d_model 128, 6 heads
    (128, 6, 64, 64),  # ... with TIGER's d_kv 64
])
def test_table8_fusion_settings_build_and_train(dim: int, heads: int, head_dim: int | None,
                                                want: int, caches: dict[str, Path],
                                                tmp_path: Path) -> None:
    kw = {"fusion": "scoter", "fusion_heads": heads, "fusion_head_dim": head_dim}
    model = build_model(Config(cache="", dim=dim, **kw), Cache(caches["oracle"]))
    assert model.fusion.head_dim == want
    assert model.fusion.attn.q.weight.shape == (heads * want, dim)
    result = _run(tmp_path, caches["oracle"], f"t8-{dim}-{heads}", epochs=1, dim=dim,
                  **kw)
    assert result["epochs_run"] == 1 and result["params"]["fusion_heads"] == heads


def test_table8_command_line_parses() -> None:
    cfg = parse_args(["--cache", "x", "--lr", "1e-4", "--weight-decay", "5e-5",
                      "--batch-size", "512", "--epochs", "300", "--patience", "20",
                      "--fusion", "scoter", "--fusion-heads", "4", "--dim", "50"])
    assert (cfg.dim, cfg.fusion_heads, cfg.fusion_head_dim) == (50, 4, None)
    with pytest.raises(ArgumentError, match="--heads"):
        parse_args(["--cache", "x", "--dim", "50", "--heads", "4"])


def test_a_sequence_without_steps_is_not_fused(caches: dict[str, Path]) -> None:
    """`export cache --missing skip` marks a sequence without a chain by all-zero steps: it
    keeps its plain state and stays out of InfoNCE instead of being fused with zeros."""
    torch.manual_seed(0)
    model = build_model(Config(cache="", fusion="scoter", dim=32), Cache(caches["oracle"]))
    model.eval()
    seq = torch.tensor([[0, 1, 2, 3], [0, 2, 3, 4], [1, 2, 3, 4]])
    steps = torch.randn(3, 3, model.fusion.adapter[0].in_features)
    steps[1] = 0.0
    plain = model.backbone(seq)[:, -1]
    fused = model.user_vectors(seq, steps)
    assert torch.allclose(fused[1], plain[1])
    assert not torch.allclose(fused[0], plain[0])
    model.train()
    losses = model.losses(seq, next_item_labels(seq, torch.tensor([5, 6, 7])),
                          torch.tensor([5, 6, 7]), steps)
    assert torch.isfinite(losses["loss"]) and "nce" in losses


def test_predict_writes_the_top_k_of_every_row(caches: dict[str, Path], tmp_path: Path) -> None:
    """--predict: one row per cache row and part, K items best first, as the metrics rank
    them (a hit at rank r in the file is a hit at rank r in recall), history left out under
    the masked protocol; `--out X.parquet` names the candidates file."""
    import duckdb

    from train.__main__ import main

    cands = tmp_path / "cands.parquet"
    assert main(["--cache", str(caches["cycle"]), "--epochs", "2", "--dim", "16", "--threads",
                 "2", "--predict", "--top-k", "7", "--out", str(cands)]) == 0
    con = duckdb.connect()
    parts = dict(con.execute(f"select part, count(*) from '{cands}' group by 1").fetchall())
    cache = Cache(caches["cycle"])
    assert parts == {s: len(cache.splits[s]) for s in ("train", "valid", "test")}
    assert con.execute(f"select min(len(item_ids)), max(len(item_ids)), bool_and(len(scores)"
                       f" = len(item_ids)), bool_and(list_sort(scores, 'DESC') = scores)"
                       f" from '{cands}'").fetchone() == (7, 7, True, True)
    from train.loop import runs_root

    metrics = next(m for m in (json.loads(f.read_text()) for f in
                               runs_root(caches["cycle"]).glob("*/metrics.json"))
                   if m.get("candidates") == str(cands))
    hit5 = con.execute(f"select avg((list_position(item_ids[1:5], target_item_id) is not null)"
                       f"::int) from '{cands}' where part = 'test'").fetchone()[0]
    assert hit5 == pytest.approx(metrics["test"]["recall@5"])
    # masked: no candidate is an item of the row's own history
    items = pq.read_table(caches["cycle"] / "items.parquet").to_pydict()
    idx = dict(zip(map(str, items["item_id"]), items["item_idx"], strict=True))
    masked = tmp_path / "masked.parquet"
    assert main(["--cache", str(caches["cycle"]), "--epochs", "1", "--dim", "16", "--threads",
                 "2", "--predict", "--top-k", "5", "--protocol", "masked",
                 "--out", str(masked)]) == 0
    test = [ids for (ids,) in con.execute(f"select item_ids from '{masked}' where part = 'test'"
                                          " order by row").fetchall()]
    for seq, cands_row in zip(np.asarray(cache.splits["test"].seq), test, strict=True):
        assert not {idx[i] for i in cands_row} & set(seq[seq > 0].tolist())


def test_options_that_cannot_hold_together_are_refused() -> None:
    for args, says in (
            (["--out", "x.parquet"], "a .parquet --out names the candidates file"),
            (["--backbone", "tiger", "--predict", "--top-k", "50"],
             "--top-k 50 > --beam 20: tiger's candidates are its beams; pass --beam 50"),
            (["--backbone", "tiger", "--beam", "5"], "--beam 5: at least 10"),
            (["--backbone", "tiger", "--sid"], "tiger always works on semantic IDs"),
            (["--backbone", "tiger", "--loss", "sampled"], "--loss sampled is for the dense")):
        with pytest.raises(ArgumentError, match=re.escape(says)):
            parse_args(["--cache", "c", *args])


def test_more_negatives_than_items_is_one_line(caches: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="--negatives 40: the catalog has 40 items"):
        _run(tmp_path, caches["plain"], "neg", epochs=1, loss="sampled", negatives=40)
    assert not (tmp_path / "neg").exists()      # nothing written for a run that never ran


def test_sigterm_stops_python_m_train_with_one_line(caches: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """A batch scheduler's SIGTERM: exit 143, one line, no metrics or run folder."""
    import signal
    import time

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", "--cache", str(caches["plain"]), "--epochs", "100000",
         "--dim", "8", "--threads", "1", "--out", str(out)], cwd=tmp_path, text=True,
        stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stderr is not None
    for line in proc.stderr:   # wait until it trains
        if line.startswith("epoch 1:"):
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 143
    assert "interrupted (SIGTERM): nothing is reported or written" in rest
    assert "Traceback" not in rest and not out.exists()


# -- speed (issue 18): same results, fewer buffers, threads honoured -----------------------
def _plain_full_softmax(states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
                        ) -> torch.Tensor:
    logits = states @ weight.T
    logits[:, 0] = float("-inf")
    return torch.nn.functional.cross_entropy(logits, labels)


def test_catalog_cross_entropy_equals_autograd_cross_entropy() -> None:
    from train.model import _Workspace, catalog_cross_entropy

    torch.manual_seed(0)
    work = _Workspace()
    for rows in (37, 50, 12):  # the buffer is reused, grown and shrunk
        states = torch.randn(rows, 8, requires_grad=True)
        weight = torch.randn(31, 8, requires_grad=True)
        labels = torch.randint(1, 31, (rows,))
        want = _plain_full_softmax(states, weight, labels)
        g_states, g_weight = torch.autograd.grad(want, (states, weight))
        got = catalog_cross_entropy(states, weight, labels, work)
        h_states, h_weight = torch.autograd.grad(got * 1.0, (states, weight))
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
        assert torch.allclose(h_states, g_states, atol=1e-7)
        assert torch.allclose(h_weight, g_weight, atol=1e-7)
        assert not h_weight[0].any()  # padding is never a class
    assert len(work.free) == 1 and work.free[0].numel() == 50 * 30


def test_fused_loss_trains_as_the_autograd_loss(caches: dict[str, Path]) -> None:
    """A few seeded steps with the in-place full-softmax loss give the losses and weights
    of the plain autograd one (the loss before issue 18), to float rounding."""
    from train.data import Cache
    from train.loop import seed_everything

    cache = Cache(caches["cycle"])
    split = cache.splits["train"]
    runs = {}
    for fused in (False, True):
        seed_everything(0)
        model = build_model(Config(cache=str(caches["cycle"]), **FAST), cache)
        model.fused_ce = fused
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for b in batches(split, 64):
            out = model.losses(b.seq, next_item_labels(b.seq, b.target), b.target)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses.append(float(out["loss"].detach()))
        runs[fused] = (losses, model.state_dict())
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for name, value in runs[False][1].items():
        assert torch.allclose(runs[True][1][name], value, atol=1e-5), name


def test_threads_are_applied_and_recorded(caches: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import train.loop

    seen: list[tuple[int, int]] = []

    def progress(stage: str, done: int, total: int) -> None:
        seen.append((torch.get_num_threads(), torch.get_num_interop_threads()))

    torch.set_num_threads(2)
    try:
        cfg = Config(cache=str(caches["plain"]), out=str(tmp_path / "t1"),
                     **{**FAST, "threads": 1}, epochs=1)
        assert run(cfg, log=lambda _m: None, progress=progress)["params"]["threads"] == 1
        assert seen and all(t == 1 for t, _ in seen)
        # unset: OMP_NUM_THREADS if the user set it, else the usable physical cores
        monkeypatch.setattr(train.loop, "usable_cores", lambda root=None: 1)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        seen.clear()
        cfg = Config(cache=str(caches["plain"]), out=str(tmp_path / "t2"),
                     **{**FAST, "threads": None}, epochs=1)
        assert run(cfg, log=lambda _m: None, progress=progress)["params"]["threads"] == 1
        assert seen and all(t == 1 for t, _ in seen)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert train.loop.set_threads(None) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(2)


def test_usable_cores_counts_physical_cores_under_the_cgroup_quota(tmp_path: Path) -> None:
    import os

    from train.loop import usable_cores

    cpus = sorted(os.sched_getaffinity(0))
    for cpu in cpus:  # every CPU of the affinity mask an SMT sibling of core 0
        topo = tmp_path / f"sys/devices/system/cpu/cpu{cpu}/topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text("0\n")
    assert usable_cores(tmp_path) == 1
    for i, cpu in enumerate(cpus):
        (tmp_path / f"sys/devices/system/cpu/cpu{cpu}/topology/core_id").write_text(f"{i}\n")
    assert usable_cores(tmp_path) == len(cpus)
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/cpu.max").write_text("100000 100000\n")  # --cpus 1
    assert usable_cores(tmp_path) == 1
    (tmp_path / "sys/fs/cgroup/cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == len(cpus)


def test_losses_are_read_once_per_32_batches(caches: dict[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """No device-to-host read by the loop per training step (a CUDA run would wait for each
    step); the epoch's mean losses are still exact. (Adam reads its CPU step counters.)"""
    import train.loop
    from train.data import Cache

    cache = Cache(caches["plain"])
    cfg = Config(cache=str(caches["plain"]), **{**FAST, "batch_size": 4})
    model = build_model(cfg, cache)
    reads: list[str] = []
    for name in ("__float__", "item", "tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **kw):
            if sys._getframe(1).f_code.co_filename == train.loop.__file__:
                reads.append(_name)
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    split = cache.splits["train"]
    n = -(-len(split) // 4)
    assert n > train.loop.LOSS_READ_EVERY
    means = train.loop.train_epoch(model, split, cfg, torch.device("cpu"),
                                   torch.optim.Adam(model.parameters()),
                                   torch.amp.GradScaler("cuda", enabled=False),
                                   np.random.default_rng(0), None)
    assert len(reads) == -(-n // train.loop.LOSS_READ_EVERY)
    assert set(means) == {"rec", "loss"} and math.isfinite(means["loss"])


def test_a_diverged_batch_is_named(caches: dict[str, Path]) -> None:
    import train.loop
    from train.data import Cache

    cache = Cache(caches["plain"])
    cfg = Config(cache=str(caches["plain"]), **{**FAST, "batch_size": 4})
    model = build_model(cfg, cache)
    calls = 0
    losses = model.losses

    def poisoned(*a, **kw):  # batch 5 of the epoch gives a NaN loss
        nonlocal calls
        calls += 1
        out = losses(*a, **kw)
        return {k: v * float("nan") for k, v in out.items()} if calls == 5 else out
    model.losses = poisoned
    with pytest.raises(train.loop.DivergedError, match="epoch 3, batch 5: rec nan"):
        train.loop.train_epoch(model, cache.splits["train"], cfg, torch.device("cpu"),
                               torch.optim.SGD(model.parameters(), lr=0.0),
                               torch.amp.GradScaler("cuda", enabled=False),
                               np.random.default_rng(0), None, epoch=3)


def test_loss_terms_that_only_some_batches_have_are_averaged_over_all(
        caches: dict[str, Path]) -> None:
    """A fused TIGER batch without reasoning has no "nce": the epoch means stay the sums
    over the epoch's batches divided by its number of batches, as before issue 18."""
    import train.loop
    from train.data import Cache

    cache = Cache(caches["plain"])
    cfg = Config(cache=str(caches["plain"]), **{**FAST, "batch_size": 8})
    model = build_model(cfg, cache)
    calls = 0
    losses = model.losses

    def some_nce(*a, **kw):
        nonlocal calls
        calls += 1
        out = losses(*a, **kw)
        return {**out, "nce": torch.tensor(float(calls))} if calls % 2 else out
    model.losses = some_nce
    means = train.loop.train_epoch(model, cache.splits["train"], cfg, torch.device("cpu"),
                                   torch.optim.SGD(model.parameters(), lr=0.0),
                                   torch.amp.GradScaler("cuda", enabled=False),
                                   np.random.default_rng(0), None)
    n = -(-len(cache.splits["train"]) // 8)
    assert calls == n > train.loop.LOSS_READ_EVERY
    assert means["nce"] == pytest.approx(sum(range(1, n + 1, 2)) / n)
