"""`factory user-groups`: ThinkRec user groups, expert representations and gate (sec. 3.3).

Features: truncated SVD of the binary user x item matrix of the split's train part (see
factory.usergroups). Users who have no training interaction get no features and no group;
they are counted, not guessed.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from factory.console import console, summary
from factory.errors import FactoryError
from factory.vocabulary import DatasetOpt

METHOD = "truncated SVD of the binary train interaction matrix (user factors U*Sigma)"


def register(app: typer.Typer) -> None:
    app.command("user-groups")(user_groups_cmd)


def user_groups_cmd(
    dataset: str = DatasetOpt,
    groups: int = typer.Option(2, "--groups", min=2, help="Number of groups / base experts N."),
    split: str = typer.Option(None, "--split", help="Features learn from its train part "
                              "[default: thinkrec where the dataset has ThinkRec's protocol "
                              "(ML-1M), else loo]."),
    dim: int = typer.Option(64, "--dim", min=1, help="Latent feature dimension."),
    tau: float = typer.Option(0.1, "--tau", min=1e-6, help="Softmax temperature (eq. 8)."),
    seed: int = typer.Option(0, "--seed"),
    name: str = typer.Option(None, "--name", help="Grouping name [default: <split>-g<N>]."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite a grouping of this name."),
) -> None:
    """Group users by collaborative features; store participation weights and the gate."""
    from factory.cli import warehouse

    result = run_user_groups(warehouse(), dataset, groups=groups, split=split, dim=dim,
                             tau=tau, seed=seed, name=name, replace=replace)
    summary(
        f"user groups {result['name']} of {dataset}",
        {"users": result["users"], "users without train interactions": result["cold_users"],
         "explained variance": result["explained_variance"],
         "users per group": ", ".join(f"{g}: {n:,}" for g, n in result["per_group"].items()),
         "gate": ", ".join(f"{k} {v:,}" for k, v in result["gate"].items()),
         "run": result["run_id"]},
        f"select gate, group_id, count(*) from user_groups where dataset = '{dataset}'"
        f" and grouping = '{result['name']}' group by all order by all",
    )


def run_user_groups(wh: Any, dataset: str, *, groups: int, split: str | None = None,
                    dim: int = 64,
                    tau: float = 0.1, seed: int = 0, name: str | None = None,
                    replace: bool = False) -> dict[str, Any]:
    """Compute and store one grouping; returns the summary counts."""
    import numpy as np

    from factory.runs import finish_run, start_run
    from factory.splits import thinkrec_split
    from factory.usergroups import group_users, svd_user_features
    from factory.warehouse import require_dataset, require_split

    with wh.write() as con:
        require_dataset(con, dataset)
        split, chosen = thinkrec_split(con, dataset, split)
        if chosen:
            console.print(chosen)
        require_split(con, dataset, split)
        name = name or f"{split}-g{groups}"
        params = {"groups": groups, "split": split, "dim": dim, "tau": tau, "seed": seed,
                  "name": name, "method": METHOD}
        if con.execute("select 1 from user_groupings where dataset = ? and name = ?",
                       [dataset, name]).fetchone() and not replace:
            raise FactoryError(f"grouping {name!r} of {dataset!r} exists; pass --replace "
                               "to rebuild it")
        run_id = start_run(con, "user-groups", dataset, params)
    try:
        with wh.read() as con:
            train = con.execute(
                "select user_id, dense_rank() over (order by user_id) - 1 as u,"
                " dense_rank() over (order by item_id) - 1 as i"
                " from (select distinct user_id, item_id from split_interactions"
                "       where dataset = ? and split = ? and part = 'train')"
                " order by u, i", [dataset, split]).fetchnumpy()
            all_users = con.execute(
                "select count(distinct user_id) from split_interactions"
                " where dataset = ? and split = ?", [dataset, split]).fetchone()[0]
        if not len(train["u"]):
            raise FactoryError(f"split {split!r} of {dataset!r} has no training interactions")
        uidx = np.asarray(train["u"], dtype=np.int64)
        iidx = np.asarray(train["i"], dtype=np.int64)
        n_users, n_items = int(uidx.max()) + 1, int(iidx.max()) + 1
        if groups > n_users:
            raise FactoryError(f"--groups {groups} is more than the {n_users} users with "
                               "training interactions")
        if dim >= min(n_users, n_items):
            raise FactoryError(f"--dim {dim} must be below min(users, items) = "
                               f"{min(n_users, n_items)} for a truncated SVD")
        user_ids = [None] * n_users
        for u, k in zip(train["user_id"], uidx, strict=True):
            user_ids[k] = str(u)
        with console.status(f"SVD of {n_users:,} x {n_items:,} train matrix"):
            factors, explained = svd_user_features(uidx, iidx, n_users, n_items, dim, seed)
            g = group_users(factors, groups, tau=tau, seed=seed)
        per_group = {int(k): int((g.groups == k).sum()) for k in range(groups)}
        gate_counts = {d: g.gate.count(d) for d in ("global", "single", "fused")}
        counts = {"users": n_users, "cold_users": all_users - n_users,
                  "per_group": per_group, "gate": gate_counts}
        top = g.weights.argmax(axis=1)
        import pyarrow as pa

        rows = pa.table({
            "dataset": [dataset] * n_users, "grouping": [name] * n_users, "user_id": user_ids,
            "group_id": g.groups.astype(np.int32),
            "weights": list(g.weights.astype(np.float64)),
            "entropy": g.entropy.astype(np.float64),
            "max_weight": g.weights.max(axis=1).astype(np.float64),
            "gate": g.gate,
            "expert": [int(t) if d == "single" else None for t, d in zip(top, g.gate, strict=True)],
            "feature": list(g.features.astype(np.float32)),
        })
        with wh.write() as con:
            for table, key in (("user_groups", "grouping"), ("user_group_experts", "grouping"),
                               ("user_groupings", "name")):
                con.execute(f"delete from {table} where dataset = ? and {key} = ?",
                            [dataset, name])
            con.register("new_rows", rows)
            con.execute("insert into user_groups by name select * from new_rows")
            con.unregister("new_rows")
            con.executemany(
                "insert into user_group_experts values (?, ?, ?, ?, ?)",
                [[dataset, name, k, per_group[k], g.experts[k].astype(float).tolist()]
                 for k in range(groups)])
            con.execute(
                "insert into user_groupings (dataset, name, split, method, dim, n_groups, tau,"
                " seed, explained_variance, counts, run_id) values (?,?,?,?,?,?,?,?,?,?,?)",
                [dataset, name, split, METHOD, dim, groups, tau, seed, explained,
                 json.dumps(counts), run_id])
            finish_run(con, run_id, "succeeded", counts)
    except BaseException as exc:
        with wh.write() as con:
            finish_run(con, run_id, "interrupted" if isinstance(exc, KeyboardInterrupt)
                       else "failed", error=str(exc) or type(exc).__name__)
        raise
    return {"name": name, "run_id": run_id, "explained_variance": explained, **counts}
