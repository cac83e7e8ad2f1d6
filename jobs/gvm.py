"""`factory gvm`: discover a dataset's reasoning pattern (SCoTER sec. 3.2, Alg. 1).

    factory gvm --dataset sports --users 2000 --answers-per-user 4
    factory gvm show --dataset sports
    factory gvm plot --dataset sports --out gvm_sports.png

Generate: for seeded users, the teacher answers the Fig. 9 prompt from the user's training
history (temperature 0.7, top-p 0.9, several samples each); answers are parsed, malformed ones
re-drawn, failures stored with the reason. Prune: near-duplicate paths (cosine >= 0.85) among
all the run's paths are set aside (Alg. 1 line 10 prunes C_all; `--prune-scope user` compares
a user's own samples only). Validate: recommended descriptions map to their top-1 catalog item;
Score = Recall@20 on the user's validation item. Mine: paths are clustered, P* is the
best-scoring cluster of at least --min-cluster-size paths, and the teacher abstracts the
Optimal CoT Template from the paths nearest its centroid (Fig. 10). A re-run with the same
options pays for nothing twice: teacher answers and embeddings come from their caches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from factory.errors import FactoryError
from factory.runs import timed
from factory.teacher import TeacherOptions, teacher_options
from factory.vocabulary import DatasetOpt

if TYPE_CHECKING:
    from factory.gvm.phases import Encode
    from factory.teacher import TeacherJob
    from factory.warehouse import Warehouse

gvm_app = typer.Typer(help="SCoTER Generate-Validate-Mine: discover, inspect and compare "
                           "reasoning templates.")

#: SCoTER sec. 3.2: tau_gen = 0.7, top-p 0.9; the seed makes samples reproducible
GENERATE_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 8192, "seed": 0}


def encoder_for(wh: Warehouse, encoder: str | None, label: str,
                read_only: bool = False) -> tuple[Any, Encode]:
    """The shared, cached sentence encoder and an Encode function over it (read_only: the
    cache is read, never added to)."""
    from factory.embeddings import Embedder

    embedder = Embedder(wh, encoder, read_only=read_only)
    return embedder, lambda texts: embedder.embed(texts, label=label)


def run_gvm(wh: Warehouse, dataset: str, *, teacher: TeacherOptions, split: str, users: int,
            samples: int, n_items: int, max_history: int, prune_threshold: float,
            prune_scope: str, cluster: str, k_min: int, k_max: int, min_cluster_size: int,
            exemplars: int, encoder: str | None, sample_seed: int = 0) -> str | None:
    """The whole pipeline as one teacher job; returns its run id (None on --dry-run).
    `sample_seed` draws the users and seeds k-means; the teacher's --seed only sampling."""
    from factory.console import console
    from factory.gvm.parse import parse_generation
    from factory.gvm.phases import FREE, chain_columns, store_sequences
    from factory.gvm.sequences import history_info, sample_sequences
    from factory.teacher import Sampling, TeacherJob, Work, load_prompt

    if teacher.shard:
        raise FactoryError("gvm does not shard: Mine needs every chain of the run; generate "
                           "on one node (or raise --concurrency) instead")
    if prune_scope not in ("user", "global"):
        raise FactoryError("--prune-scope must be user or global")
    defaults = Sampling(**GENERATE_SAMPLING)
    seed = defaults.merged(teacher.sampling).seed
    seconds: dict[str, float] = {}
    with timed(seconds, "sample"), wh.read() as con:
        seqs = sample_sequences(con, dataset, split, users, sample_seed, max_history)
        histories = history_info(con, dataset, seqs)
    works = [Work(id=f"{s.user_id}/{k}", sample=k, data=s.user_id,
                  vars={"history": histories[s.user_id], "n_items": n_items})
             for s in seqs for k in range(samples)]
    params = {"dataset": dataset, "split": split, "users": users, "samples": samples,
              "n_items": n_items, "max_history": max_history, "seed": seed,
              "sample_seed": sample_seed, "prune_threshold": prune_threshold,
              "prune_scope": prune_scope,
              "cluster": cluster, "k_range": [k_min, k_max],
              "min_cluster_size": min_cluster_size, "exemplars": exemplars,
              "encoder": encoder or "default"}
    with TeacherJob(wh, "gvm", dataset=dataset, options=teacher, params=params,
                    defaults=defaults) as job:
        if job.run_id is not None:
            store_sequences(wh, job.run_id, dataset, split, seqs)
        with timed(seconds, "generate"):
            report = job.run(works, prompt=load_prompt("gvm_generate"),
                             parse=lambda text: parse_generation(text, n_items),
                             table="gvm_chains",
                             row=lambda o: chain_columns(FREE, o.work.data, o.value))
        if report.dry_run:
            return None
        run_id = job.run_id
        if report.not_done:
            console.print(f"[yellow]generation stopped early ({report.stopped}); "
                          f"{report.not_done:,} answers missing, nothing mined[/]: re-run the "
                          "same command to finish (answers so far are cached)")
            return run_id
        counts = _validate_and_mine(wh, job, dataset, seqs=len(seqs), encoder=encoder,
                                    prune_threshold=prune_threshold, prune_scope=prune_scope,
                                    cluster=cluster, k_min=k_min, k_max=k_max,
                                    min_cluster_size=min_cluster_size, exemplars=exemplars,
                                    seed=sample_seed, seconds=seconds)
    with wh.write() as con:
        con.execute("update job_runs set counts = json_merge_patch(counts, ?) where run_id = ?",
                    [json.dumps({"gvm": counts}, default=str), run_id])
    _summary(wh, run_id, report, job.totals, counts)
    return run_id


