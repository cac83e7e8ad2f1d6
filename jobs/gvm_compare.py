"""`factory gvm compare` and `factory gvm transfer`: templates scored as LLM-as-recommender.

    factory gvm compare --dataset sports --templates two-step,three-step,five-step,discovered
    factory gvm transfer --from beauty --to sports

The teacher recommends under each template (the template's steps placed inside <cot_path>,
SCoTER App. F) for the same seeded users; answers are mapped to catalog items and scored on
each user's validation item, as in Validate. compare prints SCoTER Table 11 (Recall@20 and
NDCG@20 per template), transfer Table 3 (a pattern mined on one dataset used on another,
against the target's own). By default the users a discovered template was mined on are
left out, so it is not scored on the users it was selected on.
"""

from __future__ import annotations

from typing import Any

import typer

from factory.errors import FactoryError
from factory.teacher import TeacherOptions, teacher_options
from factory.templates import Template
from factory.vocabulary import DatasetOpt
from factory.warehouse import Warehouse


def run_compare(wh: Warehouse, dataset: str, templates: dict[str, Template], *, job_name: str,
                teacher: TeacherOptions, split: str, users: int, samples: int, n_items: int,
                max_history: int, held_out: bool, encoder: str | None,
                extra: dict[str, Any], sample_seed: int = 0) -> tuple[str | None, list[Any]]:
    """Ask the teacher under each template for the same users; store and score the chains.

    `templates`: label -> template. Returns the run id and one Evaluation per label.
    """
    from factory.gvm.parse import parse_generation
    from factory.gvm.phases import (
        Catalog,
        chain_columns,
        evaluate_templates,
        store_sequences,
        validate_run,
    )
    from factory.gvm.sequences import history_info, sample_sequences
    from factory.teacher import Sampling, TeacherJob, Work, load_prompt
    from jobs.gvm import GENERATE_SAMPLING, encoder_for

    if teacher.shard:
        raise FactoryError(f"{job_name} does not shard: every template is scored on the "
                           "same users in one run")
    defaults = Sampling(**GENERATE_SAMPLING)
    seed = defaults.merged(teacher.sampling).seed
    # a template mined on this dataset was selected on its run's users: score elsewhere
    exclude = sorted({t.run_id for t in templates.values()
                      if held_out and t.kind == "discovered" and t.dataset == dataset})
    with wh.read() as con:
        seqs = sample_sequences(con, dataset, split, users, sample_seed, max_history, exclude)
        histories = history_info(con, dataset, seqs)
    params = {"dataset": dataset, "split": split, "users": users, "samples": samples,
              "n_items": n_items, "max_history": max_history, "seed": seed,
              "sample_seed": sample_seed, "held_out_from": exclude, "encoder": encoder or "default",
              "templates": {label: t.name for label, t in templates.items()}, **extra}
    prompt = load_prompt("gvm_recommend")
    with TeacherJob(wh, job_name, dataset=dataset, options=teacher, params=params,
                    defaults=defaults) as job:
        if job.run_id is not None:
            store_sequences(wh, job.run_id, dataset, split, seqs)
        for t in templates.values():
            works = [Work(id=f"{t.name}/{s.user_id}/{k}", sample=k, data=s.user_id,
                          vars={"history": histories[s.user_id], "steps": list(t.steps),
                                "n_items": n_items})
                     for s in seqs for k in range(samples)]
            report = job.run(works, prompt=prompt,
                             parse=lambda text: parse_generation(text, n_items),
                             table="gvm_chains",
                             row=lambda o, name=t.name: chain_columns(name, o.work.data,
                                                                      o.value))
            if report.not_done:
                raise FactoryError(f"stopped early ({report.stopped}) at template {t.name}: "
                                   "re-run the same command to finish (answers are cached)")
        if job.run_id is None:  # --dry-run
            return None, []
        _, encode = encoder_for(wh, encoder, "gvm embeddings")
        names = [t.name for t in templates.values()]
        # the catalogue is embedded only if some answer parsed (issue 18)
        validate_run(wh, job.run_id, names, encode, Catalog(wh, dataset, encode))
        evals = evaluate_templates(
            wh, job.run_id, dataset,
            {t.name: (list(t.steps), t.dataset) for t in templates.values()}, samples)
    return job.run_id, evals


def relative_change(a: float, b: float) -> str:
    """b against a in percent, 2 decimals; a change that rounds to nothing is `0.00%`, not
    `-0.00%` (float noise between equal metrics)."""
    if not a:
        return "n/a (native is 0)"
    shown = f"{(b - a) / a:+.2%}"
    return "0.00%" if shown in ("+0.00%", "-0.00%") else shown


def _print(title: str, header: list[str], rows: list[list[str]], run_id: str) -> None:
    from rich.table import Table

    from factory.cli import stdout_console
    from factory.console import console

    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    stdout_console().print(table)
    console.print(f"  look: factory sql \"select * from gvm_evals where run_id = '{run_id}'\"")


