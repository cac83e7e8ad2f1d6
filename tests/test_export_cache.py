"""`factory export cache` and `factory train` against a real warehouse (ml-100k)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_data import fake_encode, fake_model
from typer.testing import CliRunner

from factory.cli import app
from factory.errors import FactoryError
from factory.exports.cache import StepSource, export_cache
from factory.splits import make_temporal_split
from factory.warehouse import Warehouse
from train.data import Cache

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


def _cli(wh: Warehouse, *args: str):
    return runner.invoke(app, ["--warehouse", str(wh.path), *args])


def _fails(result, match: str) -> None:
    assert isinstance(result.exception, FactoryError), result.output
    assert match in str(result.exception)


def test_export_writes_leave_one_out_rows_without_leakage(ml100k: Warehouse,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "cache"
    result = _cli(ml100k, "export", "cache", "--dataset", "ml-100k", "--max-len", "20",
                  "--out", str(out))
    assert result.exit_code == 0, result.output
    cache = Cache(out)
    assert cache.max_len == 20 and cache.steps_meta is None
    items = pq.read_table(out / "items.parquet").to_pydict()
    idx_of = dict(zip(items["item_id"], items["item_idx"], strict=True))
    with ml100k.read() as con:
        rows = con.execute(
            "select user_id, part, list(item_id order by position) from split_interactions"
            " where dataset = 'ml-100k' and split = 'loo' group by all").fetchall()
        cached = con.execute("select dataset, split, max_len, n_items, run_id"
                             " from train_caches").fetchall()
    assert cached[0][:4] == ("ml-100k", "loo", 20, cache.n_items)
    parts = {(u, p): [idx_of[i] for i in items_] for u, p, items_ in rows}
    users = {part: pq.read_table(out / f"{part}.users.parquet").to_pydict()
             for part in ("train", "valid", "test")}
    for part in ("train", "valid", "test"):
        split = cache.splits[part]
        for row, user in enumerate(users[part]["user_id"]):
            train, valid, test = (parts.get((user, p), []) for p in ("train", "valid", "test"))
            history, target = {
                "train": (train[:-1], train[-1]),
                "valid": (train, valid[0] if valid else None),
                "test": (train + valid, test[0] if test else None),
            }[part]
            seq = [int(i) for i in split.seq[row] if i]
            assert seq == history[-20:]
            assert int(split.target[row]) == target
            assert users[part]["history_len"][row] == len(history)
            # nothing at or after the target is ever in the history
            later = {"train": [train[-1], *valid, *test], "valid": [*valid, *test],
                     "test": test}[part]
            assert not set(seq) & set(later)


def test_export_writes_history_times_aligned_without_the_targets(ml100k: Warehouse,
                                                                 tmp_path: Path) -> None:
    manifest = export_cache(ml100k, "ml-100k", "loo", tmp_path / "cache", 20)
    assert manifest["time"] == {"unit": "s"}
    cache = Cache(tmp_path / "cache")
    users = {p: pq.read_table(tmp_path / "cache" / f"{p}.users.parquet")["user_id"].to_pylist()
             for p in ("train", "valid", "test")}
    with ml100k.read() as con:
        rows = con.execute(
            "select user_id, part, list(ts order by position) from split_interactions"
            " where dataset = 'ml-100k' and split = 'loo' group by all").fetchall()
    ts = {(u, p): t for u, p, t in rows}
    for part in ("train", "valid", "test"):
        split = cache.splits[part]
        assert f"{part}.time.npy" in manifest["files"] and split.time is not None
        assert split.time.dtype == np.int64 and split.time.shape == split.seq.shape
        assert not (np.asarray(split.time)[np.asarray(split.seq) == 0]).any()  # 0 at padding
        for row, user in enumerate(users[part]):
            train, valid = ts[(user, "train")], ts.get((user, "valid"), [])
            history, target_time = {
                "train": (train[:-1], train[-1]),
                "valid": (train, valid[0] if valid else None),
                "test": (train + valid, ts.get((user, "test"), [None])[0]),
            }[part]
            got = [int(t) for t, i in zip(split.time[row], split.seq[row], strict=True) if i]
            assert got == history[-20:]  # one time per history item, in its order
            assert len(got) == int((split.seq[row] > 0).sum())
            assert max(got) <= target_time  # the target's own time is never a history's
    with ml100k.write() as con:
        con.execute("update interactions set ts = null where dataset = 'ml-100k'"
                    " and user_id = (select min(user_id) from interactions)")
    untimed = export_cache(ml100k, "ml-100k", "loo", tmp_path / "untimed", 20)
    assert untimed["time"] is None and not any(".time." in f for f in untimed["files"])
    assert all(s.time is None for s in Cache(tmp_path / "untimed").splits.values())


def test_export_refuses_what_it_cannot_write(ml100k: Warehouse, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    assert _cli(ml100k, "export", "cache", "--dataset", "ml-100k", "--out", str(out)
                ).exit_code == 0
    _fails(_cli(ml100k, "export", "cache", "--dataset", "ml-100k", "--out", str(out)),
           "pass --replace")
    assert _cli(ml100k, "export", "cache", "--dataset", "ml-100k", "--out", str(out),
                "--replace").exit_code == 0
    _fails(_cli(ml100k, "export", "cache", "--dataset", "nope", "--out", str(out)),
           "unknown dataset 'nope'")
    with ml100k.write() as con:
        make_temporal_split(con, "ml-100k", "time", window_months=7, train_months=5,
                            valid_months=1)
    _fails(_cli(ml100k, "export", "cache", "--dataset", "ml-100k", "--split", "time",
                "--out", str(tmp_path / "t")), "leave-one-out split")
    assert not (tmp_path / "t").exists()
    with ml100k.read() as con:
        statuses = con.execute("select status, count(*) from job_runs where job ="
                               " 'export-cache' group by 1 order by 1").fetchall()
    assert statuses == [("failed", 2), ("succeeded", 2)]


def test_step_provider_is_aligned_and_checked(ml100k: Warehouse, tmp_path: Path) -> None:
    asked: list[tuple[str, int]] = []

    def steps(part: str, user_ids: list[str]) -> np.ndarray:
        asked.append((part, len(user_ids)))
        return np.stack([np.full((2, 4), int(u), np.float32) for u in user_ids])

    source = StepSource(meta={"K": 2, "D": 4, "encoder": "test", "template": "t",
                              "chain_source": "test"}, steps=steps)
    manifest = export_cache(ml100k, "ml-100k", "loo", tmp_path / "c", 10, steps=source)
    assert manifest["steps"]["K"] == 2 and manifest["steps"]["dtype"] == "float16"
    cache = Cache(tmp_path / "c")
    users = pq.read_table(tmp_path / "c" / "valid.users.parquet")["user_id"].to_pylist()
    assert cache.splits["valid"].steps[5, 1, 0] == float(users[5])
    assert {p for p, _ in asked} == {"train", "valid", "test"}

    bad = StepSource(meta={"K": 3, "D": 4}, steps=steps)
    with pytest.raises(FactoryError, match="expected"):
        export_cache(ml100k, "ml-100k", "loo", tmp_path / "bad", 10, steps=bad)
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".bad.*"))  # the temporary directory is gone too


def test_factory_train_records_the_run(ml100k: Warehouse, tmp_path: Path) -> None:
    _fails(_cli(ml100k, "train", "--dataset", "ml-100k"), "no exported cache")
    assert _cli(ml100k, "export", "cache", "--dataset", "ml-100k", "--max-len", "10",
                "--out", str(tmp_path / "c")).exit_code == 0
    out = tmp_path / "run"
    result = _cli(ml100k, "train", "--dataset", "ml-100k", "--epochs", "1", "--dim", "16",
                  "--threads", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    # progress inside the epoch: plain lines off a terminal, the bar's label per stage
    assert re.search(r"^train epoch 1/1 (\d+)/\1 [\d.,]+/s in \d+:\d\d$", result.output, re.M)
    with ml100k.read() as con:
        row = con.execute("select status, cache_path, fusion, best_epoch, epochs_run,"
                          " seconds_per_epoch, test->>'ndcg@10', out_dir, params->>'dim'"
                          " from train_runs").fetchone()
        job = con.execute("select status from job_runs where job = 'train'").fetchone()
    assert row[:5] == ("succeeded", str(tmp_path / "c"), "none", 1, 1)
    assert row[5] > 0 and 0 <= float(row[6]) <= 1 and row[7] == str(out) and row[8] == "16"
    assert job == ("succeeded",)
    with ml100k.read() as con:  # both protocols, named; valid/test are the default's
        proto = con.execute("select protocol, test = test_full, test_masked->>'recall@10',"
                            " test_full->>'recall@10', valid_masked is not null"
                            " from train_runs").fetchone()
    assert proto[:2] == ("full", True) and proto[4]
    assert float(proto[2]) >= float(proto[3])
    assert "full, chose the best epoch" in result.output and "masked" in result.output
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 1

    _fails(_cli(ml100k, "train", "--dataset", "ml-100k", "--fusion", "scoter"),
           "no exported cache with reasoning steps")
    _fails(_cli(ml100k, "train", "--dataset", "ml-100k", "--fusion", "scoter", "--ablate",
                "single"), "--ablate single); run `factory embed-steps --dataset ml-100k "
           "--chains <chains> --whole-chain`, then `factory export cache")
    _fails(_cli(ml100k, "train", "--dataset", "ml-100k", "--history", "50"),
           "history 50")
    _fails(_cli(ml100k, "train", "--dataset", "ml-100k", "--lr", "fast"),
           "training option: argument --lr")
    _fails(_cli(ml100k, "train", "--dataset", "ml-100k", "--cache", str(tmp_path)),
           "not an exported cache")


def test_outputs_default_under_the_warehouse_files_with_the_umask_mode(
        ml100k: Warehouse, tmp_path: Path) -> None:
    """export cache and factory train write under <warehouse stem>.files/ (not ./caches,
    ./runs), and the cache directory has the umask's mode, not mkdtemp's 0700."""
    import stat

    from train.loop import runs_root

    umask = os.umask(0o022)
    try:
        assert _cli(ml100k, "export", "cache", "--dataset", "ml-100k", "--history", "10"
                    ).exit_code == 0
    finally:
        os.umask(umask)
    cache = tmp_path / "factory.files" / "caches" / "ml-100k-loo-L10"
    assert (cache / "manifest.json").is_file()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o755
    result = _cli(ml100k, "train", "--dataset", "ml-100k", "--epochs", "1", "--dim", "8",
                  "--threads", "2")
    assert result.exit_code == 0, result.output
    with ml100k.read() as con:
        (out,) = con.execute("select out_dir from train_runs").fetchone()
    assert Path(out).parent == tmp_path / "factory.files" / "runs"
    # python -m train: runs/ beside the cache's caches/ folder, else beside the cache
    assert runs_root(cache) == (tmp_path / "factory.files" / "runs").resolve()
    assert runs_root(tmp_path / "mine") == tmp_path.resolve() / "runs"


def test_factory_train_refuses_a_diverged_run(ml100k: Warehouse, tmp_path: Path) -> None:
    assert _cli(ml100k, "export", "cache", "--dataset", "ml-100k", "--max-len", "10",
                "--out", str(tmp_path / "c")).exit_code == 0
    _fails(_cli(ml100k, "train", "--dataset", "ml-100k", "--epochs", "1", "--dim", "8",
                "--threads", "2", "--lr", "1e30", "--out", str(tmp_path / "run")),
           "training diverged")
    with ml100k.read() as con:
        row = con.execute("select status, test, test_full, test_masked, best_epoch, error"
                          " from train_runs").fetchone()
    assert row[:5] == ("failed", None, None, None, None) and "diverged" in row[5]


def _counting(embed, stats: list):
    def wrapped(self, texts, label="embedding"):
        out = embed(self, texts, label)
        stats.append(self.stats)
        return out
    return wrapped


def test_export_sids_and_item_text_feed_train_sid(ml100k: Warehouse, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from factory.embeddings import Embedder
    from jobs.sids import item_text, run_sids

    stats = []
    monkeypatch.setattr(Embedder, "embed", _counting(Embedder.embed, stats))

    fake_model(monkeypatch)
    _fails(_cli(ml100k, "export", "cache", "--dataset", "ml-100k", "--sids",
                "--out", str(tmp_path / "none")), "has no semantic IDs")
    first = run_sids(ml100k, "ml-100k", levels=2, codebook_size=8, collisions="extra-level")
    latest = run_sids(ml100k, "ml-100k", levels=2, codebook_size=8, seed=1,
                      collisions="extra-level")
    out = tmp_path / "c"
    result = _cli(ml100k, "export", "cache", "--dataset", "ml-100k", "--max-len", "10",
                  "--sids", "--item-text", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert stats[-1].cache_hits == stats[-1].unique and stats[-1].encoded == 0  # sids' texts
    assert "item text: yes" in result.output and "semantic IDs: yes" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sid"]["run_id"] == latest["run_id"]
    assert manifest["item_text"]["text_fields"] == ["title", "categories"]
    cache = Cache(out)
    items = pq.read_table(out / "items.parquet").to_pydict()
    with ml100k.read() as con:
        want = dict(con.execute("select item_id, codes from item_sids_all where run_id = ?",
                                [latest["run_id"]]).fetchall())
        titles = dict(con.execute("select item_id, title from items where dataset ="
                                  " 'ml-100k'").fetchall())
        sid_col = con.execute("select sid->>'run_id' from train_caches").fetchone()[0]
    assert sid_col == latest["run_id"]
    assert items["sid"] == [want[i] for i in items["item_id"]]
    assert cache.sid.shape == (cache.n_items + 1, latest["levels"])
    # the text vectors are the encoder's, through the shared cache (the sids texts: hits)
    with ml100k.read() as con:
        cur = con.execute("select item_id, title, categories from items where item_id = ?",
                          [items["item_id"][0]])
        row = dict(zip([d[0] for d in cur.description], cur.fetchall()[0], strict=True))
    text = item_text(row, ["title", "categories"])
    assert text.startswith(f"title: {titles[row['item_id']]}")
    np.testing.assert_allclose(cache.item_text[1].astype(np.float32), fake_encode([text])[0],
                               atol=1e-3)
    assert not cache.item_text[0].any()
    pinned = _cli(ml100k, "export", "cache", "--dataset", "ml-100k", "--max-len", "10",
                  "--sids-run", first["run_id"], "--out", str(tmp_path / "p"))
    assert pinned.exit_code == 0, pinned.output
    assert json.loads((tmp_path / "p" / "manifest.json").read_text()
                      )["sid"]["run_id"] == first["run_id"]
    _fails(_cli(ml100k, "export", "cache", "--dataset", "ml-100k", "--sids-run", "nope",
                "--out", str(tmp_path / "x")), "no sids run 'nope'")

    done = subprocess.run(
        [sys.executable, "-m", "train", "--cache", str(out), "--sid", "--epochs", "1",
         "--dim", "16", "--threads", "2", "--out", str(tmp_path / "run")],
        cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["params"]["sid"] is True and saved["epochs_run"] == 1


def test_factory_train_compare_trains_each_variant_on_one_cache(ml100k: Warehouse,
                                                                tmp_path: Path) -> None:
    assert _cli(ml100k, "export", "cache", "--dataset", "ml-100k", "--max-len", "10",
                "--out", str(tmp_path / "c")).exit_code == 0
    common = ("train", "--dataset", "ml-100k", "--epochs", "1", "--dim", "16", "--threads", "2")
    _fails(_cli(ml100k, *common, "--compare", "hstu+gnn"), "a backbone, optionally +scoter")
    _fails(_cli(ml100k, *common, "--compare", "hstu+scoter"),
           "no exported cache with reasoning steps")
    _fails(_cli(ml100k, *common, "--compare", "tiger"), "with semantic IDs")
    # the main run listed again is not a second run; each variant its own candidates file
    result = _cli(ml100k, *common, "--backbone", "hstu", "--compare", "hstu,sasrec",
                  "--out", str(tmp_path / "runs"), "--predict", "--top-k", "5")
    assert result.exit_code == 0, result.output
    with ml100k.read() as con:
        runs = con.execute("select backbone, cache_path, status, out_dir, params->>'dim',"
                           " test_full->>'ndcg@10' from train_runs order by started_at"
                           ).fetchall()
    assert [r[:3] for r in runs] == [("hstu", str(tmp_path / "c"), "succeeded"),
                                     ("sasrec", str(tmp_path / "c"), "succeeded")]
    assert [r[3] for r in runs] == [str(tmp_path / "runs" / b) for b in ("hstu", "sasrec")]
    assert {r[4] for r in runs} == {"16"}       # shared options reach every variant
    assert all((tmp_path / "runs" / b / "candidates.parquet").is_file()
               for b in ("hstu", "sasrec"))
    named = _cli(ml100k, *common, "--compare", "sasrec,hstu", "--predict", "--top-k", "5",
                 "--epochs", "1", "--out", str(tmp_path / "cands.parquet"))
    assert named.exit_code == 0, named.output
    assert {f.name for f in tmp_path.glob("cands.*.parquet")} == {
        "cands.sasrec.parquet", "cands.hstu.parquet"}
    # one table: both variants, the protocol named, each run's test NDCG@10 as recorded
    table = result.output[result.output.index("ml-100k/loo, test: full ranking"):]
    for backbone, *_, ndcg in runs:
        row = next(line for line in table.splitlines() if line.strip("│ ").startswith(backbone))
        assert f"{float(ndcg):.4f}" in row


def test_masked_protocol_leaves_out_the_whole_history(ml100k: Warehouse, tmp_path: Path) -> None:
    """A history longer than the window: its older items are in {split}.older.npy, and the
    masked protocol (metrics and --predict) leaves every one of them out, not only the last
    --history items (the reviewer found 791 seen items in masked top-10s before)."""
    from train.config import Config
    from train.loop import run

    assert _cli(ml100k, "export", "cache", "--dataset", "ml-100k", "--max-len", "5",
                "--out", str(tmp_path / "c")).exit_code == 0
    cache = Cache(tmp_path / "c")
    test = cache.splits["test"]
    ptr, older = test.older
    users = pq.read_table(tmp_path / "c" / "test.users.parquet").to_pydict()
    items = pq.read_table(tmp_path / "c" / "items.parquet").to_pydict()
    item_id = dict(zip(items["item_idx"], map(str, items["item_id"]), strict=True))
    with ml100k.read() as con:
        seen = {}
        for u, i in con.execute("select user_id, item_id from split_interactions where"
                                " dataset = 'ml-100k' and split = 'loo' and part <> 'test'"
                                " order by position").fetchall():
            seen.setdefault(str(u), []).append(str(i))
    for r in (0, 1, len(test) - 1):
        window = [item_id[i] for i in np.asarray(test.seq[r]) if i]
        old = [item_id[i] for i in older[ptr[r]:ptr[r + 1]]]
        assert old + window == seen[users["user_id"][r]]
    assert len(older) > 50_000          # most ml-100k histories are longer than 5

    out = tmp_path / "run"
    run(Config(cache=str(tmp_path / "c"), out=str(out), epochs=1, dim=8, threads=2,
               protocol="masked", predict=True, top_k=50), log=lambda _m: None)
    with ml100k.read() as con:
        leaked = con.execute(
            "select count(*) from (select user_id, unnest(item_ids) as item_id from"
            f" '{out / 'candidates.parquet'}' where part = 'test') c join split_interactions s"
            " on s.user_id::varchar = c.user_id and s.item_id::varchar = c.item_id"
            " where s.dataset = 'ml-100k' and s.split = 'loo' and s.part <> 'test'"
        ).fetchone()[0]
    assert leaked == 0