def _validate_and_mine(wh: Warehouse, job: TeacherJob, dataset: str, *, seqs: int,
                       encoder: str | None, prune_threshold: float, prune_scope: str,
                       cluster: str, k_min: int, k_max: int, min_cluster_size: int,
                       exemplars: int, seed: int, seconds: dict[str, float]) -> dict[str, Any]:
    from factory.gvm.parse import parse_best_path
    from factory.gvm.phases import (
        FREE,
        Catalog,
        mine_run,
        prune_run,
        record_template,
        validate_run,
    )
    from factory.teacher import Work, load_prompt

    run_id = job.run_id
    embedder, encode = encoder_for(wh, encoder, "gvm embeddings")
    with timed(seconds, "prune"):
        pruning = prune_run(wh, run_id, encode, prune_threshold, prune_scope)
    catalogue = Catalog(wh, dataset, encode)   # embedded only if a description needs it
    with timed(seconds, "validate"):
        validated = validate_run(wh, run_id, [FREE], encode, catalogue)
    if catalogue.seconds is not None:          # report the catalogue apart from the mapping
        mapping = max(seconds.pop("validate") - catalogue.seconds, 0.0)
        seconds.update(catalog=round(catalogue.seconds, 3), validate=round(mapping, 3))
    with timed(seconds, "mine"):
        mined = mine_run(wh, run_id, dataset, encode, method=cluster, k_min=k_min,
                         k_max=k_max, min_cluster_size=min_cluster_size,
                         n_exemplars=exemplars, seed=seed)
    best, template, error = mined.choice.best, None, None
    if best is None:
        error = mined.verdict
    else:
        work = Work(id=f"cluster-{best.cluster}", vars={
            "cluster": best.cluster, "rank": 1, "n_clusters": len(mined.stats),
            "recall": best.quality, "exemplars": mined.exemplars})
        with timed(seconds, "abstract"):
            job.run([work], prompt=load_prompt("gvm_mine"), parse=parse_best_path,
                    table="gvm_abstractions",
                    row=lambda o: {"cluster": best.cluster, "exemplars": mined.exemplars,
                                   "steps": o.value})
        with wh.read() as con:
            answer = con.execute("select steps, error from gvm_abstractions where run_id = ?"
                                 " and cluster = ?", [run_id, best.cluster]).fetchone()
        if answer is not None and answer[0]:
            description = (f"Mined by GVM on {dataset}: cluster {best.cluster} of "
                           f"{len(mined.stats)}; {mined.verdict}")
            template = record_template(wh, run_id, dataset, answer[0], None, description)
        else:
            error = ("the teacher gave no usable Fig. 10 answer: "
                     f"{answer[1] if answer else 'the run stopped before asking'}")
    if template is None:
        record_template(wh, run_id, dataset, None, error, "")
    return {"sequences": seqs, **pruning, "prune_scope": prune_scope, **validated,
            "clusters": len(mined.stats),
            "k": mined.clustering.k, "chosen_cluster": best.cluster if best else None,
            "verdict": mined.verdict, "template": template, "no_template": error,
            "embeddings": vars(embedder.stats), "seconds": seconds}


