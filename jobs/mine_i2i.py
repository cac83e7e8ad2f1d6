"""`factory mine-i2i`: I2I pairs from co-occurrence in training sequences (TwiSTAR 4.3, E.1.3).

Reads only the train part of a split, mines with sparse products or set-based SQL
(factory/i2i.py, where the scores are defined), and stores the pairs with their run in one
transaction. A re-run with the same parameters
replaces that earlier run; `i2i_pairs` shows the latest finished run of each dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import typer

from factory.console import console, progress, summary
from factory.errors import FactoryError
from factory.i2i import SCORES, MineParams, load_training, mine
from factory.runs import finish_run, keep_alive, process_alive, start_run
from factory.vocabulary import DatasetOpt
from factory.warehouse import Warehouse, require_split


def run_mine(wh: Warehouse, dataset: str, params: MineParams, *,
             memory_limit: str = "2GB", threads: int | None = None,
             engine: str = "auto") -> dict[str, Any]:
    """Mine, store and publish one run; returns its counts (run_id included).

    The pairs go to a Parquet spool beside the miner's scratch files while mining (memory
    stays bounded whatever top-k keeps), then into the warehouse in one transaction with the
    run's i2i_runs row and its status: a reader sees the whole run or nothing of it."""
    params.check()
    started = time.perf_counter()
    with wh.write() as con:
        require_split(con, dataset, params.split)
        # pairs of runs that never finished (killed jobs) are invisible; drop them now
        con.execute("delete from i2i_pairs_all where dataset = ? and run_id not in"
                    " (select run_id from i2i_runs)", [dataset])
        run_id = start_run(con, "mine-i2i", dataset, params.record())
    counts: dict[str, Any] = {"run_id": run_id}
    try:
        with wh.read() as con:
            train, users, items = load_training(con, dataset, params.split)
        if train.num_rows == 0:
            raise FactoryError(f"split {params.split!r} of {dataset!r} has no training "
                               "interactions")
        sweep_spools()
        with tempfile.TemporaryDirectory(prefix=f"{SPOOL_PREFIX}{os.getpid()}-") as tmp:
            spool = Path(tmp) / "pairs.parquet"
            stats: dict[str, Any] = {}
            with keep_alive(wh, run_id):
                stored = _mine_to(spool, train, users, items, params, stats,
                                  memory_limit=memory_limit, threads=threads, engine=engine)
            counts.update(stats)
            counts["pairs"] = stored
            with wh.write() as con:  # the one write of the results
                if stored:
                    con.execute(
                        "insert into i2i_pairs_all select ?, ?, ?, item_i, item_j, support,"
                        " score, ?, rank from read_parquet(?)",
                        [dataset, run_id, params.split, params.score, str(spool)],
                    )
                counts.update(_publish(con, dataset, run_id, params, stored))
                counts["seconds"] = round(time.perf_counter() - started, 2)
                finish_run(con, run_id, "succeeded", counts)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        with wh.write() as con:
            con.execute("delete from i2i_pairs_all where run_id = ?", [run_id])
            finish_run(con, run_id, status, counts, str(exc).splitlines()[0] if str(exc) else
                       type(exc).__name__)
        raise
    return counts


SPOOL_PREFIX = "factory-i2i-pairs-"


