"""`factory train`: run `train/` on a dataset's exported cache and record it in `train_runs`.

Options this command does not know are `python -m train` options and are passed through,
so the two command lines stay one (`python -m train --help` lists them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import typer

from factory.console import Bars, console, progress, summary
from factory.errors import FactoryError
from factory.vocabulary import DatasetOpt


def resolve_cache(con: duckdb.DuckDBPyConnection, dataset: str, split: str,
                  max_len: int | None, needs: str, sid: bool = False) -> str:
    """The newest exported cache of (dataset, split[, max_len]) that still exists on disk and
    carries what the run needs ("none", "steps" or "chain"; semantic IDs with `sid`)."""
    rows = con.execute(
        "select path, manifest from train_caches where dataset = ? and split = ?"
        " and (? is null or max_len = ?) order by created_at desc",
        [dataset, split, max_len, max_len],
    ).fetchall()
    for path, manifest in rows:
        m = json.loads(manifest)
        if needs != "none" and m.get(needs) is None:
            continue
        if sid and m.get("sid") is None:
            continue
        if (Path(path) / "manifest.json").is_file():
            return path
    what = {"none": "", "steps": " with reasoning steps",
            "chain": " with whole-chain embeddings"}[needs] + (" with semantic IDs" if sid
                                                                else "")
    export = (f"`factory export cache --dataset {dataset} --split {split}"
              + (f" --history {max_len}" if max_len else "") + (" --sids" if sid else ""))
    hint = {"none": f"; run {export}`",
            "steps": f"; run {export} --chains student:latest` (or teacher:<run>)",
            # --ablate single: the whole chain as one vector, which embed-steps only writes
            # on request, and the cache copies
            "chain": f" (--ablate single); run `factory embed-steps --dataset {dataset} "
                     f"--chains <chains> --whole-chain`, then {export} --chains <chains>`"}[needs]
    raise FactoryError(f"no exported cache{what} for dataset {dataset!r}, split {split!r}"
                       + (f", history {max_len}" if max_len else "") + hint)


def train_cmd(
    ctx: typer.Context,
    dataset: str = DatasetOpt,
    split: str = typer.Option("loo", "--split"),
    max_len: int = typer.Option(None, "--history", help="Pick a cache exported with this "
                                "--history [default: the newest]."),
    cache: Path = typer.Option(None, "--cache", help="Use this cache directory instead."),
) -> None:
    """Train SASRec [--fusion scoter] on the dataset's newest exported cache; every other
    option is passed to `python -m train` (see its --help)."""
    from factory.cli import warehouse
    from factory.runs import keep_alive, start_run
    from factory.step_cache import files_dir
    from factory.warehouse import require_split
    from train.config import ArgumentError, parse_args
    from train.data import TrainError
    from train.loop import reasoning_kind, run

    try:
        cfg = parse_args(list(ctx.args), require_cache=False)
    except ArgumentError as exc:
        raise FactoryError(f"training option: {exc}") from None
    wh = warehouse()
    with wh.read() as con:
        require_split(con, dataset, split)
        if cache is not None:
            if not (cache / "manifest.json").is_file():
                raise FactoryError(f"{cache}: not an exported cache (no manifest.json)")
            cfg.cache = str(cache.resolve())
        else:
            cfg.cache = resolve_cache(con, dataset, split, max_len, reasoning_kind(cfg),
                                      sid=cfg.sid)
    with wh.write() as con:
        run_id = start_run(con, "train", dataset, cfg.as_dict())
        cfg.out = cfg.out or str((files_dir(wh.path) / "runs" / run_id).resolve())
        con.execute(
            "insert into train_runs (run_id, dataset, split, cache_path, backbone, fusion,"
            " ablate, params, status, out_dir, protocol)"
            " values (?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)",
            [run_id, dataset, split, cfg.cache, cfg.backbone, cfg.fusion, cfg.ablate,
             json.dumps(cfg.as_dict()), cfg.out, cfg.protocol],
        )
    try:
        # keep_alive: a sign of life while training, for other hosts
        with keep_alive(wh, run_id), progress(transient=True) as bar:
            result = run(cfg, log=lambda msg: console.print(msg, markup=False, highlight=False),
                         progress=batch_progress(bar))
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        _finish(wh, run_id, status, error=str(exc) or type(exc).__name__)
        if isinstance(exc, TrainError):
            raise FactoryError(str(exc)) from None
        raise
    _finish(wh, run_id, "succeeded", result=result)
    rows: dict[str, Any] = {}
    for proto in sorted(result["protocols"], key=lambda p: p != result["protocol"]):
        m = result["protocols"][proto]
        star = ", chose the best epoch" if proto == result["protocol"] else ""
        rows[f"test R@10 / N@10, {proto}{star}"] = (
            f"{m['test']['recall@10']:.4f} / {m['test']['ndcg@10']:.4f}")
        rows[f"valid R@10 / N@10, {proto}"] = (
            f"{m['valid']['recall@10']:.4f} / {m['valid']['ndcg@10']:.4f}")
    rows.update({f"protocol {p}": m["name"] for p, m in result["protocols"].items()})
    summary(f"trained {cfg.backbone}" + (f" + {cfg.fusion}" if cfg.fusion != "none" else "")
            + f" on {dataset}/{split}", {
                **rows,
                "best epoch": f"{result['best_epoch']} of {result['epochs_run']}",
                "seconds/epoch": result["seconds_per_epoch"], "output": result["out"],
                "run": run_id,
            }, f"select * from train_runs where run_id = '{run_id}'")


def batch_progress(bar: Bars) -> Callable[[str, int, int], None]:
    """train.loop's per-batch callback as one bar, reset at each stage (epoch, valid, test)."""
    task = bar.add_task("train", total=None)
    stage_now: list[str | None] = [None]

    def on_batch(stage: str, done: int, total: int) -> None:
        if stage != stage_now[0]:
            stage_now[0] = stage
            bar.reset(task, total=total, description=f"train {stage}")
        bar.update(task, completed=done)
    return on_batch


def _finish(wh: Any, run_id: str, status: str, result: dict[str, Any] | None = None,
            error: str | None = None) -> None:
    from factory.runs import finish_run

    r = result or {}
    by = r.get("protocols", {})

    def js(value: Any) -> str | None:
        return None if value is None else json.dumps(value)

    with wh.write() as con:
        con.execute(
            "update train_runs set status = ?, valid = ?, test = ?, valid_full = ?,"
            " test_full = ?, valid_masked = ?, test_masked = ?, best_epoch = ?,"
            " epochs_run = ?, seconds_per_epoch = ?, error = ?,"
            " finished_at = current_timestamp where run_id = ?",
            [status, js(r.get("valid")), js(r.get("test")),
             js(by.get("full", {}).get("valid")), js(by.get("full", {}).get("test")),
             js(by.get("masked", {}).get("valid")), js(by.get("masked", {}).get("test")),
             r.get("best_epoch"), r.get("epochs_run"), r.get("seconds_per_epoch"), error,
             run_id],
        )
        counts = {k: r[k] for k in ("best_epoch", "epochs_run")} if r else {}
        finish_run(con, run_id, status, counts=counts, error=error)


def register(app: typer.Typer) -> None:
    app.command("train", context_settings={"allow_extra_args": True,
                                           "ignore_unknown_options": True})(train_cmd)
