"""Reasoning templates by name (SCoTER sec. 3.1, App. F): the steps a teacher follows.

    with wh.read() as con:
        t = get_template(con, "discovered", dataset="sports")
    t.steps  # ["Purchase pattern recognition", ..., "Item Recommendation"]

Manual (App. F two/three/five-step) and the paper's own mined patterns ship with the schema;
`factory gvm` adds one `discovered` template per successful run that mines new steps (a run
that mines the same steps again reuses the first run's). The name 'discovered' means the
dataset's most recently mined one of a run that succeeded, so later jobs follow the latest
mining by default and can pin a run by giving its name.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from factory.errors import FactoryError

DISCOVERED = "discovered"


@dataclass(frozen=True)
class Template:
    name: str
    kind: str  # manual | paper | discovered
    steps: tuple[str, ...]
    description: str | None
    source: str
    dataset: str | None = None
    run_id: str | None = None

    @property
    def path(self) -> str:
        """The template as it goes inside <cot_path>."""
        return " -> ".join(self.steps)


_COLUMNS = "name, kind, steps, description, source, dataset, run_id"
#: not a template of a run that is still running, died or failed after storing it: that is
#: no one's latest mining (a template without a job_runs row counts)
_USABLE = ("not exists (select 1 from job_runs j where j.run_id = t.run_id"
           " and j.status <> 'succeeded')")


def _template(row: tuple) -> Template:
    name, kind, steps, description, source, dataset, run_id = row
    return Template(name, kind, tuple(steps), description, source, dataset, run_id)


def get_template(con: duckdb.DuckDBPyConnection, name: str,
                 dataset: str | None = None) -> Template:
    """The template called `name`; 'discovered' is `dataset`'s latest mined template."""
    if name == DISCOVERED:
        if dataset is None:
            raise FactoryError("template 'discovered' needs a dataset")
        # a template mined again by a later run (the same steps) counts as of that run
        row = con.execute(
            f"select {_COLUMNS} from templates t where kind = 'discovered' and dataset = ?"
            f" and {_USABLE}"
            " order by greatest(created_at, coalesce((select max(j.started_at)"
            "  from gvm_patterns p join job_runs j using (run_id)"
            "  where p.template = t.name and j.status = 'succeeded'), created_at)) desc,"
            " name desc limit 1", [dataset]).fetchone()
        if row is None:
            raise FactoryError(f"no discovered template for dataset {dataset!r}: run "
                               f"`factory gvm --dataset {dataset}` first")
        return _template(row)
    row = con.execute(f"select {_COLUMNS} from templates where name = ?", [name]).fetchone()
    if row is None and dataset is not None and con.execute(
            "select 1 from templates where kind = 'discovered' and (starts_with(name, ?)"
            " or starts_with(name, 'gvm-' || ?)) limit 1", [name, name]).fetchone():
        from factory.runs import resolve_run  # a short gvm run id, as everywhere

        run_id = resolve_run(con, "gvm", dataset, name, option="--template",
                             within="select run_id from templates where kind = 'discovered'")
        row = con.execute(f"select {_COLUMNS} from templates where name = ?",
                          [run_id]).fetchone()
    if row is None:
        known = ", ".join(n for (n,) in con.execute(
            "select name from templates where kind <> 'discovered' order by name").fetchall())
        raise FactoryError(f"unknown template {name!r} (known: {known}, discovered, "
                           "or a gvm run id)")
    return _template(row)


def list_templates(con: duckdb.DuckDBPyConnection) -> list[Template]:
    """Every stored template, built-in ones first."""
    rows = con.execute(
        f"select {_COLUMNS} from templates order by kind = 'discovered', created_at, name"
    ).fetchall()
    return [_template(r) for r in rows]


def add_discovered(con: duckdb.DuckDBPyConnection, run_id: str, dataset: str,
                   steps: list[str], description: str) -> Template:
    """Store a mined template; its name is the run that first mined it. A run that mines
    the same steps on the same dataset (a re-run from the cache) reuses that template, so
    chain sets that follow `discovered` keep their name."""
    same = con.execute(f"select name from templates t where kind = 'discovered' and dataset = ?"
                       f" and steps = ?::varchar[] and {_USABLE} order by created_at limit 1",
                       [dataset, steps]).fetchone()
    if same is not None:
        return get_template(con, same[0])
    con.execute(
        "insert into templates (name, kind, dataset, steps, description, source, run_id)"
        " values (?, 'discovered', ?, ?, ?, ?, ?)",
        [run_id, dataset, steps, description, f"factory gvm run {run_id}", run_id])
    return get_template(con, run_id)
