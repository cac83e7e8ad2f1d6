"""`factory twistar ...` and `factory export rl`: TwiSTAR's second stage as data (4.2-4.4,
App. B, E.1.3-E.1.4). The logic is in factory/twistar/stage2.py and factory/exports/twistar.py.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import typer

from factory.console import summary
from factory.errors import FactoryError
from factory.vocabulary import DatasetOpt

twistar_app = typer.Typer(help="TwiSTAR's second stage: M_fast candidates, hard samples, "
                          "planner pseudo-labels (export them with `export sft`/`export rl`).",
                          no_args_is_help=True)

SourceOpt = typer.Option(None, "--source", help="Which stored candidates: train (from a "
                         "train run) or file [default: the newest imported].")


class RLKind(str, Enum):
    twistar_slow = "twistar-slow"


class RLFormat(str, Enum):
    parquet = "parquet"
    jsonl = "jsonl"


def register(app: typer.Typer) -> None:
    from factory.cli import export_app

    app.add_typer(twistar_app, name="twistar")
    export_app.command("rl")(export_rl_cmd)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _run(wh: Any, job: str, dataset: str, params: dict[str, Any], body: Any) -> Any:
    """`body(con, run_id)` in one write transaction, recorded as a job run: on any error the
    transaction rolls back (nothing stored) and the run is marked failed."""
    from factory.runs import finish_run, start_run
    from factory.warehouse import require_dataset

    with wh.write() as con:
        require_dataset(con, dataset)
        run_id = start_run(con, job, dataset, params)
    try:
        with wh.write() as con:
            result = body(con, run_id)
            finish_run(con, run_id, "succeeded", result)
    except BaseException as exc:
        with wh.write() as con:
            finish_run(con, run_id, "interrupted" if isinstance(exc, KeyboardInterrupt)
                       else "failed", error=str(exc) or type(exc).__name__)
        raise
    return result, run_id


@twistar_app.command("candidates")
def candidates_cmd(
    dataset: str = DatasetOpt,
    from_train: str = typer.Option(None, "--from-train", help="A `factory train --predict` "
                                   "run (id, prefix or latest); its model trained on the "
                                   "train part."),
    from_file: Path = typer.Option(None, "--from-file", help="Your own M_fast output: Parquet "
                                   "with part, user_id, target_item_id, item_ids (best "
                                   "first)[, scores], one row per (part, user)."),
    trained_on: str = typer.Option(None, "--trained-on", help="--from-file: the parts its "
                                   "model trained on, train or none (planner labels are "
                                   "refused on a part the model saw, 4.4)."),
    split: str = typer.Option(None, "--split", help="--from-file: the split its rows follow "
                              "[default: loo]."),
    model: str = typer.Option(None, "--model", help="--from-file: the model's name, stored."),
    k: int = typer.Option(None, "--k", min=1, help="Every list must have exactly K items "
                          "[default: the train run's --top-k, else the longest list]."),
) -> None:
    """Store M_fast's top-K per sequence (4.2) from a train run or a file, replacing the
    dataset's earlier candidates of the same kind in one transaction."""
    from factory.cli import warehouse
    from factory.twistar.stage2 import import_candidates, resolve_train_candidates
    from factory.warehouse import require_split

    if (from_train is None) == (from_file is None):
        raise FactoryError("give one of --from-train RUN or --from-file F.parquet")
    wh = warehouse()
    if from_train is not None:
        if trained_on or split or model:
            raise FactoryError("--trained-on, --split and --model are for --from-file: a "
                               "train run records its own (train part, its split, backbone)")
        with wh.read() as con:
            src = resolve_train_candidates(con, dataset, from_train)
        kind = "train"
        k = k or src["k"]
    else:
        if not from_file.is_file():
            raise FactoryError(f"--from-file {from_file}: no such file")
        if trained_on is None:
            raise FactoryError("--from-file needs --trained-on train|none: which parts of the "
                               "split its model trained on (the planner's leakage rule, 4.4)")
        src = {"source": str(from_file.resolve()), "path": from_file, "split": split or "loo",
               "model": model, "trained_on": trained_on}
        kind = "file"
    with wh.read() as con:
        require_split(con, dataset, src["split"])
    params = {"source_kind": kind, "source": src["source"], "split": src["split"],
              "model": src["model"], "trained_on": src["trained_on"], "k": k}

    def body(con: Any, run_id: str) -> dict[str, Any]:
        return import_candidates(con, dataset, source_kind=kind, source=src["source"],
                                 path=Path(src["path"]), split=src["split"],
                                 model=src["model"], trained_on=src["trained_on"], k=k,
                                 run_id=run_id)

    result, run_id = _run(wh, "twistar-candidates", dataset, params, body)
    rows: dict[str, Any] = {"source": f"{kind} {src['source']}",
                            "model": f"{src['model'] or '-'}, trained on "
                                     f"{src['trained_on']}",
                            "split": src["split"], "K": result["k"]}
    for part, r in result["recall"].items():
        of = result["sequences"].get(part, r["rows"])
        rows[part] = (f"{r['rows']:,}" + (f" of {of:,}" if r["rows"] < of else "")
                      + f" sequences, Recall@10 {_pct(r['recall@10'])}, "
                      f"Recall@50 {_pct(r['recall@50'])}")
    for part, of in sorted(result["sequences"].items()):
        rows.setdefault(part, f"0 of {of:,} sequences (none in the candidates)")
    hard, labels = (result["dropped"][t] for t in ("twistar_hard_samples",
                                                    "twistar_planner_labels"))
    if hard or labels:
        rows["replaced"] = (f"{hard:,} hard samples and {labels:,} planner labels made from the "
                            "earlier candidates were dropped with them: run `factory twistar "
                            "hard-samples` and `planner-labels` again")
    rows["run"] = run_id
    summary(f"stored TwiSTAR candidates of {dataset}", rows,
            f"select part, count(*), avg(coalesce(hit_rank <= 10, false)::int)"
            f" from twistar_candidates where dataset = '{dataset}' and source_kind = '{kind}'"
            " group by 1")


