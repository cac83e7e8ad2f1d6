"""Teacher access: every LLM call a job makes goes through here.

A job supplies work items (template variables per item), a prompt template, a parser and
the columns of its output table; the platform renders, caches, rate-limits, retries, re-draws
malformed answers, prices, records provenance and stores the rows in small crash-safe
batches. A complete job command (this is `jobs/describe_items.py`, shortened)::

    import typer
    from factory.cli import warehouse
    from factory.teacher import TeacherOptions, teacher_options

    @app.command("describe-items")
    @teacher_options                      # --teacher-url ... --dry-run --max-cost --shard ...
    def describe_items(dataset: str = typer.Option(...), *, teacher: TeacherOptions) -> None:
        from factory.prompts import load_prompt
        from factory.teacher import Sampling, TeacherJob, Work

        prompt = load_prompt("describe_item")               # prompts/describe_item.j2
        with warehouse().read() as con:
            items = con.execute("select item_id, title from items where dataset = ?",
                                [dataset]).fetchall()
        works = [Work(id=item_id, vars={"title": title, "categories": None, "year": None})
                 for item_id, title in items]

        def parse(text: str) -> str:                        # ValueError = malformed: re-drawn
            sentence = text.strip()
            if len(sentence.split()) < 3:
                raise ValueError("not a sentence")
            return sentence

        with TeacherJob(warehouse(), "describe-items", dataset=dataset, options=teacher,
                        params={"dataset": dataset}, defaults=Sampling(max_tokens=64)) as job:
            report = job.run(works, prompt=prompt, parse=parse, table="item_descriptions",
                             row=lambda o: {"dataset": dataset, "item_id": o.work.id,
                                            "description": o.value})
        report.print_summary("described items", "select * from item_descriptions")

The output table (a migration of the job's own) has the job's columns plus
PROVENANCE_COLUMNS, and a primary key that includes `work_key` (so answers from different
models, prompts or sampling settings live side by side, and a re-run replaces its own rows):

    work_key, call_key, run_id, prompt_name, prompt_hash, backend, model,
    sample, draws, cached, status ('ok' | 'failed'), error

`call_key` joins `llm_calls`, the content-addressed cache holding the raw request and
response, finish reason, tokens, latency, attempts, error, cost and price-table version,
and a reasoning model's thinking (`reasoning`).
Failed items get a row with status 'failed' and the reason, never a default value.

Semantics worth knowing:
- A request's key hashes the model id, the rendered messages, the sampling parameters, the
  work's `sample` and the parse-retry `draw`. An 'ok' answer is never requested again
  (unless --refresh), by this job, a resumed run or any other job.
- `run()` may be called more than once inside one TeacherJob (rounds that depend on earlier
  answers, e.g. reflect turns: pass the earlier turns as `Work.history`).
- Reasoning models: the thinking arrives in `message.reasoning_content` (vLLM's reasoning
  parsers, DeepSeek's API) or inline as `<think>...</think>` (or only `</think>`, when the
  chat template opened the block). Either way it is stored in `llm_calls.reasoning` (`text`
  keeps the content as received) and put on `Outcome.reasoning`; the parser gets the answer
  without it. `run(..., with_reasoning=True)` calls `parse(answer, reasoning)` for jobs whose
  method uses the thinking (ThinkRec's trace). A reasoning model spends its thinking inside
  `max_tokens`: give such teachers a large budget.
- Work items that differ only in `sample` are one setup: with `--n-per-request K` up to K of
  its uncached first draws are asked in one request (`n`); each choice is stored under its
  sample's own key (`llm_calls.group_key`/`choice` name the request), so nothing changes for
  the job. `--logprobs K` puts the answer's per-token logprobs on `Outcome.logprobs`.
- Tests and benchmarks point jobs at `factory.testing.openai_server.OpenAIServer`.
"""

from factory.prompts import Prompt, load_prompt
from factory.teacher.engine import PROVENANCE_COLUMNS, Outcome, Report, TeacherJob, Work
from factory.teacher.options import TeacherOptions, teacher_options
from factory.teacher.request import Sampling
from factory.teacher.store import upsert

__all__ = [
    "PROVENANCE_COLUMNS", "Outcome", "Prompt", "Report", "Sampling", "TeacherJob",
    "TeacherOptions", "Work", "load_prompt", "teacher_options", "upsert",
]
