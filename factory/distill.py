"""Structured distillation (SCoTER 3.3.1, Alg. 2 steps 1-2): sequences, prompts, chain rows.

Alg. 2 line 5 asks the teacher for a chain for every *training* pair (S_i, i_{T+1}); line
11 asks the student for every sequence of train, valid and test. Both see the same prompt
(Fig. 11: the template's steps and the history S_i) and never the target. The sequences are
the leave-one-out rows the training cache uses (factory.exports.cache):

    train = (train items except the last -> the last train item)
    valid = (all train items -> the valid item)
    test  = (train + valid items -> the test item)

A chain set is one generation setup (source, model, prompt, template, sampling, dataset,
split, history length). Its id is a hash of that setup, so a resumed run and the shards of
a cluster run write to the same rows, and `teacher:<run>` / `student:<run>` name it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from factory.chains import REJECTED, parse_chain
from factory.errors import FactoryError
from factory.warehouse import require_split

PROMPT = "scoter_distill"
PARTS = ("train", "valid", "test")
#: SCoTER truncates histories to the 20 most recent items (sec. 4.1)
MAX_HISTORY = 20
#: Fig. 11 shows short descriptions; longer ones are cut to this many words
DESC_WORDS = 30
#: how the teacher engine words a chain the parser rejected on every draw
_PARSER_GAVE_UP = "answer rejected by the parser"


@dataclass(frozen=True)
class Seq:
    """One leave-one-out row: the history a chain is written for (its target is not here)."""

    part: str
    user_id: str
    history: tuple[str, ...]  # item ids, oldest first, at most max_history

    @property
    def key(self) -> str:
        return f"{self.part}:{self.user_id}"


def _order(user_id: str) -> str:
    """A stable pseudo-random order, so --limit takes a spread of users, not the lowest ids."""
    return hashlib.sha1(user_id.encode()).hexdigest()


def load_sequences(con: duckdb.DuckDBPyConnection, dataset: str, split: str,
                   parts: Sequence[str], max_history: int = MAX_HISTORY) -> list[Seq]:
    """The split's leave-one-out rows of `parts`, each history cut to its last items."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise FactoryError(f"unknown split part {unknown[0]!r} (choose from train, valid, test)")
    if max_history < 1:
        raise FactoryError("--max-history must be at least 1")
    require_split(con, dataset, split)
    rows = con.execute(
        "select user_id,"
        " coalesce(list(item_id order by position) filter (where part = 'train'), []),"
        " coalesce(list(item_id order by position) filter (where part = 'valid'), []),"
        " coalesce(list(item_id order by position) filter (where part = 'test'), [])"
        " from split_interactions where dataset = ? and split = ? group by user_id",
        [dataset, split]).fetchall()
    out = []
    for user, tr, va, te in rows:
        if ("valid" in parts or "test" in parts) and (len(va) > 1 or len(te) > 1):
            raise FactoryError(
                f"split {split!r} is not leave-one-out: user {user} has {len(va)} validation "
                f"and {len(te)} test items; chains for valid/test need one of each")
        histories = {"train": tr[:-1], "valid": tr if va else [], "test": tr + va if te else []}
        for part in parts:
            if histories[part]:
                out.append(Seq(part, str(user), tuple(histories[part][-max_history:])))
    out.sort(key=lambda s: (PARTS.index(s.part), _order(s.user_id), s.user_id))
    return out


def _sentence(text: str | None, words: int | None = None) -> str | None:
    if not text:
        return None
    parts = " ".join(str(text).split()).split(" ")
    cut = words is not None and len(parts) > words
    text = " ".join(parts[:words] if cut else parts).rstrip(" .")
    return f"{text}..." if cut else text or None


def item_entries(con: duckdb.DuckDBPyConnection, dataset: str, item_ids: Iterable[str]
                 ) -> dict[str, dict[str, str | None]]:
    """Fig. 11's "Item n: title. Desc: description" parts; the description falls back to the
    item's categories (MovieLens: genres) where the source has none."""
    rows = con.execute(
        "select item_id, title, description, categories from items where dataset = ?"
        " and item_id in (select unnest(?::varchar[]))",
        [dataset, sorted(set(item_ids))]).fetchall()
    out = {}
    for item_id, title, description, categories in rows:
        desc = _sentence(description, DESC_WORDS) or _sentence(
            ", ".join(c for c in (categories or []) if c))
        out[str(item_id)] = {"title": _sentence(title) or str(item_id), "desc": desc}
    return out


def prompt_vars(seq: Seq, steps: Sequence[str], items: dict[str, dict[str, str | None]]
                ) -> dict[str, Any]:
    return {"steps": list(steps), "history": [items[i] for i in seq.history]}


def chain_set_id(source: str, setup: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode())
    return f"{source}-{digest.hexdigest()[:12]}"