def register(gvm_app: typer.Typer) -> None:
    common: dict[str, Any] = {
        "split": typer.Option("loo", "--split"),
        "users": typer.Option(200, "--users", min=1, help="Users scored (seeded)."),
        "sample_seed": typer.Option(0, "--sample-seed", help="Seed of the user sample "
                                    "(--seed is the teacher's sampling seed)."),
        "samples": typer.Option(1, "--answers-per-user", min=1, help="Teacher answers per "
                                "user and template."),
    }

    @gvm_app.command("compare")
    @teacher_options
    def compare_cmd(
        dataset: str = DatasetOpt,
        names: str = typer.Option("two-step,three-step,five-step,discovered", "--templates",
                                  help="Comma-separated template names ('discovered': the "
                                  "dataset's latest mined one; see `factory gvm templates`)."),
        split: str = common["split"],
        users: int = common["users"],
        samples: int = common["samples"],
        sample_seed: int = common["sample_seed"],
        n_items: int = typer.Option(20, "--items", min=1),
        max_history: int = typer.Option(20, "--history", min=1,
                                        help="Most recent training items shown."),
        held_out: bool = typer.Option(True, "--held-out/--with-mined-users",
                                      help="Leave out the users a discovered template was "
                                      "mined on."),
        encoder: str = typer.Option(None, "--encoder"),
        *,
        teacher: TeacherOptions,
    ) -> None:
        """Recall@20 / NDCG@20 of the teacher recommending under each template (Table 11)."""
        from factory.cli import warehouse
        from factory.templates import get_template

        wh = warehouse()
        labels = [n.strip() for n in names.split(",") if n.strip()]
        if not labels:
            raise FactoryError("--templates is empty")
        with wh.read() as con:
            chosen = {label: get_template(con, label, dataset) for label in labels}
        if len({t.name for t in chosen.values()}) < len(chosen):
            raise FactoryError("--templates names the same template twice")
        run_id, evals = run_compare(
            wh, dataset, chosen, job_name="gvm-compare", teacher=teacher, split=split,
            users=users, samples=samples, n_items=n_items, max_history=max_history,
            held_out=held_out, encoder=encoder, extra={}, sample_seed=sample_seed)
        if run_id is None:
            return
        by_name = {e.template: e for e in evals}
        rows = []
        for label, t in chosen.items():
            e = by_name[t.name]
            shown = label if label == t.name else f"{label} ({t.name})"
            rows.append([shown, str(len(t.steps)), f"{e.answered}/{e.users}",
                         f"{e.recall:.4f}", f"{e.ndcg:.4f}", f"{e.ci_low:.4f}-{e.ci_high:.4f}"])
        _print(f"LLM as recommender on {dataset} (SCoTER Table 11), run {run_id}",
               ["template", "steps", "answered", "Recall@20", "NDCG@20", "Recall 95% CI"],
               rows, run_id)

    @gvm_app.command("transfer")
    @teacher_options
    def transfer_cmd(
        source: str = typer.Option(..., "--from", help="Dataset whose discovered template "
                                   "is transferred."),
        target: str = typer.Option(..., "--to", help="Dataset it is used on."),
        split: str = common["split"],
        users: int = common["users"],
        samples: int = common["samples"],
        sample_seed: int = common["sample_seed"],
        n_items: int = typer.Option(20, "--items", min=1),
        max_history: int = typer.Option(20, "--history", min=1,
                                        help="Most recent training items shown."),
        held_out: bool = typer.Option(True, "--held-out/--with-mined-users"),
        encoder: str = typer.Option(None, "--encoder"),
        *,
        teacher: TeacherOptions,
    ) -> None:
        """A pattern mined on one dataset, used on another, against the target's own (Table 3)."""
        from factory.cli import warehouse
        from factory.templates import get_template

        if source == target:
            raise FactoryError("--from and --to name the same dataset")
        wh = warehouse()
        with wh.read() as con:
            chosen = {target: get_template(con, "discovered", target),
                      source: get_template(con, "discovered", source)}
        run_id, evals = run_compare(
            wh, target, chosen, job_name="gvm-transfer", teacher=teacher, split=split,
            users=users, samples=samples, n_items=n_items, max_history=max_history,
            held_out=held_out, encoder=encoder, extra={"from": source, "to": target},
            sample_seed=sample_seed)
        if run_id is None:
            return
        native, moved = evals

        rows = [[target, target, f"{native.recall:.4f}", f"{native.ndcg:.4f}", "-"],
                [source, target, f"{moved.recall:.4f}", f"{moved.ndcg:.4f}",
                 f"R {relative_change(native.recall, moved.recall)}, "
                 f"N {relative_change(native.ndcg, moved.ndcg)}"]]
        _print(f"Cross-dataset pattern transfer (SCoTER Table 3), run {run_id}",
               ["pattern source", "target", "Recall@20", "NDCG@20", "vs native"], rows, run_id)
