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
                  max_len: int | None, needs: set[str], sid: bool = False) -> str:
    """The newest exported cache of (dataset, split[, max_len]) that still exists on disk and
    carries what the runs need (of "steps" and "chain"; semantic IDs with `sid`)."""
    rows = con.execute(
        "select path, manifest from train_caches where dataset = ? and split = ?"
        " and (? is null or max_len = ?) order by created_at desc",
        [dataset, split, max_len, max_len],
    ).fetchall()
    for path, manifest in rows:
        m = json.loads(manifest)
        if any(m.get(kind) is None for kind in needs):
            continue
        if sid and m.get("sid") is None:
            continue
        if (Path(path) / "manifest.json").is_file():
            return path
    need = "chain" if "chain" in needs else "steps" if "steps" in needs else "none"
    what = {"none": "", "steps": " with reasoning steps",
            "chain": " with whole-chain embeddings"}[need] + (" with semantic IDs" if sid
                                                                else "")
    export = (f"`factory export cache --dataset {dataset} --split {split}"
              + (f" --history {max_len}" if max_len else "") + (" --sids" if sid else ""))
    hint = {"none": f"; run {export}`",
            "steps": f"; run {export} --chains student:latest` (or teacher:<run>)",
            # --ablate single: the whole chain as one vector, which embed-steps only writes
            # on request, and the cache copies
            "chain": f" (--ablate single); run `factory embed-steps --dataset {dataset} "
                     f"--chains <chains> --whole-chain`, then {export} --chains <chains>`"}[need]
    raise FactoryError(f"no exported cache{what} for dataset {dataset!r}, split {split!r}"
                       + (f", history {max_len}" if max_len else "") + hint)


def train_cmd(
    ctx: typer.Context,
    dataset: str = DatasetOpt,
    split: str = typer.Option("loo", "--split"),
    max_len: int = typer.Option(None, "--history", help="Pick a cache exported with this "
                                "--history [default: the newest]."),
    cache: Path = typer.Option(None, "--cache", help="Use this cache directory instead."),
    compare: str = typer.Option(None, "--compare", help="Also train these variants on the "
                                "same cache and print one table: backbones, each optionally "
                                "+scoter (e.g. sasrec,hstu+scoter); every other option is "
                                "shared."),
) -> None:
    """Train a backbone (sasrec, hstu, tiger) [--fusion scoter] on the dataset's newest
    exported cache; every other option is passed to `python -m train` (see its --help)."""
    from factory.cli import warehouse
    from factory.warehouse import require_split
    from train.config import GENERATIVE
    from train.loop import reasoning_kind

    variants = [_config(list(ctx.args))]
    for spec in (compare or "").split(","):
        # the main run (default: sasrec) may be listed too: `--compare sasrec,hstu+scoter`
        if spec.strip() and spec.strip() not in {_name(v) for v in variants}:
            variants.append(_variant(list(ctx.args), spec.strip()))
    wh = warehouse()
    with wh.read() as con:
        require_split(con, dataset, split)
        if cache is not None:
            if not (cache / "manifest.json").is_file():
                raise FactoryError(f"{cache}: not an exported cache (no manifest.json)")
            path = str(cache.resolve())
        else:
            path = resolve_cache(con, dataset, split, max_len,
                                 {reasoning_kind(v) for v in variants} - {"none"},
                                 sid=any(v.sid or v.backbone in GENERATIVE for v in variants))
    out = variants[0].out
    for v in variants:
        v.cache = path
        if out and len(variants) > 1:  # one directory per variant under --out
            v.out = str(Path(out) / _name(v))
        if v.candidates and len(variants) > 1:  # and one candidates file: X.<variant>.parquet
            v.candidates = str(Path(v.candidates).with_suffix(f".{_name(v)}.parquet"))
    done = [_train_one(wh, dataset, split, v) for v in variants]
    if len(done) > 1:
        _compare_table(done, dataset, split)
    failed = [err for _, _, _, err in done if err]
    if failed:
        raise FactoryError(failed[0] if len(done) == 1 else
                           f"{len(failed)} of {len(done)} runs failed (see the table)")


def _config(args: list[str]) -> Any:
    from train.config import ArgumentError, parse_args

    try:
        return parse_args(args, require_cache=False)
    except ArgumentError as exc:
        raise FactoryError(f"training option: {exc}") from None