@twistar_app.command("hard-samples")
def hard_samples_cmd(
    dataset: str = DatasetOpt,
    k2: int = typer.Option(50, "--k2", min=1, help="Hard: the target is not in M_fast's top "
                           "K2 (E.1.3: 50)."),
    source: str = SourceOpt,
    history: int = typer.Option(20, "--history", min=1, help="6.4 report: distinct "
                                "second-level categories among the last N history items."),
) -> None:
    """Store the sequences whose target M_fast misses in its top K2 (4.3, E.1.3), and report
    6.4's easy/hard split by second-level categories."""
    from factory.cli import warehouse
    from factory.twistar.stage2 import candidate_source, easy_hard_report, store_hard_samples

    wh = warehouse()

    def body(con: Any, run_id: str) -> dict[str, Any]:
        src = candidate_source(con, dataset, source)
        counts = store_hard_samples(con, dataset, src, k2, run_id)
        return {"source": src["source_kind"], "counts": counts,
                "categories": easy_hard_report(con, dataset, src, k2, history)}

    result, run_id = _run(wh, "twistar-hard-samples", dataset,
                          {"k2": k2, "source": source, "history": history}, body)
    rows: dict[str, Any] = {"candidates": result["source"]}
    for part, c in result["counts"].items():
        rows[f"{part} hard"] = f"{c['hard']:,} of {c['sequences']:,} ({_pct(c['share'])})"
    cats = result["categories"]
    if cats is None:
        rows["easy/hard by category (6.4)"] = "the items have no categories"
    else:
        rows["second level"] = cats["second_level"]
        for part in ("train", "valid", "test"):
            for cls in ("easy", "middle", "hard"):
                c = cats.get(part, {}).get(cls)
                if c:
                    rows[f"{part} {cls} (6.4)"] = (
                        f"{c['sequences']:,} ({_pct(c['share'])}), R@10 "
                        f"{_pct(c['recall@10'])}, missed @{k2} {_pct(c['hard_sample_share'])}")
    rows["run"] = run_id
    summary(f"hard samples of {dataset} (target not in the top {k2})", rows,
            f"select part, count(*) from twistar_hard_samples where dataset = '{dataset}'"
            " group by 1")


