"""Ingest, normalisation and splits on real MovieLens and tiny Amazon/table files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from amazon_fixtures import ITEMS, USERS, write_2014, write_2018

from factory.datasets.amazon import load_amazon
from factory.datasets.ingest import NormaliseOptions, ingest
from factory.datasets.raw import RawDataset
from factory.datasets.table import ColumnMap, load_table
from factory.errors import FactoryError
from factory.warehouse import Warehouse


def test_ml100k_statistics_and_labels(ml100k: Warehouse) -> None:
    with ml100k.read() as con:
        users, items, n = con.execute(
            "select n_users, n_items, n_interactions from datasets where name = 'ml-100k'"
        ).fetchone()
        assert (users, items) == (943, 1349)  # 5-core drops rarely rated movies
        assert n == con.execute("select count(*) from interactions").fetchone()[0]
        # 5-core holds: every user and item has at least 5 interactions
        assert con.execute(
            "select min(c) from (select count(*) c from interactions group by item_id)"
        ).fetchone()[0] >= 5
        wrong = con.execute(
            "select count(*) from interactions where label is distinct from (rating > 3)"
        ).fetchone()[0]
        assert wrong == 0
        title, cats = con.execute(
            "select title, categories from items where item_id = '1'"
        ).fetchone()
        assert title == "Toy Story" and "Animation" in cats


def test_loo_split_is_last_by_time(ml100k: Warehouse) -> None:
    with ml100k.read() as con:
        # positions are a chronological order: time never decreases along a user's sequence
        assert con.execute(
            "select count(*) from (select ts < lag(ts) over (partition by user_id order by"
            " position) as back from interactions) where back"
        ).fetchone()[0] == 0
        rows = con.execute(
            "select user_id, part, position, n from split_interactions"
            " join (select user_id, count(*) n from interactions group by 1) using (user_id)"
            " where split = 'loo' and part <> 'train'"
        ).fetchall()
        by_user: dict[str, dict[str, int]] = {}
        for user, part, pos, n in rows:
            assert pos == (n - 1 if part == "test" else n - 2)
            by_user.setdefault(user, {})[part] = pos
        assert len(by_user) == 943 and all(len(v) == 2 for v in by_user.values())
        # train holds exactly the rest, each interaction in exactly one part
        total, distinct = con.execute(
            "select count(*), count(distinct (user_id, position)) from split_parts"
            " where split = 'loo'"
        ).fetchone()
        assert total == distinct == con.execute("select count(*) from interactions").fetchone()[0]
        late_train = con.execute(
            "select count(*) from split_interactions t join split_interactions h"
            " on t.user_id = h.user_id and t.split = h.split"
            " where t.split = 'loo' and t.part = 'train' and h.part in ('valid', 'test')"
            " and (t.ts, t.position) > (h.ts, h.position)"
        ).fetchone()[0]
        assert late_train == 0


def test_stable_tie_break_follows_source_order(wh: Warehouse) -> None:
    n = 6
    inter = pa.table({
        "user_id": ["u"] * n + ["v"] * n, "item_id": [f"i{k}" for k in range(n)] * 2,
        "ts": [100] * (2 * n), "rating": [5.0] * (2 * n), "ord": list(range(2 * n)),
    })
    items = pa.table({"item_id": [f"i{k}" for k in range(n)], "title": [f"t{k}" for k in range(n)]})
    for col, typ in (("categories", pa.list_(pa.string())), ("brand", pa.string()),
                     ("description", pa.string()), ("price", pa.float64()),
                     ("attrs", pa.string())):
        items = items.append_column(col, pa.nulls(n, typ))
    ingest(wh, "ties", RawDataset("test", inter, items), NormaliseOptions(core=1))
    with wh.read() as con:
        order = [r[0] for r in con.execute(
            "select item_id from interactions where user_id = 'u' order by position").fetchall()]
    assert order == [f"i{k}" for k in range(n)]


@pytest.mark.parametrize("writer", [write_2014, write_2018])
def test_amazon_formats(writer, wh: Warehouse, tmp_path: Path) -> None:
    reviews, meta = writer(tmp_path)
    raw = load_amazon(reviews, meta)
    result = ingest(wh, "sports", raw, NormaliseOptions(core=3))
    assert (result["users"], result["items"], result["interactions"]) == (4, 5, 20)
    with wh.read() as con:
        title, cats, brand, desc, price = con.execute(
            "select title, categories, brand, description, price from items"
            " where item_id = 'B002'"
        ).fetchone()
    assert brand in ("Acme", "Camp Co")
    assert "&amp;" not in title and "&" in title
    assert cats[0] == "Sports & Outdoors" and len(cats) == len(set(cats))
    assert desc and price in (11.5, 21.99)
    assert raw.notes["meta_format"] == writer.__name__[-4:]


def test_amazon_max_len_and_core(wh: Warehouse, tmp_path: Path) -> None:
    reviews, meta = write_2014(tmp_path)
    ingest(wh, "s", load_amazon(reviews, meta), NormaliseOptions(core=1, max_len=3))
    with wh.read() as con:
        assert con.execute("select max(position) from interactions").fetchone()[0] == 2
        # kept are the most recent three of each user
        kept = con.execute(
            "select item_id from interactions where user_id = 'A1' order by position"
        ).fetchall()
    assert [k for (k,) in kept] == ITEMS[-3:]
    with pytest.raises(FactoryError, match="no interactions left"):
        ingest(wh, "s5", load_amazon(reviews, meta), NormaliseOptions(core=10))


def _snapshot(wh: Warehouse) -> tuple:
    with wh.read() as con:
        return con.execute(
            "select (select count(*) from interactions), (select count(*) from items),"
            " (select count(*) from datasets), (select count(*) from split_parts)"
        ).fetchone()


def test_bad_amazon_inputs_leave_warehouse_unchanged(wh: Warehouse, tmp_path: Path) -> None:
    reviews, meta = write_2014(tmp_path)
    ingest(wh, "sports", load_amazon(reviews, meta), NormaliseOptions(core=3))
    before = _snapshot(wh)

    with pytest.raises(FactoryError, match="no such file"):
        load_amazon(tmp_path / "missing.json.gz", meta)

    truncated = tmp_path / "trunc.json.gz"
    truncated.write_bytes(reviews.read_bytes()[:-30])
    with pytest.raises(FactoryError, match="truncated gzip"):
        load_amazon(truncated, meta)

    bad = tmp_path / "bad.json.gz"
    with gzip.open(bad, "wt") as fh:
        fh.write(json.dumps({"reviewerID": "x", "asin": "B001", "unixReviewTime": 1}) + "\n")
        fh.write("{not json at all\n")
    with pytest.raises(FactoryError, match=r"bad\.json\.gz:2: malformed line"):
        load_amazon(bad, meta)

    no_time = tmp_path / "notime.json"
    no_time.write_text(json.dumps({"reviewerID": "x", "asin": "B001"}) + "\n")
    with pytest.raises(FactoryError, match="notime.json:1: review has no unixReviewTime"):
        load_amazon(no_time, meta)

    with pytest.raises(FactoryError, match="already exists; pass --replace"):
        ingest(wh, "sports", load_amazon(reviews, meta), NormaliseOptions(core=3))
    assert _snapshot(wh) == before

    # a failure half-way through a replace rolls everything back
    with pytest.raises(FactoryError):
        ingest(wh, "sports", load_amazon(reviews, meta), NormaliseOptions(core=50), replace=True)
    assert _snapshot(wh) == before


def test_table_ingest_with_mapping(wh: Warehouse, tmp_path: Path) -> None:
    inter = tmp_path / "inter.parquet"
    pq.write_table(pa.table({
        "uid": [u for u in USERS for _ in ITEMS], "iid": [i for _ in USERS for i in ITEMS],
        "when": [1_600_000_000_000 + k * 1000 for k in range(20)], "stars": [4.0] * 20,
    }), inter)
    items = tmp_path / "items.csv"
    items.write_text("iid,name,tags,colour\n" + "".join(
        f"{i},Thing {i},a|b,red\n" for i in ITEMS))
    cols = ColumnMap(user="uid", item="iid", time="when", rating="stars", title="name",
                     categories="tags", time_unit="ms")
    ingest(wh, "mydata", load_table(inter, items, cols), NormaliseOptions(core=2))
    with wh.read() as con:
        title, cats, attrs = con.execute(
            "select title, categories, attrs from items where item_id = 'B003'").fetchone()
        ts = con.execute("select min(ts) from interactions").fetchone()[0]
    assert title == "Thing B003" and cats == ["a", "b"] and json.loads(attrs) == {"colour": "red"}
    assert ts == 1_600_000_000

    with pytest.raises(FactoryError, match="no column 'user' for user.*columns: uid, iid"):
        load_table(inter, items, ColumnMap(user="user", item="iid", time="when"))
    with pytest.raises(FactoryError, match="unknown table format"):
        load_table(_touch(tmp_path / "x.xlsx"), None, cols)


def test_table_ingest_cli_says_labels_are_none_and_records_its_time(tmp_path: Path) -> None:
    """Without --label-threshold the summary says labels are null; the ingest run's times
    span its work (one transaction's current_timestamp made them equal: 0 s in `runs`)."""
    from typer.testing import CliRunner

    from factory.cli import app

    inter = tmp_path / "inter.csv"
    inter.write_text("user_id,item_id,timestamp,rating\n" + "".join(
        f"{u},{i},{1_600_000_000 + k},4\n" for k, (u, i) in
        enumerate((u, i) for u in USERS for i in ITEMS)))
    wh = tmp_path / "factory.duckdb"
    result = CliRunner().invoke(app, ["--warehouse", str(wh), "ingest", "table",
                                      "--interactions", str(inter), "--name", "t", "--core", "2"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "labels" in result.output and "none (no --label-threshold)" in result.output
    with Warehouse(wh).read() as con:
        assert con.execute("select finished_at > started_at from job_runs"
                           " where job = 'ingest'").fetchone() == (True,)


def _touch(p: Path) -> Path:
    p.write_bytes(b"PK")
    return p


def test_newer_schema_is_refused(wh: Warehouse) -> None:
    with wh.write() as con:
        con.execute("insert into schema_migrations (version, name) values (999, 'future')")
    with pytest.raises(FactoryError, match="schema version 999, newer than this factory"), \
            Warehouse(wh.path).write():
        pass


def test_movielens_offline_and_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from factory.datasets.movielens import load_movielens

    empty = tmp_path / "links"
    empty.mkdir()
    monkeypatch.setenv("FACTORY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip sees no index: what being offline looks like
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(FactoryError, match="not cached .* fetching the recbole==1.2.1 wheel"):
        load_movielens("100k")
    with pytest.raises(FactoryError, match="unknown MovieLens variant"):
        load_movielens("20m")
    assert not (tmp_path / "data" / "movielens" / "ml-100k").exists()
