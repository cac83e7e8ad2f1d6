"""One vocabulary across commands (issue 14): old option names rewritten to the new ones,
help that lists commands in workflow order with whole descriptions, a mined template that
keeps its name when mined again."""

from __future__ import annotations

import time

import typer.main
from typer.core import TyperGroup
from typer.testing import CliRunner

from factory.cli import COMMAND_ORDER, app
from factory.runs import finish_run, start_run
from factory.templates import add_discovered, get_template
from factory.vocabulary import RENAMED, command_path, rename_old_options, renames_for
from factory.warehouse import Warehouse

GROUPS = {"gvm", "export", "distill", "ingest", "teacher", "testing"}


def _commands(group: TyperGroup, path: str = "") -> dict[str, object]:
    found: dict[str, object] = {}
    for name, cmd in group.commands.items():
        full = f"{path} {name}".strip()
        found[full] = cmd
        if isinstance(cmd, TyperGroup):
            found.update(_commands(cmd, full))
    return found


def test_old_names_become_new_ones_where_they_apply() -> None:
    args = ["gvm", "compare", "--samples", "2", "--max-history=5", "--", "--samples"]
    out, notes = rename_old_options(args, command_path(args, GROUPS))
    assert out == ["gvm", "compare", "--answers-per-user", "2", "--history=5", "--",
                   "--samples"]
    assert notes == ["note: --samples is now --answers-per-user (the old name goes in the "
                     "next release)",
                     "note: --max-history is now --history (the old name goes in the next "
                     "release)"]
    assert renames_for("explain-i2i")["--samples"] == "--answers-per-pair"
    assert "--max-len" not in renames_for("ingest movielens")     # ingest keeps --max-len
    assert renames_for("export cache")["--max-len"] == "--history"
    assert command_path(["export", "cache", "--x"], GROUPS) == "export cache"
    assert command_path(["thinkrec", "--sample", "3"], GROUPS) == "thinkrec"


def test_every_rename_names_an_option_the_command_has_and_hides_the_old_one() -> None:
    commands = _commands(typer.main.get_command(app))
    for prefix, names in RENAMED.items():
        targets = [c for p, c in commands.items() if not isinstance(c, TyperGroup)
                   and (prefix == "" or p == prefix or p.startswith(prefix + " "))]
        assert targets, prefix
        for old, new in names.items():
            having = [c for c in targets if any(new in p.opts for p in c.params)]
            assert having, f"{prefix}: no command has {new}"
            assert not any(old in p.opts for c in targets for p in c.params), old


def test_the_old_name_still_works_with_a_note(tmp_path) -> None:
    result = CliRunner().invoke(app, ["--warehouse", str(tmp_path / "w.duckdb"), "thinkrec",
                                      "--dataset", "nope", "--sample", "3", "--dry-run"])
    assert "--sample is now --instances" in result.output
    assert "No such option" not in result.output
    assert "unknown dataset 'nope'" in str(result.exception)


def test_help_lists_commands_in_workflow_order_with_whole_descriptions() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "100"})
    listed = [line.split()[0] for line in result.output.split("Commands:")[1].splitlines()
              if line.startswith("  ") and not line.startswith("   ")]
    assert listed == [c for c in COMMAND_ORDER if c in listed] and len(listed) >= 20
    gvm = CliRunner().invoke(app, ["gvm", "--help"], env={"COLUMNS": "100"}).output
    assert "Every named template: App. F manual ones" in gvm


def test_every_dataset_option_says_what_it_takes() -> None:
    for path, cmd in _commands(typer.main.get_command(app)).items():
        for p in cmd.params:
            if "--dataset" in p.opts:
                assert p.help and "factory datasets" in p.help, path


def test_a_template_mined_again_keeps_its_name(tmp_path) -> None:
    """Run A mines X, run B mines Y, run A' (a cached re-run of A) mines X again:
    `discovered` is X under A's name, so distill's chain set does not change."""
    wh = Warehouse(tmp_path / "factory.duckdb")
    with wh.write() as con:
        con.execute("insert into datasets (name, source) values ('toy', 'test')")
    names = []
    for steps in (["Mine", "Recommend"], ["Other", "Recommend"], ["Mine", "Recommend"]):
        time.sleep(0.01)
        with wh.write() as con:
            run = start_run(con, "gvm", "toy", {})
            name = add_discovered(con, run, "toy", steps, "test").name
            con.execute("insert into gvm_patterns (run_id, dataset, method, k, n_paths,"
                        " min_cluster_size, verdict, template) values (?, 'toy', 'kmeans', 2,"
                        " 10, 1, 'ok', ?)", [run, name])
            finish_run(con, run, "succeeded")
        names.append((run, name))
    (a, ta), (b, tb), (a2, ta2) = names
    assert ta == a and tb == b and ta2 == a
    with wh.read() as con:
        assert get_template(con, "discovered", "toy").name == a
        assert con.execute("select count(*) from templates where kind = 'discovered'"
                           ).fetchone() == (2,)