def _variant(args: list[str], spec: str) -> Any:
    """The run's options with the backbone (and fusion) of `spec` ("hstu", "tiger+scoter")."""
    backbone, _, fusion = spec.partition("+")
    if fusion not in ("", "scoter"):
        raise FactoryError(f"--compare {spec}: a variant is a backbone, optionally +scoter")
    try:
        return _config(args + ["--backbone", backbone, "--fusion", fusion or "none"])
    except FactoryError as exc:
        raise FactoryError(f"--compare {spec}: {exc}") from None


def _name(cfg: Any) -> str:
    return cfg.backbone + ("" if cfg.fusion == "none" else f"+{cfg.fusion}")


def _train_one(wh: Any, dataset: str, split: str, cfg: Any
               ) -> tuple[Any, str, dict[str, Any] | None, str | None]:
    """One recorded run: (cfg, run_id, result, None), or (cfg, run_id, None, error) for a
    run that failed in a way the user can fix (diverged, bad cache)."""
    from factory.runs import keep_alive, start_run
    from factory.step_cache import files_dir
    from train.data import TrainError
    from train.loop import run

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
            result = run(cfg, log=lambda msg: console.print(msg, markup=False, highlight=False,
                                                            soft_wrap=True),
                         progress=batch_progress(bar))
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        error = str(exc) or ("interrupted (Ctrl-C)" if status == "interrupted"
                             else type(exc).__name__)
        _finish(wh, run_id, status, error=error)
        if isinstance(exc, TrainError):
            return cfg, run_id, None, str(exc)
        raise
    _finish(wh, run_id, "succeeded", result=result)
    rows: dict[str, Any] = {}
    for proto in sorted(result["protocols"], key=lambda p: p != result["protocol"]):
        m = result["protocols"][proto]
        star = ", chose the best epoch" if proto == result["protocol"] else ""
        rows[f"test R@10 / N@10, {proto}{star}"] = (
            f"{_f(m['test']['recall@10'])} / {_f(m['test']['ndcg@10'])}")
        rows[f"valid R@10 / N@10, {proto}"] = (
            f"{_f(m['valid']['recall@10'])} / {_f(m['valid']['ndcg@10'])}")
    rows.update({f"protocol {p}": m["name"] for p, m in result["protocols"].items()})
    if "candidates" in result:
        rows["candidates"] = result["candidates"]
    summary(f"trained {_name(cfg)} on {dataset}/{split}", {
        **rows,
        "best epoch": f"{result['best_epoch']} of {result['epochs_run']}",
        "seconds/epoch": result["seconds_per_epoch"], "output": result["out"],
        "run": run_id,
    }, f"select * from train_runs where run_id = '{run_id}'")
    return cfg, run_id, result, None


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _compare_table(done: list[tuple[Any, str, dict[str, Any] | None, str | None]],
                   dataset: str, split: str) -> None:
    """One row per variant: test metrics under the protocol that chose each best epoch,
    and R/N@10 under the other one."""
    from rich import box
    from rich.table import Table

    from train.metrics import PROTOCOL_NAMES, PROTOCOLS

    proto = done[0][0].protocol
    other = next(p for p in PROTOCOLS if p != proto)
    # fits 80 columns: the run ids go to the look: line below
    table = Table(title=f"{dataset}/{split}, test: {PROTOCOL_NAMES[proto]}",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("variant", "R@5", "R@10", "N@5", "N@10", f"R@10\n{other}", f"N@10\n{other}",
                "best\nepoch", "s/\nepoch"):
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    for cfg, _, result, _error in done:
        if result is None:
            table.add_row(_name(cfg), "failed")
            continue
        t, o = result["protocols"][proto]["test"], result["protocols"][other]["test"]
        table.add_row(_name(cfg), _f(t["recall@5"]), _f(t["recall@10"]), _f(t["ndcg@5"]),
                      _f(t["ndcg@10"]), _f(o["recall@10"]), _f(o["ndcg@10"]),
                      f"{result['best_epoch']}/{result['epochs_run']}",
                      f"{result['seconds_per_epoch']:.1f}")
    from factory.cli import stdout_console

    stdout_console().print(table)  # a result, as `factory runs`: 240 wide when piped
    for cfg, _, _, error in done:
        if error:
            console.print(f"  {_name(cfg)} failed: {error}", markup=False, soft_wrap=True)
    ids = ", ".join(f"'{run_id}'" for _, run_id, _, _ in done)
    console.print(f"  look: factory sql \"select backbone, fusion, test->>'ndcg@10' from"
                  f" train_runs where run_id in ({ids})\"", soft_wrap=True)


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
