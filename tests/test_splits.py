"""Split protocols as the papers define them: ThinkRec 4.1's temporal windows (Table 1 counts
on ML-1M), k-core inside the window, held-out periods halved in time order."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from factory.datasets.ingest import NormaliseOptions, ingest
from factory.datasets.movielens import load_movielens
from factory.datasets.raw import INTERACTION_SCHEMA, ITEM_SCHEMA, RawDataset
from factory.errors import FactoryError
from factory.splits import make_preset_split, make_temporal_split, thinkrec_split
from factory.warehouse import Warehouse
from tests.test_cli import assert_one_line_error, factory

#: ThinkRec Table 1, ML1M: #Train, #Valid, #Test
TABLE1_ML1M = {"train": 33_891, "valid": 10_401, "test": 7_331}


@pytest.fixture(scope="module")
def ml1m(tmp_path_factory: pytest.TempPathFactory) -> Warehouse:
    """ML-1M twice: unfiltered (as ThinkRec's code reads it) and with the default 5-core."""
    wh = Warehouse(tmp_path_factory.mktemp("ml1m") / "w.duckdb")
    raw = load_movielens("1m")
    ingest(wh, "ml-1m", raw, NormaliseOptions(core=1, label_threshold=3))
    ingest(wh, "ml-1m-5core", raw, NormaliseOptions(core=5, label_threshold=3))
    return wh


def _sizes(counts: dict) -> dict[str, int]:
    return {p: c["interactions"] for p, c in counts.items()}


def test_thinkrec_ml1m_preset_gives_table1(ml1m: Warehouse) -> None:
    with ml1m.write() as con:
        name, counts = make_preset_split(con, "ml-1m", "thinkrec", replace=True)
        assert name == "thinkrec"
        assert _sizes(counts) == TABLE1_ML1M
        # users per part as in ThinkRec's own processing of the same window
        assert {p: c["users"] for p, c in counts.items()} == {
            "train": 740, "valid": 356, "test": 320}
        # parts follow time: nothing held out precedes anything trained on
        assert con.execute(
            "select max(ts) filter (where part = 'train') < min(ts) filter (where part <> "
            "'train') from split_interactions where dataset = 'ml-1m' and split = 'thinkrec'"
        ).fetchone()[0]
        # the default 5-core ingest loses a few window interactions: within 2% of Table 1
        _, five = make_preset_split(con, "ml-1m-5core", "thinkrec", replace=True)
    for part, paper in TABLE1_ML1M.items():
        assert abs(_sizes(five)[part] - paper) / paper < 0.02


def test_thinkrec_jobs_default_to_the_protocol(ml1m: Warehouse, tmp_path: Path) -> None:
    from factory.exports.sft import export_sft

    with ml1m.write() as con:
        con.execute("delete from split_parts where split = 'thinkrec'")
        con.execute("delete from splits where name = 'thinkrec'")
    # recommendation examples only: one per labelled interaction, a user's first included
    r = export_sft(ml1m, "ml-1m", "thinkrec", tmp_path / "t.jsonl", share=0.0)
    assert r.notes["split"] == "thinkrec"
    assert {p: sum(k.values()) for p, k in r.counts.items()} == TABLE1_ML1M
    with ml1m.read() as con:
        assert thinkrec_split(con, "ml-1m", None) == ("thinkrec", None)
        assert thinkrec_split(con, "ml-1m", "loo") == ("loo", None)


def test_datasets_without_the_protocol(ml100k: Warehouse) -> None:
    with ml100k.write() as con:
        assert thinkrec_split(con, "ml-100k", None) == ("loo", None)
        with pytest.raises(FactoryError, match="no 'thinkrec' protocol is known"):
            make_preset_split(con, "ml-100k", "thinkrec")
    out = factory("split", "--dataset", "ml-100k", "--preset", "thinkrec", wh=ml100k.path)
    assert_one_line_error(out, "thinkrec-ml1m")
    # a named preset applies to any dataset: ML-100K has nothing in ML-1M's window
    out = factory("split", "--dataset", "ml-100k", "--preset", "thinkrec-ml1m", wh=ml100k.path)
    assert_one_line_error(out, "select no interactions")


def _day(d: str) -> int:
    return int(datetime.fromisoformat(d).replace(tzinfo=timezone.utc).timestamp())


def _window_data(wh: Warehouse) -> None:
    """u0 is active before the window (30 rows) but has 2 rows inside it; u1-u3 have 6 rows
    each inside, on items a-f; u4 rates item z only inside, once."""
    rows = [("u0", f"old{k}", _day("2016-03-01") + k) for k in range(30)]
    rows += [("u0", "a", _day("2017-02-01")), ("u0", "b", _day("2017-03-01"))]
    for u in ("u1", "u2", "u3"):
        for k, item in enumerate("abcdef"):
            month = 1 + k * 2                    # Jan, Mar, May, Jul, Sep, Nov
            rows.append((u, item, _day(f"2017-{month:02d}-1{u[1]}")))
    rows.append(("u4", "z", _day("2017-12-20")))
    inter = pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                      "ts": [r[2] for r in rows], "rating": [5.0] * len(rows),
                      "ord": list(range(len(rows)))}, schema=INTERACTION_SCHEMA)
    names = sorted({r[1] for r in rows})
    items = pa.table({"item_id": names, "title": names, "categories": [None] * len(names),
                      "brand": [None] * len(names), "description": [None] * len(names),
                      "price": [None] * len(names), "attrs": [None] * len(names)},
                     schema=ITEM_SCHEMA)
    ingest(wh, "toy", RawDataset(source="table", interactions=inter, items=items),
           NormaliseOptions(core=1))


