"""What a GVM run found, for people: `factory gvm show` (tables) and `factory gvm plot` (a map)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from factory.errors import FactoryError
from factory.gvm.mine import NOISE
from factory.gvm.phases import FREE, Encode
from factory.warehouse import Warehouse, require_dataset


def resolve_run(con: duckdb.DuckDBPyConnection, dataset: str, run_id: str | None,
                job: str = "gvm") -> str:
    """`run_id` (a whole id, a unique prefix, or 'latest') checked against the dataset; by
    default the dataset's latest succeeded run of `job` (never one still running, killed or
    failed: that one has not been mined)."""
    from factory.runs import resolve_run as resolve

    require_dataset(con, dataset)
    return resolve(con, job, dataset, run_id, first=f"factory gvm --dataset {dataset}")


def show(con: duckdb.DuckDBPyConnection, run_id: str, out: Any, exemplars: int = 3) -> None:
    """Print a run's chains, clusters (size, quality, interval, paths), verdict and template."""
    from rich.table import Table

    from factory.runs import liveness

    status, params, backend, model = con.execute(
        "select status, params, backend, model from job_runs where run_id = ?",
        [run_id]).fetchone()
    status = next((r.state for r in liveness(con, "run_id = ?", [run_id])), status)
    p = json.loads(params)
    sample_seed = p.get("sample_seed", p["seed"])   # runs before --sample-seed: one seed
    out.print(f"[bold]{run_id}[/] ({status}): {p['users']} users x {p['samples']} answers "
              f"of {p['dataset']} (split {p['split']}, sample seed {sample_seed}), teacher "
              f"{backend} {model}")
    tally = con.execute(
        "select case when status <> 'ok' then status when pruned then 'pruned'"
        " else 'kept' end, count(*), count(distinct user_id), avg(score), sum(score)"
        " from gvm_chains where run_id = ? and template = ? group by 1 order by 1",
        [run_id, FREE]).fetchall()
    table = Table("chains", "count", "users", "Recall@20", "hits", title="Generate / Validate")
    for st, n, users, recall, hits in tally:
        table.add_row(st, f"{n:,}", f"{users:,}", "-" if recall is None else f"{recall:.4f}",
                      "-" if hits is None else f"{int(hits):,}")
    out.print(table)
    reasons = con.execute(
        "select status, error, count(*) from gvm_chains where run_id = ? and status <> 'ok'"
        " group by all order by 3 desc limit 5", [run_id]).fetchall()
    for status, reason, n in reasons:     # failed, or truncated (never kept)
        out.print(f"  {status} {n:,}x: {reason}")
    clusters = con.execute(
        "select cluster, n, hits, quality, ci_low, ci_high, eligible, chosen, exemplars"
        " from gvm_clusters where run_id = ? order by eligible desc, quality desc, n desc",
        [run_id]).fetchall()
    table = Table("cluster", "paths", "hits", "quality (R@20)", "95% CI", "eligible", "chosen",
                  "representative paths", title="Mine: clusters")
    for c, n, hits, q, lo, hi, eligible, chosen, ex in clusters:
        table.add_row(str(c), f"{n:,}", f"{hits:,}", f"{q:.4f}", f"{lo:.4f}-{hi:.4f}",
                      "yes" if eligible else "no", "P*" if chosen else "",
                      "\n".join((ex or [])[:exemplars]))
    out.print(table)
    pattern = con.execute(
        "select method, k, n_paths, min_cluster_size, verdict, template, error"
        " from gvm_patterns where run_id = ?", [run_id]).fetchone()
    if pattern is None:
        out.print("not mined yet")
        return
    method, k, n_paths, min_size, verdict, template, error = pattern
    out.print(f"{method}, k={k}, {n_paths:,} paths, minimum cluster size {min_size}")
    out.print(f"verdict: {verdict}")
    if template:
        steps = con.execute("select steps from templates where name = ?", [template]).fetchone()
        out.print(f"template [bold]{template}[/]: {' -> '.join(steps[0])}")
    else:
        out.print(f"no template: {error or 'no pattern was chosen'}")


def plot(wh: Warehouse, run_id: str, encode: Encode, out: Path, method: str = "pca",
         seed: int = 0) -> int:
    """A 2-D map (PCA or t-SNE) of the run's kept paths, coloured by their cluster's quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with wh.read() as con:
        rows = con.execute(
            "select c.cot_path, c.cluster, k.quality, k.chosen from gvm_chains c"
            " left join gvm_clusters k on k.run_id = c.run_id and k.cluster = c.cluster"
            " where c.run_id = ? and c.template = ? and c.status = 'ok' and not c.pruned"
            " and c.cluster is not null order by c.user_id, c.sample",
            [run_id, FREE]).fetchall()
        dataset = con.execute("select dataset from job_runs where run_id = ?",
                              [run_id]).fetchone()[0]
    if len(rows) < 3:
        raise FactoryError(f"run {run_id} has {len(rows)} clustered path(s); nothing to map")
    vectors = encode([r[0] for r in rows])
    if method == "tsne":
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, random_state=seed,
                  perplexity=min(30.0, (len(rows) - 1) / 3)).fit_transform(vectors)
    elif method == "pca":
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, random_state=seed).fit_transform(vectors)
    else:
        raise FactoryError(f"unknown projection {method!r} (pca or tsne)")
    labels = np.array([r[1] for r in rows])
    quality = np.array([np.nan if r[2] is None else r[2] for r in rows], dtype=float)
    chosen = {r[1] for r in rows if r[3]}
    fig = draw_map(xy, labels, quality, chosen,
                   f"GVM reasoning paths, {dataset}, run {run_id} ({method.upper()})")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return len(rows)


#: one marker per cluster, so clusters of similar quality stay apart
MARKERS = "os^Dv<>pP*hX"


def draw_map(xy: np.ndarray, labels: np.ndarray, quality: np.ndarray, chosen: set[int],
             title: str) -> Any:
    """The 2-D map. Cluster names go in a legend below the axes, never over the points
    (labels at centroids hid points under white boxes and were clipped at the edges); each
    point is opaque in exactly its colour-bar colour."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    fig, ax = plt.subplots(figsize=(8, 6.5))
    scored = quality[~np.isnan(quality)]
    norm = Normalize(vmin=0, vmax=max(float(scored.max()), 1e-9) if scored.size else 1)
    cmap = plt.get_cmap("viridis")
    noise = labels == NOISE
    if noise.any():
        ax.scatter(xy[noise, 0], xy[noise, 1], s=8, c="lightgrey", label="noise")
    for k, c in enumerate(sorted(set(labels.tolist()) - {NOISE})):
        member = labels == c
        q = float(quality[member][0])
        colour = "lightgrey" if np.isnan(q) else cmap(norm(q))
        name = f"cluster {c}{' (P*)' if c in chosen else ''}: n={int(member.sum())}" + (
            "" if np.isnan(q) else f", Recall@20 {q:.2f}")
        ax.scatter(xy[member, 0], xy[member, 1], s=16, color=colour, alpha=1.0,
                   marker=MARKERS[k % len(MARKERS)], linewidths=0.3, edgecolors="black",
                   label=name)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax,
                 label="cluster quality (Recall@20)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=8,
              frameon=False)
    ax.set_title(title, fontsize=10, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig
