"""`factory export sft`: fine-tuning sets from kept explanations and reasoning traces."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from factory.console import summary
from factory.vocabulary import DatasetOpt


class Kind(str, Enum):
    i2i = "i2i"
    thinkrec = "thinkrec"
    twistar_fast = "twistar-fast"
    twistar_ranker = "twistar-ranker"
    twistar_planner = "twistar-planner"


class Format(str, Enum):
    chat_jsonl = "chat-jsonl"
    parquet = "parquet"


def register(app: typer.Typer) -> None:
    from factory.cli import export_app

    export_app.command("sft")(export_sft_cmd)


def export_sft_cmd(
    dataset: str = DatasetOpt,
    kind: Kind = typer.Option(..., "--kind", help="i2i: TwiSTAR explanations + SID/text "
                              "alignment; thinkrec: reasoning traces + Yes/No examples; "
                              "twistar-fast: TwiSTAR M_fast's SID history -> next item's SID "
                              "(4.2), from the latest `factory sids` run; twistar-ranker: DIN rows "
                              "for M_rank, positive + K1-1 negatives from M_fast's top K2 "
                              "(4.2); twistar-planner: history -> tool-call JSON of the "
                              "planner labels (4.4)."),
    out: Path = typer.Option(None, "--out", help="e.g. sports.jsonl -> sports.train.jsonl, "
                             "sports.valid.jsonl, sports.test.jsonl, sports.manifest.json "
                             "[default: <warehouse>.files/sft/<dataset>-<kind>]."),
    fmt: Format = typer.Option(Format.chat_jsonl, "--format"),
    split: str = typer.Option(None, "--split", help="i2i, twistar-fast: loo; thinkrec: "
                              "thinkrec (ThinkRec 4.1's protocol) where the dataset has one, "
                              "else loo."),
    seed: int = typer.Option(0, "--sample-seed", help="Seed of the holdout, the mix and "
                             "the shuffles."),
    mix: str = typer.Option("alignment:1", "--mix", help="i2i: alignment examples per "
                            "explanation (TwiSTAR E.1.3: 1:1)."),
    holdout: float = typer.Option(0.05, "--holdout", help="i2i: share of pairs held out for "
                                  "valid, and again for test; twistar-planner: share of "
                                  "users held out for valid."),
    share: float = typer.Option(0.2, "--reasoning-share", help="thinkrec: share of reasoning "
                                "examples in train (ThinkRec 4.1: 0.2). Every recommendation "
                                "instance is kept; traces are repeated to reach the share."),
    history: int = typer.Option(None, "--history", min=1, help="thinkrec: history items "
                                "shown [default: 10]; twistar-*: history items before "
                                "each target [default: 20]."),
    exclude_revealed: bool = typer.Option(False, "--exclude-revealed", help="thinkrec: drop "
                                          "traces that needed the label revealed."),
    grouping: str = typer.Option(None, "--grouping", help="thinkrec: one set of files per "
                                 "user group of this `user-groups` run."),
    noun: str = typer.Option(None, "--noun", help="thinkrec: what the prompt calls an item "
                             "[default: movie for MovieLens, else item]."),
    model: str = typer.Option(None, "--model", help="Only rows from this teacher model."),
    k1: int = typer.Option(10, "--k1", min=1, help="twistar-ranker: rows per sequence, the "
                           "positive and K1-1 negatives (4.2)."),
    k2: int = typer.Option(50, "--k2", min=1, help="twistar-ranker: negatives come from "
                           "M_fast's top K2 (4.2)."),
    source: str = typer.Option(None, "--source", help="twistar-ranker: stored candidates "
                               "train or file [default: the newest]."),
) -> None:
    """Write chat-format fine-tuning data (JSONL or Parquet), split into train/valid/test."""
    from factory.cli import warehouse
    from factory.exports.sft import export_sft, parse_mix
    from factory.step_cache import files_dir

    out = out or files_dir(warehouse().path) / "sft" / f"{dataset}-{kind.value}"
    ratio = parse_mix(mix) if kind is Kind.i2i else 0.0
    result = export_sft(warehouse(), dataset, kind.value, out, fmt=fmt.value, split=split,
                        seed=seed, mix=ratio, holdout=holdout, share=share, history=history,
                        exclude_revealed=exclude_revealed, grouping=grouping, noun=noun,
                        model=model, k1=k1, k2=k2, source=source)
    rows = {}
    for key, value in result.counts.items():
        if all(isinstance(v, int) for v in value.values()):
            rows[key] = ", ".join(f"{k} {n:,}" for k, n in sorted(value.items())) or "empty"
        else:
            for part, kinds in value.items():
                rows[f"{key} {part}"] = ", ".join(
                    f"{k} {n:,}" for k, n in sorted(kinds.items())) or "empty"
    rows["split"] = result.notes["split"]
    if result.notes.get("sids_run"):
        rows["SIDs"] = f"sids run {result.notes['sids_run']} " \
            f"({result.notes['sid_levels']} levels), history up to {result.notes['history']}"
    if result.notes.get("traces_not_in_split_train"):
        rows["kept traces left out (not in the split's train part; was it replaced?)"] = \
            result.notes["traces_not_in_split_train"]
    if (result.notes.get("reasoning_passes") or 0) > 1:
        rows["each trace repeated"] = f"up to {result.notes['reasoning_passes']}x to reach " \
            f"the share"
    rows["files"] = ", ".join(str(f) for f in result.files)
    summary(f"exported {kind.value} SFT data of {dataset}", rows,
            "select * from job_runs where job = 'export-sft' order by started_at desc limit 1")
