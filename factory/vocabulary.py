"""One vocabulary across commands: shared option definitions and the old names kept for a
release (issue 14).

Old names are rewritten to the new ones on the command line before Click parses it, so they
never show in --help and every command accepts exactly one spelling internally; each use
prints one note naming the new spelling.
"""

from __future__ import annotations

import typer

#: `--dataset` on every command (one definition, so every --help says the same).
DatasetOpt = typer.Option(..., "--dataset", help="Dataset name, as `factory datasets` lists "
                          "it (e.g. ml-100k).")

#: command path ("" = every command, "gvm" also covers `gvm compare`) -> {old: new}.
#: Remove an entry one release after its rename.
RENAMED: dict[str, dict[str, str]] = {
    "": {"--max-history": "--history"},
    "gvm": {"--samples": "--answers-per-user"},
    "explain-i2i": {"--samples": "--answers-per-pair"},
    "thinkrec": {"--sample": "--instances"},
    "i2i-eval": {"--max-pairs": "--pairs", "--seed": "--sample-seed"},
    "mine-i2i": {"--seed": "--sample-seed"},
    "export cache": {"--max-len": "--history"},
    "export sft": {"--seed": "--sample-seed"},
    "train": {"--max-len": "--history"},
}


def command_path(args: list[str], groups: set[str]) -> str:
    """`['gvm', 'compare', '--users', '3']` -> 'gvm compare': the leading command words
    (`groups`: the names that take a subcommand)."""
    words: list[str] = []
    for arg in args:
        if arg.startswith("-"):
            break
        words.append(arg)
        if arg not in groups:
            break
    return " ".join(words)


def renames_for(path: str) -> dict[str, str]:
    """The renames that apply to a command: the global ones, then its group's, then its own."""
    found: dict[str, str] = {}
    for prefix, names in sorted(RENAMED.items(), key=lambda kv: len(kv[0])):
        if prefix == "" or path == prefix or path.startswith(prefix + " "):
            found.update(names)
    return found


def rename_old_options(args: list[str], path: str) -> tuple[list[str], list[str]]:
    """The arguments with old option names replaced (`--old V`, `--old=V`), and one note per
    old name used. Stops at `--`: what follows is not ours to rename."""
    names = renames_for(path)
    out: list[str] = []
    used: dict[str, str] = {}
    for k, arg in enumerate(args):
        if arg == "--":
            out += args[k:]
            break
        name, eq, value = arg.partition("=")
        if name in names:
            used[name] = names[name]
            arg = names[name] + eq + value
        out.append(arg)
    notes = [f"note: {old} is now {new} (the old name goes in the next release)"
             for old, new in used.items()]
    return out, notes