def _summary(wh: Warehouse, run_id: str, report: Any, totals: Any,
             counts: dict[str, Any]) -> None:
    """`report`: the Generate round; `totals`: every round of the job (cost)."""
    from factory.console import summary
    from factory.verdicts import truncated_note

    rows: dict[str, Any] = {
        "sequences": counts["sequences"],
        "answers": f"{report.ok:,} parsed, {report.failed - report.truncated:,} failed, "
                   f"{report.truncated:,} truncated, {report.cached:,} from cache, "
                   f"{report.requests:,} requests sent",
        "paths": f"{counts['kept']:,} kept, {counts['pruned']:,} near-duplicates pruned "
                 + ("(per user)" if counts.get("prune_scope") == "user" else "(across all paths)"),
        "Recall@20 (all kept chains)": f"{counts['hits']:,} hits / {counts['chains']:,}",
        "clusters": f"{counts['clusters']} (k={counts['k']})",
        "verdict": counts["verdict"],
    }
    if totals.truncated:      # Generate and the abstraction: never kept, never redrawn
        rows["truncated (not kept)"] = truncated_note(totals.truncated)
    if counts["template"]:
        with wh.read() as con:
            (steps,) = con.execute("select steps from templates where name = ?",
                                   [counts["template"]]).fetchone()
        rows["template"] = f"{counts['template']}: {' -> '.join(steps)}"
    else:
        rows["template"] = f"none ({counts['no_template']})"
    emb = counts["embeddings"]
    rows["embeddings"] = (f"{emb['seen']:,} texts seen, {emb['unique']:,} distinct, "
                          f"{emb['cache_hits']:,} cached, {emb['encoded']:,} encoded")
    rows["seconds"] = ", ".join(f"{k} {v:.1f}" for k, v in counts["seconds"].items())
    rows["cost"] = totals.rows()["cost"]
    rows["run"] = run_id
    summary("gvm finished", rows,
            f"select cluster, n, quality, ci_low, ci_high from gvm_clusters "
            f"where run_id = '{run_id}' order by quality desc")


def register(app: typer.Typer) -> None:
    from jobs import gvm_compare

    app.add_typer(gvm_app, name="gvm")
    gvm_compare.register(gvm_app)


RunOpt = typer.Option(None, "--run", help="A gvm run id, a unique prefix of one, or latest "
                      "[default: the dataset's latest finished].")
EncoderOpt = typer.Option(None, "--encoder", help="sentence-transformers model path or name "
                          "[default: the embedded all-MiniLM-L6-v2].")


