"""Structured distillation (SCoTER 3.3.1, Alg. 2 steps 1-2): sequences, prompts, chain rows.

Alg. 2 line 5 asks the teacher for a chain for every *training* pair (S_i, i_{T+1}); line
11 asks the student for every sequence of train, valid and test. The teacher can also write
valid/test chains (`distill teach --parts train,valid,test`): Table 4's "w/o Student Distill"
builds H_i from the un-tuned teacher's chains for every sequence. A student learns from the
training chains only, whatever else its chain set holds. Both see the same prompt
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
from factory.teacher.engine import PARSER_GAVE_UP
from factory.verdicts import FAILED, outcome_verdict
from factory.warehouse import require_split

PROMPT = "scoter_distill"
PARTS = ("train", "valid", "test")
#: SCoTER truncates histories to the 20 most recent items (sec. 4.1)
MAX_HISTORY = 20
#: Fig. 11 shows short descriptions; longer ones are cut to this many words
DESC_WORDS = 30


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
    """A stable pseudo-random order of users, so --limit takes a spread of users (with all
    their parts together), not the lowest ids."""
    return hashlib.sha1(user_id.encode()).hexdigest()


def load_sequences(con: duckdb.DuckDBPyConnection, dataset: str, split: str,
                   parts: Sequence[str], max_history: int = MAX_HISTORY) -> list[Seq]:
    """The split's leave-one-out rows of `parts`, each history cut to its last items."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise FactoryError(f"unknown split part {unknown[0]!r} (choose from train, valid, test)")
    if max_history < 1:
        raise FactoryError("--history must be at least 1")
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
    out.sort(key=lambda s: (_order(s.user_id), s.user_id, PARTS.index(s.part)))
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
    verdict, reason = outcome_verdict(outcome)    # kept | truncated | failed
    row.update(verdict=verdict, reason=reason)
    if outcome.ok:
        chain = outcome.value
        row.update(overall=chain.overall, steps=list(chain.steps), summary=chain.summary)
    elif verdict == FAILED and outcome.error.startswith(PARSER_GAVE_UP):
        row.update(verdict=REJECTED, reason=outcome.error.partition("last: ")[2]
                   or outcome.error)
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
    # DuckDB returns JSON columns (lora, training) as their text: parse them here, once
    return {d[0]: json.loads(v) if str(d[1]) == "JSON" and isinstance(v, str) else v
            for d, v in zip(cur.description, row, strict=True)}


def resolve_chains(con: duckdb.DuckDBPyConnection, spec: str, dataset: str) -> ChainSet:
    """`teacher:<distill teach run>` or `student:<distill student or generate run>`, each run
    a whole id, a unique prefix or `latest` (the dataset's newest succeeded teach, or
    generate, run). The ChainSet's `spec` names the run by its whole id, for provenance."""
    from factory.runs import LATEST, resolve_run

    source, sep, text = spec.partition(":")
    if not sep or source not in ("teacher", "student") or not text.strip():
        raise FactoryError(f"--chains {spec!r}: expected teacher:<run-id> or student:<run-id> "
                           "(or teacher:latest, student:latest)")
    option = f"--chains {source}:"
    if source == "teacher":
        run_id = resolve_run(con, "distill-teach", dataset, text, what="distill teach",
                             option=option, first=f"factory distill teach --dataset {dataset}")
        params = require_succeeded(con, run_id, "distill teach", ("distill-teach",))
        chain_set = params.get("chain_set")
    else:
        jobs = (("distill-generate",) if text.strip() == LATEST
                else ("distill-generate", "distill-student"))
        run_id = resolve_run(con, jobs, dataset, text, what="distill generate or student",
                             option=option,
                             first=f"factory distill generate --dataset {dataset}")
        job = (_run_row(con, run_id) or ("",))[0]
        if job == "distill-student":
            student_record(con, run_id)
            found = con.execute(
                "select chain_set from chains where source = 'student' and dataset = ?"
                " and model = (select model_id from student_models where run_id = ?)"
                " and chain_set in (select params->>'chain_set' from job_runs"
                " where job = 'distill-generate' and status = 'succeeded')"
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
    spec = f"{source}:{run_id}"
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


def resolve_student(con: duckdb.DuckDBPyConnection, dataset: str, text: str | None) -> str:
    """A `distill student` run of the dataset: a whole id, a unique prefix, or latest (the
    default)."""
    from factory.runs import resolve_run

    return resolve_run(con, "distill-student", dataset, text, what="distill student",
                       option="--student",
                       first=f"factory distill student --dataset {dataset}")


# -- teach and generate ---------------------------------------------------------------------
#: DeepSeek-R1's recommended sampling (the paper's teacher); room for its thinking
TEACHER_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "max_tokens": 8192}
#: the student writes one deterministic chain per sequence
#: optimizer steps `distill student` takes on a CPU unless --max-steps says otherwise
CPU_MAX_STEPS = 10
STUDENT_SAMPLING = {"temperature": 0.0, "max_tokens": 1024}