def sweep_spools(directory: Path | None = None) -> list[Path]:
    """Remove the pair spools of mine-i2i processes that are gone (a kill -9 leaves its
    spool in the temporary directory; a run that ends any other way removes its own)."""
    removed = []
    for path in Path(directory or tempfile.gettempdir()).glob(f"{SPOOL_PREFIX}*-*"):
        pid = path.name[len(SPOOL_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or process_alive(int(pid))[0]:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _mine_to(spool: Path, train: pa.Table, users: pa.Table, items: pa.Table,
             params: MineParams, stats: dict[str, Any], **options: Any) -> int:
    """Mine into a Parquet file; returns the number of pairs written."""
    stored = 0
    writer: pq.ParquetWriter | None = None
    with progress() as bar:
        task = bar.add_task("mine-i2i: loading", total=None)

        def on_chunk(done: int, total: int, stage: str) -> None:
            bar.update(task, completed=done, total=total, description=f"mine-i2i: {stage}")

        try:
            for batch, _ in mine(train, users, items, params, on_chunk=on_chunk,
                                 stats=stats, **options):
                if writer is None:
                    writer = pq.ParquetWriter(spool, batch.schema)
                elif batch.schema != writer.schema:
                    batch = pa.Table.from_batches([batch]).cast(writer.schema)
                writer.write(batch)
                stored += batch.num_rows
        except FactoryError:
            bar.live.transient = True       # the error is the one line to read
            raise
        finally:
            if writer is not None:
                writer.close()
    return stored


def _publish(con: duckdb.DuckDBPyConnection, dataset: str, run_id: str,
             params: MineParams, n_pairs: int) -> dict[str, Any]:
    """Make the run visible; drop an earlier run with the same parameters (idempotent)."""
    digest = params.digest()
    replaced = [r for (r,) in con.execute(
        "select run_id from i2i_runs where dataset = ? and params_hash = ?", [dataset, digest]
    ).fetchall()]
    for old in replaced:
        con.execute("delete from i2i_pairs_all where run_id = ?", [old])
        con.execute("delete from i2i_runs where run_id = ?", [old])
    n_sources = con.execute(
        "select count(distinct item_i) from i2i_pairs_all where run_id = ?", [run_id]
    ).fetchone()[0]
    con.execute(
        "insert into i2i_runs (run_id, dataset, split, params, params_hash, n_pairs, n_sources)"
        " values (?, ?, ?, ?, ?, ?, ?)",
        [run_id, dataset, params.split, json.dumps(params.record(), sort_keys=True), digest,
         n_pairs, n_sources],
    )
    return {"replaced_runs": replaced, "sources": n_sources}


def pair_summary(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any]:
    """Pairs, items covered, out-degree distribution and, when SIDs exist, SID agreement."""
    row = con.execute(
        "select count(*), count(distinct item_i),"
        " (select count(*) from (select item_i from i2i_pairs_all where run_id = $r"
        "   union select item_j from i2i_pairs_all where run_id = $r)),"
        " min(support), median(support), max(support)"
        " from i2i_pairs_all where run_id = $r", {"r": run_id},
    ).fetchone()
    deg = con.execute(
        "select min(d), quantile_disc(d, 0.5), quantile_disc(d, 0.9), max(d), avg(d) from"
        " (select count(*) as d from i2i_pairs_all where run_id = ? group by item_i)", [run_id]
    ).fetchone()
    out: dict[str, Any] = {
        "pairs": row[0],
        "source items": row[1],
        "items in any pair": row[2],
        "support min / median / max": f"{row[3]} / {row[4]} / {row[5]}" if row[0] else "-",
        "out-degree min / p50 / p90 / max (mean)":
            f"{deg[0]} / {deg[1]} / {deg[2]} / {deg[3]} ({deg[4]:.2f})" if row[0] else "-",
    }
    from jobs.sids import sid_prefix_agreement

    agree = sid_prefix_agreement(con, run_id)
    if agree:
        out["same first SID code"] = f"{agree[0]:.2%}"
        out["same first two SID codes"] = f"{agree[1]:.2%}"
    return out


def register(app: typer.Typer) -> None:
    @app.command("mine-i2i")
    def mine_i2i_cmd(
        dataset: str = DatasetOpt,
        split: str = typer.Option("loo", "--split", help="Only its train part is read."),
        score: str = typer.Option("penalised", "--score", help=f"One of {', '.join(SCORES)}: "
                                  "penalised = sum of 1/(alpha+|I_u|) (the TwiSTAR code's "
                                  "'swing'); swing = Swing of Wang et al. 2020."),
        window: int = typer.Option(0, "--window", help="0: anywhere in the sequence "
                                   "(TwiSTAR); 1: adjacent items; W: at most W steps apart."),
        directed: bool = typer.Option(True, "--directed/--symmetric",
                                      help="Directed: j after i (TwiSTAR 6.3: \"j is "
                                      "frequently co-purchased after item i\"). Symmetric: "
                                      "both orders (what the public TwiSTAR code mines)."),
        min_count: int = typer.Option(2, "--min-count", help="Minimum co-occurring users."),
        top_k: int = typer.Option(10, "--top-k", help="Best partners kept per source item "
                                  "(0: all). 10 is the factory's choice: the paper gives no "
                                  "number; the public TwiSTAR code keeps 5."),
        alpha: float = typer.Option(1.0, "--alpha", help="Smoothing of penalised and swing."),
        swing_max_users: int = typer.Option(100, "--swing-max-users", help="Swing: users "
                                            "kept per item (bounds its quadratic cost)."),
        seed: int = typer.Option(0, "--sample-seed", help="Swing: seed of the user sample."),
        memory_limit: str = typer.Option("2GB", "--memory-limit", help="DuckDB memory "
                                         "limit for mining; beyond it, work spills to disk."),
        threads: int = typer.Option(None, "--threads", help="DuckDB threads [default: all]."),
    ) -> None:
        """Mine I2I pairs from co-occurrence in training sequences (TwiSTAR 4.3)."""
        from factory.cli import warehouse

        params = MineParams(split=split, window=window, directed=directed,
                            min_count=min_count, top_k=top_k, score=score, alpha=alpha,
                            swing_max_users=swing_max_users, seed=seed)
        wh = warehouse()
        counts = run_mine(wh, dataset, params, memory_limit=memory_limit, threads=threads)
        with wh.read() as con:
            rows = pair_summary(con, counts["run_id"])
        if counts["replaced_runs"]:
            console.print(f"replaced the earlier run with these parameters: "
                          f"{', '.join(counts['replaced_runs'])}")
        rows.update({
            "training users / items": f"{counts['users']:,} / {counts['training_items']:,}",
            "co-occurrences scanned": counts["co_occurrences"],
            "pairs before top-k": counts["pairs_before_top_k"],
            "engine": counts["engine"],
            "seconds": counts["seconds"],
            "run": counts["run_id"],
        })
        summary(f"mined I2I pairs of {dataset} ({split} train part, score {score})", rows,
                f"select * from i2i_pairs where dataset = '{dataset}' order by score desc"
                " limit 10")