@twistar_app.command("planner-labels")
def planner_labels_cmd(
    dataset: str = DatasetOpt,
    k1: int = typer.Option(10, "--k1", min=1, help="Path 1: the target in the top K1."),
    k2: int = typer.Option(50, "--k2", min=1, help="Path 2: in the top K2; else Path 3."),
    flip: float = typer.Option(0.2, "--flip", help="Share of Path-1 rows relabelled as Path "
                               "2 or 3 (App. B: 20%)."),
    seed: int = typer.Option(0, "--seed", "--sample-seed", help="Seed of the flips."),
    parts: str = typer.Option(None, "--parts", help="Comma-separated parts to label "
                              "[default: valid for train-run candidates; train,valid for "
                              "--trained-on none]; never a part the model trained on."),
    source: str = SourceOpt,
) -> None:
    """Planner pseudo-labels (4.4, App. B): Path 1/2/3 by the target's rank in M_fast's
    list, a seeded share of Path 1 flipped, each label the tool-call JSON."""
    from factory.cli import warehouse
    from factory.twistar.stage2 import candidate_source, label_parts, store_planner_labels

    wh = warehouse()
    asked = [p.strip() for p in parts.split(",") if p.strip()] if parts else None

    def body(con: Any, run_id: str) -> dict[str, Any]:
        src = candidate_source(con, dataset, source)
        chosen = label_parts(src["trained_on"], asked)
        counts = store_planner_labels(con, dataset, src, k1=k1, k2=k2, flip=flip, seed=seed,
                                      parts=chosen, run_id=run_id)
        if not counts:
            raise FactoryError(f"no candidates of part(s) {', '.join(chosen)} in "
                               f"{src['source_kind']} {src['source']}")
        return {"source": src["source_kind"], "trained_on": src["trained_on"],
                "parts": chosen, "counts": counts}

    result, run_id = _run(wh, "twistar-planner-labels", dataset,
                          {"k1": k1, "k2": k2, "flip": flip, "seed": seed, "parts": asked,
                           "source": source}, body)
    rows: dict[str, Any] = {"candidates": f"{result['source']} (model trained on "
                                          f"{result['trained_on']})"}
    for part, c in result["counts"].items():
        n = c["rows"]
        paths = ", ".join(f"{p}: {c['path'].get(p, 0) / n:.3f}" for p in (1, 2, 3))
        orig = c["original"].get(1, 0)
        rows[f"{part} ({n:,})"] = f"paths {paths}; flipped {c['flipped']:,} of {orig:,} " \
            "Path-1"
    rows["run"] = run_id
    summary(f"planner labels of {dataset}", rows,
            f"select part, path, count(*) from twistar_planner_labels where dataset ="
            f" '{dataset}' group by all order by all")


def export_rl_cmd(
    dataset: str = DatasetOpt,
    kind: RLKind = typer.Option(..., "--kind", help="twistar-slow: M_slow's GRPO prompts, "
                                "one per hard sample, with reference_sid (4.3, E.1.3)."),
    out: Path = typer.Option(None, "--out", help="e.g. slow.parquet -> slow.train.parquet, "
                             "slow.valid.parquet, slow.test.parquet, slow.manifest.json "
                             "[default: <warehouse>.files/rl/<dataset>-<kind>]."),
    fmt: RLFormat = typer.Option(RLFormat.parquet, "--format"),
    history: int = typer.Option(20, "--history", min=1, help="History items in a prompt."),
    seed: int = typer.Option(0, "--sample-seed", help="Seed of the row order."),
    noun: str = typer.Option(None, "--noun", help="What the prompt calls an item."),
) -> None:
    """Write a reinforcement-learning prompt set (TRL GRPOTrainer: `prompt` in chat format
    plus the reward functions' columns), split into train/valid/test."""
    from factory.cli import warehouse
    from factory.exports.twistar import export_rl
    from factory.step_cache import files_dir

    wh = warehouse()
    out = out or files_dir(wh.path) / "rl" / f"{dataset}-{kind.value}"
    files, counts, notes = export_rl(wh, dataset, kind.value, out, fmt=fmt.value,
                                     history=history, seed=seed, noun=noun)
    rows: dict[str, Any] = {part: n for part, n in counts.items()}
    rows["hard samples"] = f"target not in the top {notes['k2']} of " \
        f"{notes['candidates']['source_kind']} candidates"
    rows["SIDs"] = f"sids run {notes['sids_run']} ({notes['sid_levels']} levels)"
    rows["files"] = ", ".join(str(f) for f in files)
    summary(f"exported {kind.value} RL prompts of {dataset}", rows,
            "select * from job_runs where job = 'export-rl' order by started_at desc limit 1")