#: a redraw of a greedy student samples at this temperature (with a seed per draw)
REDRAW_TEMPERATURE = 0.7


def run_chains(wh: Any, source: str, *, dataset: str, split: str | None, parts: list[str],
               options: Any, template_name: str | None = None, max_history: int = MAX_HISTORY,
               student_run: str | None = None, redraws: int = 0) -> Any:
    """Alg. 2 line 6 (source 'teacher') or line 12 ('student'): one chain per sequence.

    `redraws` > 0 (`distill generate --redraw-rejected`): only the sequences whose chain is
    rejected are asked again, with up to `redraws` new draws each (new seeds; a greedy
    student samples at REDRAW_TEMPERATURE). Draws are indexed after the run's own, so they
    are new cache rows, and a re-run replays them instead of paying again. A plain re-run
    leaves redrawn chains as they are (replaying the first draw would undo the redraw)."""
    from factory.console import console, summary
    from factory.prompts import load_prompt
    from factory.teacher import Sampling, TeacherJob, Work
    from factory.verdicts import report_rows

    prompt = load_prompt(PROMPT)
    record = None
    with wh.read() as con:
        if source == "student":
            student_run = resolve_student(con, dataset, student_run)
            record = student_record(con, student_run)
            if record["dataset"] != dataset:
                raise FactoryError(f"student {student_run} was trained on "
                                   f"{record['dataset']!r}, not {dataset!r}")
            if record["prompt_hash"] != prompt.hash:
                raise FactoryError(
                    f"prompt {PROMPT} changed since student {student_run} was trained "
                    f"(hash {record['prompt_hash']}, now {prompt.hash}); train it again")
            split, template_name = record["split"], record["template"]
            steps = tuple(record["template_steps"])
            max_history = int(record["max_history"])
        else:
            from factory.splits import require_loo
            from factory.templates import get_template

            require_loo(con, dataset, split, "a chain per sequence (SCoTER 4.1)")
            template = get_template(con, template_name, dataset)
            steps, template_name = template.steps, template.name  # 'discovered' -> its run
        seqs = load_sequences(con, dataset, split, parts, max_history)
        items = item_entries(con, dataset, {i for s in seqs for i in s.history})
    if not seqs:
        raise FactoryError(f"no {'/'.join(parts)} sequences with history in {dataset!r} "
                           f"split {split!r}")
    if record is not None:
        options = options.with_(model=_student_model_option(options, record))
    defaults = Sampling(**(TEACHER_SAMPLING if source == "teacher" else STUDENT_SAMPLING))
    sampling = defaults.merged(options.sampling)
    if not sampling.temperature:
        options = options.with_(parse_retries=0)  # greedy: a new draw repeats the answer
    own_draws = 1 + options.parse_retries         # what a plain run may draw per sequence
    redraw = None
    if redraws:
        redraw = (own_draws, sampling.merged(Sampling(
            temperature=sampling.temperature or REDRAW_TEMPERATURE,
            seed=sampling.seed if sampling.seed is not None else 0)))
        options = options.with_(parse_retries=options.parse_retries + redraws)
    params = {"dataset": dataset, "split": split, "parts": parts, "template": template_name,
              "steps": list(steps), "max_history": max_history, "prompt": PROMPT,
              "student": student_run, "redraw_rejected": redraws}
    job = TeacherJob(wh, f"distill-{'teach' if source == 'teacher' else 'generate'}",
                     dataset=dataset, options=options, params=params, defaults=defaults,
                     backend=student_backend(options, record) if record else None,
                     redraw=redraw)
    chain_set = chain_set_id(source, {
        "dataset": dataset, "split": split, "model": job.backend.model,
        "prompt_hash": prompt.hash, "template": template_name, "steps": list(steps),
        "sampling": job.sampling.as_dict(), "max_history": max_history})
    job.params["chain_set"] = chain_set
    fixed = {"chain_set": chain_set, "dataset": dataset, "split": split, "source": source,
             "template": template_name, "template_steps": list(steps)}
    with wh.read() as con:
        stored = {f"{p}:{u}": (v, d) for p, u, v, d in con.execute(
            "select part, user_id, verdict, draws from chains where chain_set = ?",
            [chain_set]).fetchall()}
    if redraws:
        seqs = [s for s in seqs if stored.get(s.key, ("",))[0] == REJECTED]
        if not seqs:
            console.print(f"no rejected chains to redraw in chain set {chain_set} "
                          f"({', '.join(parts)})")
            return None
    else:    # a plain run keeps what a redraw wrote
        redrawn = {k for k, (_, d) in stored.items() if (d or 0) > own_draws}
        if redrawn:
            seqs = [s for s in seqs if s.key not in redrawn]
            console.print(f"  {len(redrawn):,} redrawn chain(s) kept as they are "
                          "(--redraw-rejected)")
    works = [Work(id=s.key, vars=prompt_vars(s, steps, items), data=s) for s in seqs]
    with job:
        report = job.run(works, prompt=prompt, parse=chain_parser(steps), table="chains",
                         row=lambda o: chain_row(o, fixed))
    if report.dry_run:
        return report
    summary(f"{source} chains for {dataset} ({', '.join(parts)}), template {template_name}",
            report_rows(report),
            f"select verdict, reason, count(*) from chains where chain_set = '{chain_set}' "
            "group by all order by 3 desc")
    with wh.read() as con:
        verdicts = con.execute(
            "select verdict, count(*) from chains where chain_set = ? group by 1 order by 1",
            [chain_set]).fetchall()
        reasons = con.execute(
            "select reason, count(*) from chains where chain_set = ? and verdict <> 'kept'"
            " group by 1 order by 2 desc, 1 limit 3", [chain_set]).fetchall()
    console.print(f"  chain set {chain_set}: "
                  + ", ".join(f"{v} {n:,}" for v, n in verdicts))
    for reason, n in reasons:
        console.print(f"    {n:,} x {reason}")
    if redraws:
        with wh.read() as con:
            (now_kept,) = con.execute(
                "select count(*) from chains where chain_set = ? and verdict = 'kept' and"
                " part || ':' || user_id in (select unnest(?::varchar[]))",
                [chain_set, [s.key for s in seqs]]).fetchone()
        console.print(f"  redrawn: {len(seqs):,} rejected chain(s), {now_kept:,} now kept "
                      f"(up to {redraws} new draw(s) each; a re-run replays them)")
    rejected = sum(n for v, n in verdicts if v == REJECTED)
    if source == "student" and rejected:
        console.print(f"  {rejected:,} rejected: `--redraw-rejected` redraws only them; "
                      "`export cache --missing skip` marks them instead")
    console.print(f"  next: --chains {source}:latest (this run: "
                  f"{student_run if record else report.run_id})", soft_wrap=True)
    return report