def test_core_inside_window_and_halves(wh: Warehouse) -> None:
    _window_data(wh)
    with wh.write() as con:
        counts = make_temporal_split(con, "toy", "w", start="2017-01-01",
                                     train_end="2017-08-01", end="2018-01-01", core=3,
                                     heldout="halves")
        users = {u for (u,) in con.execute(
            "select distinct user_id from split_interactions where split = 'w'").fetchall()}
        held = con.execute(
            "select part, min(ts), max(ts) from split_interactions where split = 'w'"
            " and part <> 'train' group by 1 order by 1").fetchall()
        params = con.execute("select params from splits where name = 'w'").fetchone()[0]
    # u0 has 32 interactions but 2 inside the window; u4 and item z 1: filtered inside it
    assert users == {"u1", "u2", "u3"}
    # Jan-Jul train (4 each); Sep and Nov of u1-u3 held out, halved in time order
    assert _sizes(counts) == {"train": 12, "valid": 3, "test": 3}
    (test, t_min, _), (valid, _, v_max) = held
    assert (test, valid) == ("test", "valid") and v_max <= t_min
    assert '"core_rounds": 1' in params or '"core_rounds":1' in params


def test_temporal_split_errors(wh: Warehouse) -> None:
    _window_data(wh)
    with wh.write() as con:
        with pytest.raises(FactoryError, match="increasing"):
            make_temporal_split(con, "toy", "x", start="2017-01-01", train_end="2016-01-01",
                                valid_end="2017-02-01")
        with pytest.raises(FactoryError, match="increasing"):
            make_temporal_split(con, "toy", "x", train_end="2017-01-01",
                                valid_end="2017-02-01", end="2017-01-15")
        with pytest.raises(FactoryError, match="time or halves"):
            make_temporal_split(con, "toy", "x", train_end="2017-01-01", heldout="random")


def test_split_options_that_contradict_are_refused(ml1m: Warehouse) -> None:
    """Each combination used to exit 0 with some of the options silently ignored."""
    wh = ml1m.path
    for args, says in (
            (["--preset", "thinkrec", "--window-months", "5"], "drop --window-months"),
            (["--preset", "thinkrec", "--core", "20"], "drop --core"),
            (["--preset", "thinkrec", "--kind", "loo"], "drop --kind"),
            (["--name", "w", "--window-months", "6", "--train-months", "3",
              "--valid-months", "2", "--end", "2002-01-01"], "either months or dates"),
            (["--name", "l", "--kind", "loo", "--core", "5"], "not for --kind loo"),
            (["--name", "loo", "--window-months", "20", "--train-months", "10",
              "--valid-months", "5", "--replace"], "'loo' is the leave-one-out split"),
            (["--name", "c", "--window-months", "20", "--train-months", "10",
              "--valid-months", "5", "--core", "100000"], "100000-core filter leaves none"),
            (["--name", "h", "--end", "2002-01-01", "--heldout", "halves"],
             "needs --train-end (--heldout halves)"),
            (["--name", "e", "--train-end", "1990-01-01", "--valid-end", "2001-01-01"],
             "nothing to train on")):
        assert_one_line_error(factory("split", "--dataset", "ml-1m", *args, wh=wh), says)
    out = factory("split", "--dataset", "ml-1m", "--preset", "thinkrec", "--replace", wh=wh)
    assert out.returncode == 0 and "cut-offs: train 2001-06-01 to 2002-04-01" in out.stderr
    with ml1m.read() as con:
        assert con.execute("select kind from splits where dataset = 'ml-1m' and name = 'loo'"
                           ).fetchone() == ("loo",)


def test_chains_and_caches_refuse_a_temporal_split_before_paying(ml1m: Warehouse,
                                                                 openai_server) -> None:
    with ml1m.write() as con:
        make_preset_split(con, "ml-1m", "thinkrec", replace=True)
    out = factory("distill", "teach", "--dataset", "ml-1m", "--template", "three-step",
                  "--split", "thinkrec", "--limit", "3", "--teacher-url", openai_server.url,
                  "--teacher-model", "m", wh=ml1m.path)
    assert_one_line_error(out, "is temporal; a chain per sequence (SCoTER 4.1) needs a "
                               "leave-one-out split")
    assert openai_server.records == []
    out = factory("export", "cache", "--dataset", "ml-1m", "--split", "thinkrec", "--out",
                  str(ml1m.path.parent / "c"), wh=ml1m.path)
    assert_one_line_error(out, "a training cache needs a leave-one-out split")