@gvm_app.callback(invoke_without_command=True)
@teacher_options
def gvm_cmd(
    ctx: typer.Context,
    dataset: str = typer.Option(None, "--dataset", help="Dataset to mine, as `factory "
                                "datasets` lists it (required unless a subcommand is given)."),
    split: str = typer.Option("loo", "--split", help="Histories from its train part, scores "
                              "from its valid part."),
    users: int = typer.Option(2000, "--users", min=1, help="Users sampled (seeded)."),
    samples: int = typer.Option(4, "--answers-per-user", min=1, help="Teacher answers per "
                                "user."),
    n_items: int = typer.Option(20, "--items", min=1, help="Recommendations asked (Recall@N)."),
    max_history: int = typer.Option(20, "--history", min=1,
                                    help="Most recent training items shown."),
    prune_threshold: float = typer.Option(0.85, "--prune-threshold", min=0.0, max=1.0,
                                          help="Cosine at which a path is a near-duplicate."),
    prune_scope: str = typer.Option("global", "--prune-scope", help="global: across all "
                                    "paths of the run (SCoTER Alg. 1 line 10 prunes C_all); "
                                    "user: only among one user's samples."),
    cluster: str = typer.Option("kmeans", "--cluster", help="kmeans (k by silhouette) or "
                                "hdbscan."),
    k_min: int = typer.Option(2, "--k-min", min=2),
    k_max: int = typer.Option(10, "--k-max", min=2),
    min_cluster_size: int = typer.Option(20, "--min-cluster-size", min=1, help="Smallest "
                                         "cluster that may become the pattern."),
    exemplars: int = typer.Option(10, "--exemplars", min=1, help="Paths nearest the "
                                  "centroid shown to the teacher (SCoTER: N = 10)."),
    encoder: str = EncoderOpt,
    sample_seed: int = typer.Option(0, "--sample-seed", help="Seed of the user sample and "
                                    "of k-means (--seed is the teacher's sampling seed)."),
    *,
    teacher: TeacherOptions,
) -> None:
    """Generate, validate and mine reasoning paths; abstract the dataset's template."""
    if ctx.invoked_subcommand is not None:
        return
    if dataset is None:
        raise FactoryError("--dataset is required (or use a subcommand: show, plot, compare, "
                           "transfer, templates)")
    if cluster not in ("kmeans", "hdbscan"):
        raise FactoryError("--cluster must be kmeans or hdbscan")
    if k_min > k_max:
        raise FactoryError(f"--k-min {k_min} is larger than --k-max {k_max}")
    if teacher.sampling.seed is not None and teacher.sampling.seed != sample_seed:
        from factory.console import console

        # --seed used to draw the users too: an old script would now get other users silently
        console.print(f"note: --seed {teacher.sampling.seed} is the teacher's sampling seed; "
                      f"the users are drawn with --sample-seed {sample_seed}", soft_wrap=True)
    from factory.cli import warehouse

    run_gvm(warehouse(), dataset, teacher=teacher, split=split, users=users, samples=samples,
            n_items=n_items, max_history=max_history, prune_threshold=prune_threshold,
            prune_scope=prune_scope, cluster=cluster, k_min=k_min, k_max=k_max,
            min_cluster_size=min_cluster_size, exemplars=exemplars, encoder=encoder,
            sample_seed=sample_seed)


@gvm_app.command("show")
def show_cmd(dataset: str = DatasetOpt, run: str = RunOpt,
             paths: int = typer.Option(3, "--paths", min=1,
                                       help="Representative paths per cluster.")) -> None:
    """Clusters (size, quality, 95% CI, representative paths), the verdict and the template."""
    from factory.cli import stdout_console, warehouse
    from factory.gvm.report import resolve_run, show

    with warehouse(reader=True).read() as con:
        show(con, resolve_run(con, dataset, run), stdout_console(), paths)


@gvm_app.command("plot")
def plot_cmd(dataset: str = DatasetOpt,
             out: Path = typer.Option(None, "--out", help="PNG file to write [default: "
                                      "<warehouse>.files/plots/<run>.png]."),
             run: str = RunOpt,
             projection: str = typer.Option("pca", "--projection", help="pca or tsne."),
             encoder: str = EncoderOpt) -> None:
    """A 2-D map of the run's path embeddings, coloured by cluster quality."""
    from factory.cli import warehouse
    from factory.console import summary
    from factory.gvm.report import plot, resolve_run

    wh = warehouse(reader=True)
    with wh.read() as con:
        run_id = resolve_run(con, dataset, run)
        params = json.loads(con.execute("select params from job_runs where run_id = ?",
                                        [run_id]).fetchone()[0])
    if out is None:
        from factory.step_cache import files_dir

        out = files_dir(wh.path) / "plots" / f"{run_id}.png"
    chosen = encoder or (None if params.get("encoder") == "default" else params.get("encoder"))
    _, encode = encoder_for(wh, chosen, "path embeddings", read_only=True)   # a reader
    seed = params.get("sample_seed", params.get("seed", 0))   # older runs: one seed
    n = plot(wh, run_id, encode, out, projection, seed)
    summary(f"wrote {out}", {"paths": n, "projection": projection, "run": run_id})


@gvm_app.command("templates")
def templates_cmd() -> None:
    """Every named template: App. F manual ones, the paper's mined ones, discovered ones."""
    from rich.table import Table

    from factory.cli import stdout_console, warehouse
    from factory.templates import list_templates

    with warehouse(reader=True).read() as con:
        found = list_templates(con)
    table = Table("name", "kind", "dataset", "steps", "source")
    for t in found:
        table.add_row(t.name, t.kind, t.dataset or "-", t.path, t.source)
    stdout_console().print(table)
