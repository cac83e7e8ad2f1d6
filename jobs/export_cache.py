"""`factory export cache`: a split as the training cache that `train/` reads."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from factory.console import summary
from factory.vocabulary import DatasetOpt

#: what `--missing` may say about a sequence without a kept chain
MISSING = ("fail", "skip")


def export_cache_cmd(
    dataset: str = DatasetOpt,
    split: str = typer.Option("loo", "--split", help="A leave-one-out split."),
    out: Path = typer.Option(None, "--out", help="Cache directory "
                             "[default: <warehouse>.files/caches/<dataset>-<split>-L<history>]."),
    max_len: int = typer.Option(50, "--history", min=1, help="Most recent items kept per "
                                "history (SCoTER: 20; published ML-1M SASRec: 200)."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite an existing directory."),
    chains: str = typer.Option(None, "--chains", help="teacher:<run> or student:<run> (an id, "
                               "a unique prefix, or latest): add their step embeddings H_i "
                               "(built by `factory embed-steps`)."),
    missing: str = typer.Option("fail", "--missing", help="With --chains, a sequence without "
                                "a kept chain: fail (name what to re-run) or skip (zero H "
                                "rows, has_steps false in {part}.users.parquet, counted in "
                                "the manifest's steps.missing)."),
    step_encoder: str = typer.Option(None, "--step-encoder", help="Encoder id the step "
                                     "embeddings must come from [default: the newest cache]."),
    sids: bool = typer.Option(False, "--sids", help="Add the dataset's latest semantic IDs "
                              "(`factory sids`) as items.parquet's sid column, for "
                              "`python -m train --sid`."),
    sids_run: str = typer.Option(None, "--sids-run", help="Take the SIDs of this sids run "
                                 "(an id, a unique prefix, or latest) instead of the latest "
                                 "(implies --sids)."),
    item_text: bool = typer.Option(False, "--item-text", help="Write item_text.npy: item "
                                   "text embeddings through the shared embedding cache."),
    encoder: str = typer.Option(None, "--encoder", help="Item text encoder: "
                                "sentence-transformers model path or name [default: the "
                                "embedded all-MiniLM-L6-v2]."),
    text_fields: str = typer.Option("title,categories", "--text-fields", help="Item text "
                                    "fields, as `factory sids` (shares its cached vectors)."),
) -> None:
    """Export train/valid/test rows (histories, targets, items) for `python -m train`."""
    from factory.cli import warehouse
    from factory.exports.cache import export_cache
    from factory.runs import finish_run, start_run
    from factory.warehouse import require_split

    if missing not in MISSING:
        from factory.errors import FactoryError

        raise FactoryError(f"--missing {missing!r}: choose {' or '.join(MISSING)}")
    wh = warehouse()
    from factory.step_cache import files_dir

    out = (out or files_dir(wh.path) / "caches" / f"{dataset}-{split}-L{max_len}").resolve()
    fields = [f.strip() for f in text_fields.split(",") if f.strip()]
    params = {"split": split, "out": str(out), "max_len": max_len, "replace": replace,
              "chains": chains, "step_encoder": step_encoder, "sids": sids or bool(sids_run),
              "sids_run": sids_run, "item_text": item_text,
              "encoder": encoder if item_text else None,
              "text_fields": fields if item_text else None}
    steps = None
    if chains:
        from factory.distill import find_step_cache
        from factory.errors import FactoryError
        from factory.step_cache import step_source

        with wh.read() as con:
            require_split(con, dataset, split)
            cache = find_step_cache(con, chains, dataset, step_encoder)
        if cache.manifest["split"] != split:
            raise FactoryError(f"the chains of {chains} follow split "
                               f"{cache.manifest['split']!r}, not {split!r}")
        steps = step_source(cache, missing=missing)
        params.update(step_cache=cache.manifest["cache_id"], chains=cache.manifest["chains"],
                      missing=missing)
    with wh.write() as con:
        require_split(con, dataset, split)
        run_id = start_run(con, "export-cache", dataset, params)
    try:
        manifest = export_cache(wh, dataset, split, out, max_len, steps=steps,
                                replace=replace, sids=sids, sids_run=sids_run,
                                embed_item_text=item_text, text_encoder=encoder,
                                text_fields=fields)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        with wh.write() as con:
            finish_run(con, run_id, status, error=str(exc) or type(exc).__name__)
        raise
    with wh.write() as con:
        con.execute("delete from train_caches where path = ?", [str(out)])
        con.execute(
            "insert into train_caches (path, dataset, split, max_len, n_items, rows, item_text,"
            " steps, manifest, run_id, sid) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [str(out), dataset, split, max_len, manifest["n_items"],
             json.dumps(manifest["rows"]), json.dumps(manifest["item_text"]),
             json.dumps(manifest["steps"]), json.dumps(manifest), run_id,
             json.dumps(manifest["sid"])],
        )
        finish_run(con, run_id, "succeeded", counts=manifest["rows"])
    rows = manifest["rows"]
    summary(f"exported {dataset}/{split} to {out}", {
        "items": manifest["n_items"], "history": max_len,
        "rows": ", ".join(f"{k} {v:,}" for k, v in rows.items()),
        "item text": (f"yes ({manifest['item_text']['encoder']}, "
                      f"{manifest['item_text']['dim']} dims)" if manifest["item_text"]
                      else "no (--item-text)"),
        "semantic IDs": (f"yes (sids run {manifest['sid']['run_id']}, "
                         f"{manifest['sid']['levels']} codes per item)" if manifest["sid"]
                         else "no (--sids)"),
        "reasoning steps": _steps_note(manifest["steps"]),
        "run": run_id,
    }, f"select * from train_caches where dataset = '{dataset}'")


def _steps_note(steps: dict | None) -> str:
    """'yes' or, with --missing skip, how many rows have no chain (zero H, has_steps false)."""
    if not steps:
        return "no (--chains)"
    missing = steps.get("missing")
    if not missing or not any(missing.values()):
        return f"yes ({steps.get('chains')})"
    counts = ", ".join(f"{p} {n:,}" for p, n in missing.items() if n)
    return (f"yes ({steps.get('chains')}); missing: {sum(missing.values()):,} without a chain "
            f"({counts}): zero H rows, has_steps false")


def register(app: typer.Typer) -> None:
    from factory.cli import export_app

    export_app.command("cache")(export_cache_cmd)