def _student_model_option(options: Any, record: dict[str, Any]) -> str:
    """The model a student is asked for: its model id (a vLLM server must serve the adapter
    under that name, so that the cache key names this student and no other)."""
    if options.model and options.model != record["model_id"]:
        raise FactoryError(f"--teacher-model {options.model!r}: a student is addressed by its "
                           f"model id {record['model_id']!r} (serve the adapter under that "
                           "name: --lora-modules <model id>=<adapter dir>)")
    return record["model_id"]


def student_backend(options: Any, record: dict[str, Any]) -> Any:
    """In-process backends load the base model and the student's LoRA adapter; an OpenAI-
    compatible server (vLLM with --lora-modules) is reached as any teacher (None)."""
    from factory.student_backends import (
        StudentTransformersBackend,
        StudentVLLMBackend,
        refuse_gguf_student,
    )

    name = options.backend_name
    if name == "openai":
        refuse_gguf_student(record)    # a vLLM server cannot load it either
        return None
    if name == "transformers":
        return StudentTransformersBackend(record, options.concurrency)
    return StudentVLLMBackend(record, options.concurrency, options.vllm_args)


# -- student --------------------------------------------------------------------------------
def training_pairs(con: duckdb.DuckDBPyConnection, chain_set: str
                   ) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages exactly as the teacher got them, the chain in Fig. 11 format) for
    every kept training chain."""
    from factory.chains import KEPT, ParsedChain, render_chain

    rows = con.execute(
        "select c.user_id, l.request, c.template_steps, c.overall, c.steps, c.summary"
        " from chains c left join llm_calls l on l.key = c.call_key"
        " where c.chain_set = ? and c.verdict = 'kept' and c.part = 'train'"
        " order by c.user_id", [chain_set]).fetchall()
    pairs = []
    for user, request, names, overall, steps, summary in rows:
        if request is None:
            raise FactoryError(f"the teacher call of user {user}'s chain is not in llm_calls "
                               "(was a shard merged without its calls?)")
        messages = json.loads(request)["messages"]
        answer = render_chain(names, ParsedChain(KEPT, None, overall, tuple(steps), summary))
        pairs.append((messages, answer))
    return pairs


def train_student(wh: Any, *, dataset: str, chains: str | None, base: str, opts: Any,
                  out: Any) -> dict[str, Any]:
    """Alg. 2 line 9: LoRA SFT on the kept teacher chains; the model registry row."""
    from pathlib import Path

    from factory import student as sft
    from factory.console import console, summary
    from factory.prompts import load_prompt
    from factory.runs import finish_run, start_run
    from factory.step_cache import files_dir

    prompt = load_prompt(PROMPT)
    with wh.read() as con:
        from factory.warehouse import require_dataset

        require_dataset(con, dataset)
        spec = chains or "teacher:latest"
        if not spec.startswith("teacher:"):
            raise FactoryError(f"--chains {spec!r}: a student learns from teacher:<run> chains")
        cs = resolve_chains(con, spec, dataset)
        spec = cs.spec
        teach = con.execute("select params from job_runs where job = 'distill-teach' and"
                            " params->>'chain_set' = ? and status = 'succeeded'"
                            " order by started_at desc limit 1",
                            [cs.chain_set]).fetchone()
        max_history = int(json.loads(teach[0])["max_history"]) if teach else MAX_HISTORY
        prompt_hash = con.execute("select any_value(prompt_hash) from chains where chain_set = ?"
                                  " and verdict = 'kept'", [cs.chain_set]).fetchone()[0]
        pairs = training_pairs(con, cs.chain_set)
    if prompt_hash != prompt.hash:
        raise FactoryError(f"the chains of {spec} were written with another version of prompt "
                           f"{PROMPT} ({prompt_hash}, now {prompt.hash}); run distill teach "
                           "again")
    resolved = sft.resolve_base(base)
    if not opts.device:
        import torch

        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.device == "cpu" and opts.max_steps is None:
        # a CPU does ~20-60 s per step of 4 x 1k tokens even for the 135M SmolLM2: a whole
        # epoch of a few hundred chains would take an hour; a GPU runs the epoch
        opts.max_steps = CPU_MAX_STEPS
        console.print(f"on a CPU: at most {CPU_MAX_STEPS} optimizer steps (--max-steps to "
                      "change; a GPU runs the whole epoch)")
    params = {"dataset": dataset, "chains": spec, "chain_set": cs.chain_set, "base": base,
              "training": sft.options_dict(opts)}
    with wh.write() as con:
        run_id = start_run(con, "distill-student", dataset, params)
    directory = Path(out) if out else files_dir(wh.path) / "models" / run_id
    try:
        tokenizer = sft.load_tokenizer(resolved)
        examples, too_long = sft.encode_pairs(tokenizer, pairs, opts.max_length)
        if not examples:
            raise FactoryError(f"all {len(pairs)} kept chains are longer than --max-length "
                               f"{opts.max_length} tokens")
        with console.status(f"loading base model {base}"):
            model = sft.load_model(resolved, opts.device)
        total = opts.planned_steps(len(examples))
        from factory.console import progress

        with progress() as bar:
            task = bar.add_task("LoRA SFT", total=total)
            model, losses = sft.train_lora(
                model, tokenizer, examples, opts,
                on_step=lambda step, loss: bar.update(task, completed=step,
                                                      description=f"LoRA SFT loss {loss:.3f}"))
        directory.mkdir(parents=True, exist_ok=True)
        record = {
            "run_id": run_id, "dataset": dataset, "split": cs.split, "chain_set": cs.chain_set,
            "template": cs.template, "template_steps": list(cs.steps),
            "prompt_name": PROMPT, "prompt_hash": prompt.hash, "max_history": max_history,
            "base": base, "base_location": resolved.location, "base_gguf": resolved.gguf_file,
            "model_id": f"student/{run_id}",
            "lora": {"r": opts.lora.r, "alpha": opts.lora.alpha, "dropout": opts.lora.dropout,
                     "target_modules": opts.lora.target_modules},
            "training": {k: v for k, v in sft.options_dict(opts).items() if k != "lora"},
            "n_chains": len(pairs), "n_train": len(examples), "n_too_long": too_long,
            "steps": len(losses), "loss_curve": losses,
            "final_loss": losses[-1] if losses else None,
            "loss_plot": str((directory / "loss.png").resolve()),
        }
        record = sft.save_student(directory, model, tokenizer, losses, record,
                                  f"student {run_id}: {base} + LoRA r={opts.lora.r}")
        with wh.write() as con:
            con.execute(
                f"insert into student_models ({', '.join(record)}) values "
                f"({', '.join('?' for _ in record)})",
                [json.dumps(v) if k in ("lora", "training") else v for k, v in record.items()])
            finish_run(con, run_id, "succeeded", {"n_chains": len(pairs),
                                                  "n_train": len(examples),
                                                  "n_too_long": too_long, "steps": len(losses),
                                                  "final_loss": record["final_loss"]})
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        with wh.write() as con:
            finish_run(con, run_id, status, None, str(exc) or type(exc).__name__)
        raise
    summary(f"trained student {run_id}", {
        "base": base, "teacher chains": spec, "examples": len(examples),
        "left out (too long)": too_long, "optimizer steps": len(losses),
        "loss first -> last": f"{losses[0]:.3f} -> {losses[-1]:.3f}",
        "adapter": record["adapter_dir"], "loss curve": record["loss_plot"],
    }, f"select run_id, base, n_train, final_loss from student_models where run_id = "
       f"'{run_id}'")
    console.print(f"  next: factory distill generate --dataset {dataset} --student {run_id}")
    return record


# -- step caches of a chain set -------------------------------------------------------------
def kept_chains(con: duckdb.DuckDBPyConnection, chain_set: str
                ) -> list[tuple[str, str, list[str]]]:
    """(part, user_id, step texts) of every kept chain, in part then user order."""
    rows = con.execute(
        "select part, user_id, steps from chains where chain_set = ? and verdict = 'kept'",
        [chain_set]).fetchall()
    return sorted(rows, key=lambda r: (PARTS.index(r[0]), r[1]))


def chains_digest(rows: Iterable[tuple[str, str, list[str]]]) -> str:
    """A fingerprint of the chains a cache was built from: a changed chain makes it stale."""
    h = hashlib.sha256()
    for part, user, steps in rows:
        h.update(json.dumps([part, user, steps], ensure_ascii=False).encode())
    return h.hexdigest()


def find_step_cache(con: duckdb.DuckDBPyConnection, spec: str, dataset: str,
                    encoder: str | None = None, verify: bool = True) -> Any:
    """The newest step cache of a chain set, checked to be complete and current: built with
    `encoder` (when given), files matching their checksums, chains unchanged since."""
    from pathlib import Path

    from factory.step_cache import open_cache

    cs = resolve_chains(con, spec, dataset)
    rows = con.execute("select cache_id, dir, encoder from step_caches where chain_set = ?"
                       " order by created_at desc", [cs.chain_set]).fetchall()
    if not rows:
        raise FactoryError(f"no step embeddings of {spec}: run `factory embed-steps "
                           f"--dataset {dataset} --chains {spec}` first")
    if encoder is not None:
        matching = [r for r in rows if r[2] == encoder]
        if not matching:
            built = ", ".join(sorted({r[2] for r in rows}))
            raise FactoryError(f"the step embeddings of {spec} were built with encoder {built}, "
                               f"not {encoder}; run embed-steps with that --encoder")
        rows = matching
    cache_id, directory, built_with = rows[0]
    cache = open_cache(Path(directory), encoder or built_with, verify=verify)
    if cache.manifest.get("cache_id") != cache_id:
        raise FactoryError(f"step cache {directory} is stale: it holds "
                           f"{cache.manifest.get('cache_id')}, the warehouse indexes {cache_id}")
    if cache.manifest.get("chains_sha256") != chains_digest(kept_chains(con, cs.chain_set)):
        raise FactoryError(f"step cache {cache_id} is stale: the chains of {spec} changed "
                           "since it was built; run `factory embed-steps` again")
    return cache
