"""`factory thinkrec`: ThinkRec reasoning traces with reflect turns (sec. 3.2.1, App. B.3).

A seeded sample of training instances (user, target) is shown to the teacher: the user's
latest history items with title, the user's yes/no label and the item's keywords, and the
target's title (B.3 first turn). The answer must begin with Yes or No. While it disagrees
with the label, a reflect turn (one of B.3's three wordings, rotating) reveals the label and
asks again, up to `--max-reflections`; the last explanation is the trace. Every turn is a
row of `thinkrec_turns`; every instance a row of `thinkrec_traces` recording the
conversation, the attempts, and whether the label was revealed. A teacher that never answers
in the format makes a failed trace, and one still wrong at the limit a rejected one. A turn
cut short (max_tokens, a content filter, an unclosed <think>) ends the conversation: the
trace is truncated, its reason names the turn and the budget, and it is never kept.

A reasoning teacher's thinking (QwQ's <think> block, or `reasoning_content` from vLLM's
reasoning parser or DeepSeek's API) is the trace: the paper records the reasoning model's
"explanation content" and its case study (App. C) shows a trace that is the thinking ("Yes.
Okay, let's see here..."). The decision is parsed from the answer only; the trace is "Yes. "
or "No. " followed by the thinking, or by the answer's own reasoning for a model that does
not think. The thinking is in llm_calls.reasoning either way.

The rounds depend on earlier answers, so only the first round is cut by `--shard` and
`--limit`; later rounds continue exactly the conversations the first round started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import TYPE_CHECKING, Any

import typer

from factory.console import console, summary
from factory.teacher.options import TeacherOptions, teacher_options
from factory.vocabulary import DatasetOpt

if TYPE_CHECKING:
    from factory.prompts import Prompt
    from factory.teacher import Outcome, Report
    from factory.thinkrec import Instance
    from factory.warehouse import Warehouse

JOB = "thinkrec"
TURNS = "thinkrec_turns"
TRACES = "thinkrec_traces"
FIRST, REFLECT = "thinkrec_first_turn", "thinkrec_reflect"
VARIANTS = 3
#: The paper's teacher is QwQ-32B and gives no sampling parameters. temperature 0.6 and
#: top_p 0.95 are QwQ's recommended settings (its model card). max_tokens is the factory's
#: choice: a reasoning model spends its thinking inside max_tokens (vLLM, DeepSeek's API),
#: and QwQ thinks for thousands of tokens; 8192 leaves room for that plus the answer
#: (the model card allows up to 32,768; raise --max-tokens if traces come back truncated).
SAMPLING = {"temperature": 0.6, "top_p": 0.95, "max_tokens": 8192}


def thinkrec(
    dataset: str = DatasetOpt,
    sample: int = typer.Option(3000, "--instances", min=1, help="Training instances to explain "
                               "(ThinkRec: a few thousand)."),
    max_reflections: int = typer.Option(3, "--max-reflections", min=0, help="Reflect turns "
                                        "(each reveals the label) before giving up."),
    split: str = typer.Option(None, "--split", help="Instances come from its train part "
                              "[default: thinkrec, ThinkRec 4.1's protocol, where the dataset "
                              "has one (ML-1M), else loo]."),
    history: int = typer.Option(10, "--history", min=1, help="History items shown "
                                "(TALLRec/ThinkRec: 10)."),
    sample_seed: int = typer.Option(0, "--sample-seed", help="Seed of the instance sample "
                                    "(--seed is the teacher's sampling seed)."),
    noun: str = typer.Option(None, "--noun", help="What the prompt calls an item "
                             "[default: movie for MovieLens, else item; ThinkRec: book]."),
    *, teacher: TeacherOptions,
) -> None:
    """Synthesise reasoning traces: predict, reflect on a revealed label until right."""
    from factory.cli import warehouse
    from factory.verdicts import report_rows

    result = run_thinkrec(warehouse(), dataset, teacher, sample=sample,
                          max_reflections=max_reflections, split=split, history=history,
                          seed=sample_seed, noun=noun)
    report = result["report"]
    if report.dry_run:
        return
    rows = thinkrec_rows(report_rows(report), result["instances"], result["rounds"])
    rows["split"] = result["split"]
    rows.update({f"traces {k}": v for k, v in result["traces"].items()})
    if result["history_without_keywords"]:
        rows["history items without keywords"] = result["history_without_keywords"]
    summary(f"ThinkRec traces of {dataset}", rows,
            f"select verdict, label_revealed, reflections, count(*) from {TRACES}"
            f" where dataset = '{dataset}' and run_id = '{report.run_id}' group by all"
            " order by all")


def run_thinkrec(wh: Warehouse, dataset: str, teacher: TeacherOptions, *, sample: int = 3000,
                 max_reflections: int = 3, split: str | None = None, history: int = 10,
                 seed: int = 0, noun: str | None = None) -> dict[str, Any]:
    from factory.answers import decision_probability, parse_yes_no
    from factory.errors import FactoryError
    from factory.itemtext import item_noun, latest_keywords, load_items, plural, render_history
    from factory.prompts import load_prompt
    from factory.splits import thinkrec_split
    from factory.teacher import Sampling, TeacherJob, Work, upsert
    from factory.thinkrec import candidates, load_instances, require_labels, sample_keys
    from factory.warehouse import require_dataset, require_split

    first, reflect = load_prompt(FIRST), load_prompt(REFLECT)
    if split is None:
        with wh.write() as con:
            require_dataset(con, dataset)
            split, chosen = thinkrec_split(con, dataset, None)
        if chosen:
            console.print(chosen)
    with wh.read() as con:
        require_split(con, dataset, split)
        noun = noun or item_noun(con, dataset)
        require_labels(con, dataset)
        keys = sample_keys(candidates(con, dataset, split, part="train"), sample, seed)
        items = load_items(con, dataset)
        keywords = latest_keywords(con, dataset)
        instances = load_instances(con, dataset, split, keys, history, items, keywords)
    if not instances:
        raise FactoryError(f"no training instance of {dataset!r} (split {split!r}) has a "
                           "labelled, titled target with earlier history")
    no_keywords = sum(e.keywords is None for i in instances for e in i.history)

    def work_id(i: Instance) -> str:
        return f"{i.user_id}@{i.position}"

    def answer(i: Instance) -> str:
        return "Yes" if i.label else "No"

    params = {"dataset": dataset, "split": split, "sample": sample, "instances": len(instances),
              "max_reflections": max_reflections, "history": history, "seed": seed,
              "noun": noun, "history_items_without_keywords": no_keywords}
    convs: dict[str, dict[str, Any]] = {}
    with TeacherJob(wh, JOB, dataset=dataset, options=teacher, params=params,
                    defaults=Sampling(**SAMPLING)) as job:
        works = [Work(id=work_id(i), data=(i, 0, None), vars={
            "history": render_history(i.history), "target_title": items[i.item_id].title,
            "noun": noun, "nouns": plural(noun)}) for i in instances]
        prompt = first
        rounds: list[int] = []         # turns asked per round: first answers, reflections
        for turn in range(max_reflections + 1):
            outcomes: list[Outcome] = []

            def row(o: Outcome, sink: list[Outcome] = outcomes) -> dict[str, Any]:
                sink.append(o)
                i, t, variant = o.work.data
                return {"dataset": dataset, "split": split, "user_id": i.user_id,
                        "position": i.position, "turn": t, "variant": variant,
                        "prediction": o.value.answer if o.ok else None,
                        "reasoning": o.value.reasoning if o.ok else None,
                        "correct": o.value.answer == i.label if o.ok else None,
                        # --logprobs: how sure the teacher was of its Yes/No
                        "verdict_prob": decision_probability(o.text or "", o.logprobs,
                                                             o.value) if o.ok else None}

            label = (f"{JOB} first answers" if turn == 0
                     else f"{JOB} reflection {turn}/{max_reflections}")
            report: Report = job.run(works, prompt=prompt, parse=parse_yes_no, table=TURNS,
                                     row=row, with_reasoning=True, label=label)
            if report.dry_run:
                return {"report": report, "instances": len(instances), "traces": {},
                        "split": split, "rounds": [],
                        "history_without_keywords": no_keywords}
            rounds.append(report.items)
            works = []
            for o in sorted(outcomes, key=lambda o: o.work.id):
                i, t, variant = o.work.data
                conv = convs.setdefault(o.work.id, {"instance": i, "turns": [],
                                                    "work_key": o.work_key})
                conv["turns"].append(o)
                if o.ok and o.value.answer != i.label and turn < max_reflections:
                    v = reflect_variant(i.user_id, i.position, turn)
                    works.append(Work(
                        id=o.work.id, data=(i, turn + 1, v),
                        history=(*o.work.history, *prompt.render(**o.work.vars),
                                 {"role": "assistant", "content": o.text}),
                        vars={"answer": answer(i), "target_title": items[i.item_id].title,
                              "noun": noun, "variant": v}))
                else:
                    conv["done"] = True
            if not works or report.stopped:
                break
            prompt = reflect
            # later rounds continue exactly the conversations the first round started
            job.options = dataclasses.replace(job.options, shard=None, limit=None)
        traces = [_trace(c, dataset, split, first, reflect) for c in convs.values()
                  if c.get("done")]
        with wh.write() as con:
            upsert(con, TRACES, [{**t, "run_id": job.run_id} for t in traces])
    counts: dict[str, int] = {}
    for t in traces:
        key = t["verdict"] + (" (label revealed)" if t["label_revealed"] and
                              t["verdict"] == "kept" else "")
        counts[key] = counts.get(key, 0) + 1
    return {"report": job.totals, "instances": len(instances), "traces": counts, "split": split,
            "rounds": rounds, "history_without_keywords": no_keywords}


def thinkrec_rows(rows: dict[str, Any], instances: int, rounds: list[int]) -> dict[str, Any]:
    """The engine counts turns (an instance asked again in each reflection is one more item):
    show instances first and the turns as what they are, split by round, so that `items:
    5,176` never stands beside `instances: 3,000` unexplained."""
    turns = rows.pop("items")
    split = f"{rounds[0]:,} first answers" + "".join(
        f" + {n:,} in reflection {i}" for i, n in enumerate(rounds[1:], 1))
    return {"instances": instances, "turns asked": f"{turns:,} ({split})" if rounds else turns,
            **rows}


def reflect_variant(user_id: str, position: int, reflection: int) -> int:
    """B.3 wording (1-3) of a reflect turn: rotating, from a start spread over instances."""
    digest = hashlib.sha256(f"{user_id}\x1f{position}".encode()).digest()
    return (digest[0] + reflection) % VARIANTS + 1


def _trace(conv: dict[str, Any], dataset: str, split: str, first: Prompt,
           reflect: Prompt) -> dict[str, Any]:
    """The instance's row: the whole conversation and how it ended."""
    from factory.answers import decision_probability
    from factory.verdicts import outcome_verdict

    i: Instance = conv["instance"]
    turns: list[Outcome] = conv["turns"]
    last = turns[-1]
    messages = [dict(m) for m in last.work.history]
    messages += (first if len(turns) == 1 else reflect).render(**last.work.vars)
    if last.ok:
        messages.append({"role": "assistant", "content": last.text})
    for m, o in zip([m for m in messages if m["role"] == "assistant"], turns, strict=False):
        m.update(call_key=o.call_key, prediction=o.value.label)
    reflections = len(turns) - 1
    if not last.ok:     # failed or truncated: the conversation ends there, never kept
        verdict, reason = outcome_verdict(last)
        reason = f"turn {reflections}: {reason}"
    elif last.value.answer == i.label:
        verdict, reason = "kept", None
    else:
        verdict, reason = "rejected", f"still wrong after {reflections} reflections"
    return {
        "dataset": dataset, "split": split, "user_id": i.user_id, "position": i.position,
        "item_id": i.item_id, "label": i.label,
        "history": json.dumps([e.to_json() for e in i.history], ensure_ascii=False),
        "turns": json.dumps(messages, ensure_ascii=False),
        "attempts": sum(o.ok for o in turns), "reflections": reflections,
        "label_revealed": reflections > 0,
        "prediction": last.value.answer if last.ok else None,
        "verdict_prob": decision_probability(last.text or "", last.logprobs, last.value)
        if last.ok else None,
        "explanation": last.value.as_text() if last.ok else None,
        "verdict": verdict, "reason": reason, "work_key": conv["work_key"],
        "call_keys": [o.call_key for o in turns], "prompt_name": first.name,
        "prompt_hash": first.hash, "reflect_hash": reflect.hash,
        "backend": last.meta["backend"], "model": last.meta["model"],
        "draws": sum(o.draws for o in turns), "status": last.status,
    }


def register(app: typer.Typer) -> None:
    app.command(JOB)(teacher_options(thinkrec))