def chain_parser(steps: Sequence[str]) -> Any:
    """The engine's parser: a kept chain, or ValueError(reason) so the engine draws again."""

    def parse(text: str) -> Any:
        chain = parse_chain(text, steps)
        if not chain.kept:
            raise ValueError(chain.reason)
        return chain

    return parse


def chain_row(outcome: Any, fixed: dict[str, Any]) -> dict[str, Any]:
    """The job columns of one `chains` row (the engine adds the provenance columns)."""
    seq: Seq = outcome.work.data
    row = {**fixed, "part": seq.part, "user_id": seq.user_id, "history": list(seq.history),
           "overall": None, "steps": None, "summary": None}
    if outcome.ok:
        chain = outcome.value
        row.update(verdict="kept", reason=None, overall=chain.overall,
                   steps=list(chain.steps), summary=chain.summary)
    elif outcome.error and outcome.error.startswith(_PARSER_GAVE_UP):
        row.update(verdict=REJECTED, reason=outcome.error.partition("last: ")[2]
                   or outcome.error)
    else:
        row.update(verdict="failed", reason=outcome.error)
    return row


# -- naming chain sets and students ---------------------------------------------------------
@dataclass(frozen=True)
class ChainSet:
    chain_set: str
    source: str
    dataset: str
    split: str
    template: str
    steps: tuple[str, ...]
    spec: str  # as the user wrote it


def _run_row(con: duckdb.DuckDBPyConnection, run_id: str) -> tuple | None:
    return con.execute("select job, status, error, params from job_runs where run_id = ?",
                       [run_id]).fetchone()


def require_succeeded(con: duckdb.DuckDBPyConnection, run_id: str, what: str,
                      jobs: tuple[str, ...]) -> dict[str, Any]:
    """The run's params; a clear error when it is not such a run, or it did not succeed."""
    row = _run_row(con, run_id)
    if row is None:
        raise FactoryError(f"no run {run_id!r} in this warehouse (see: factory sql \"select "
                           f"run_id, job, status from job_runs where job in "
                           f"({', '.join(repr(j) for j in jobs)})\")")
    job, status, error, params = row
    if job not in jobs:
        raise FactoryError(f"run {run_id} is a {job} run, not a {what} run")
    if status != "succeeded":
        detail = f": {error}" if error else ""
        raise FactoryError(f"{what} run {run_id} {status}{detail}; use a run that succeeded")
    return json.loads(params) if isinstance(params, str) else dict(params or {})


def student_record(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any]:
    """The registry row of a successful `distill student` run."""
    require_succeeded(con, run_id, "distill student", ("distill-student",))
    cur = con.execute("select * from student_models where run_id = ?", [run_id])
    row = cur.fetchone()
    if row is None:
        raise FactoryError(f"student run {run_id} has no model in the registry "
                           "(student_models); train it again")
    return dict(zip([d[0] for d in cur.description], row, strict=True))


def resolve_chains(con: duckdb.DuckDBPyConnection, spec: str, dataset: str) -> ChainSet:
    """`teacher:<distill teach run>` or `student:<distill student or generate run>`."""
    source, sep, run_id = spec.partition(":")
    if not sep or source not in ("teacher", "student") or not run_id:
        raise FactoryError(f"--chains {spec!r}: expected teacher:<run-id> or student:<run-id>")
    if source == "teacher":
        params = require_succeeded(con, run_id, "distill teach", ("distill-teach",))
        chain_set = params.get("chain_set")
    else:
        job = (_run_row(con, run_id) or ("",))[0]
        if job == "distill-student":
            student_record(con, run_id)
            found = con.execute(
                "select chain_set from chains where source = 'student' and dataset = ?"
                " and model = (select model_id from student_models where run_id = ?)"
                " group by chain_set order by max(created_at) desc limit 1",
                [dataset, run_id]).fetchone()
            if found is None:
                raise FactoryError(f"student {run_id} has written no chains for {dataset!r}: "
                                   f"run `factory distill generate --dataset {dataset} "
                                   f"--student {run_id}` first")
            chain_set = found[0]
        else:
            params = require_succeeded(con, run_id, "distill generate or student",
                                       ("distill-generate",))
            chain_set = params.get("chain_set")
    row = con.execute(
        "select any_value(dataset), any_value(split), any_value(template),"
        " any_value(template_steps), count(*) filter (where verdict = 'kept')"
        " from chains where chain_set = ?", [chain_set]).fetchone()
    if row is None or row[0] is None:
        raise FactoryError(f"{spec}: no chains stored for it")
    if row[0] != dataset:
        raise FactoryError(f"{spec} holds chains of dataset {row[0]!r}, not {dataset!r}")
    if not row[4]:
        raise FactoryError(f"{spec}: none of its chains was kept (see: factory sql \"select "
                           f"verdict, reason, count(*) from chains where chain_set = "
                           f"'{chain_set}' group by all\")")
    return ChainSet(chain_set, source, row[0], row[1], row[2], tuple(row[3]), spec)
