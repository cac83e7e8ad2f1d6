"""GVM phases over a real warehouse (ml-100k): sequences, answers, prune, validate, mine.

The encoder here is a deterministic bag-of-words hash so that the phase logic is tested fast
and exactly; the real sentence encoder runs in tests/test_gvm_job.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pytest

from factory.errors import FactoryError
from factory.gvm.parse import Generation
from factory.gvm.phases import (
    FREE,
    Catalog,
    chain_columns,
    insert_rows,
    mine_run,
    prune_run,
    record_template,
    store_sequences,
    validate_run,
)
from factory.gvm.sequences import item_info, item_text, sample_sequences
from factory.templates import get_template
from factory.warehouse import Warehouse


def bow(texts: Sequence[str], dim: int = 512) -> np.ndarray:
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % dim] += 1
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms == 0, 1, norms)


def test_sequences_use_train_history_and_validation_target(ml100k: Warehouse) -> None:
    with ml100k.read() as con:
        seqs = sample_sequences(con, "ml-100k", "loo", 20, seed=3, max_history=5)
        assert [s.user_id for s in sample_sequences(con, "ml-100k", "loo", 5, seed=3)] == \
            [s.user_id for s in seqs[:5]]
        assert [s.user_id for s in sample_sequences(con, "ml-100k", "loo", 5, seed=4)] != \
            [s.user_id for s in seqs[:5]]
        for s in seqs:
            parts = dict(con.execute(
                "select part, list(item_id order by position) from split_interactions"
                " where dataset = 'ml-100k' and split = 'loo' and user_id = ? group by part",
                [s.user_id]).fetchall())
            assert s.history == parts["train"][-5:]
            assert [s.target] == parts["valid"]
            assert parts["test"][0] not in s.history
        with pytest.raises(FactoryError, match="unknown split"):
            sample_sequences(con, "ml-100k", "nope", 5, seed=0)


Answer = tuple[str, int, "Generation | None", "str | None"]  # user, sample, parsed, error


def store_answers(wh: Warehouse, run_id: str, template: str, answers: list[Answer]) -> None:
    """Chains as the teacher engine would store them (provenance columns filled in)."""
    rows = [{**chain_columns(template, user, g), "run_id": run_id, "sample": sample,
             "work_key": f"{user}/{sample}", "call_key": f"call-{user}-{sample}",
             "status": "ok" if g else "failed", "error": error}
            for user, sample, g, error in answers]
    with wh.write() as con:
        insert_rows(con, "gvm_chains", rows)


def make_answers(ml100k: Warehouse, run_id: str, n_users: int = 40) -> dict[str, str]:
    """Two path styles: 'genre' paths recommend the validation item for half the users,
    'mood' paths recommend the user's *test* item, which must never count as a hit."""
    with ml100k.read() as con:
        seqs = sample_sequences(con, "ml-100k", "loo", n_users, seed=0)
        tests = dict(con.execute(
            "select user_id, item_id from split_interactions where dataset = 'ml-100k'"
            " and split = 'loo' and part = 'test'").fetchall())
        info = item_info(con, "ml-100k")
    store_sequences(ml100k, run_id, "ml-100k", "loo", seqs)
    answers = []
    for n, s in enumerate(seqs):
        filler = [item_text(info[i]) for i in sorted(info)[:21]
                  if i not in (s.target, tests[s.user_id])][:19]
        hit = [item_text(info[s.target])] if n % 2 == 0 else []
        genre = Generation("Map genres -> Rank classics", ["Map genres", "Rank classics"],
                           "why", hit + filler[: 20 - len(hit)])
        answers.append((s.user_id, 0, genre, None))
        leak = [item_text(info[tests[s.user_id]])]
        mood = Generation(f"Sense mood swings of viewer {n} -> Suggest calm films",
                          [f"Sense mood swings of viewer {n}", "Suggest calm films"],
                          "why", leak + filler[:19])
        answers.append((s.user_id, 1, mood, None))
        # a near-copy of sample 0, pruned per user
        answers.append((s.user_id, 2, genre, None))
        answers.append((s.user_id, 3, None, "no recommended items"))
    store_answers(ml100k, run_id, FREE, answers)
    return {s.user_id: s.target for s in seqs}


def test_prune_validate_mine_and_template(ml100k: Warehouse) -> None:
    run = "gvm-test-1"
    make_answers(ml100k, run)
    assert prune_run(ml100k, run, bow, 0.85, "user") == {"kept": 80, "pruned": 40}
    items = Catalog(ml100k, "ml-100k", bow)
    counts = validate_run(ml100k, run, [FREE], bow, items)
    assert counts["chains"] == 80 and counts["hits"] == 20
    mined = mine_run(ml100k, run, "ml-100k", bow, method="kmeans", k_min=2, k_max=4,
                     min_cluster_size=10, n_exemplars=3, seed=0)
    assert mined.choice.best is not None and mined.choice.best.quality == 0.5
    assert mined.exemplars == ["Map genres -> Rank classics"]
    with ml100k.read() as con:
        status = dict(con.execute("select status || pruned, count(*) from gvm_chains"
                                  " where run_id = ? group by 1", [run]).fetchall())
        assert status == {"okfalse": 80, "oktrue": 40, "failedfalse": 40}
        assert con.execute(
            "select error from gvm_chains where run_id = ? and status = 'failed' limit 1",
            [run]).fetchone()[0] == "no recommended items"
        # mood paths recommended the test item: never a hit
        assert con.execute("select sum(score) from gvm_chains where run_id = ? and"
                           " sample = 1", [run]).fetchone()[0] == 0
        hits = con.execute(
            "select count(*) from gvm_recommendations r join gvm_sequences s"
            " using (run_id, user_id) where r.run_id = ? and r.item_id = s.target",
            [run]).fetchone()[0]
        assert hits == 20
        chosen = con.execute("select cluster, n, quality from gvm_clusters where run_id = ?"
                             " and chosen", [run]).fetchall()
        assert len(chosen) == 1 and chosen[0][1:] == (40, 0.5)
        assert con.execute("select count(distinct cluster) from gvm_chains where run_id = ?"
                           " and status = 'ok' and not pruned",
                           [run]).fetchone()[0] == mined.clustering.k
    name = record_template(ml100k, run, "ml-100k",
                           ["Map genres", "Rank classics", "Item Recommendation"], None, "d")
    with ml100k.read() as con:
        t = get_template(con, "discovered", dataset="ml-100k")
        assert t.name == name == run and t.steps[-1] == "Item Recommendation"
        assert con.execute("select template, error from gvm_patterns where run_id = ?",
                           [run]).fetchone() == (run, None)


def test_global_pruning_crosses_users(ml100k: Warehouse) -> None:
    run = "gvm-test-2"
    make_answers(ml100k, run, n_users=10)
    counts = prune_run(ml100k, run, bow, 0.85, "global")
    # across users one genre path and one mood path (they differ by a number) survive
    assert counts == {"kept": 2, "pruned": 28}
    with ml100k.read() as con:
        row = con.execute("select duplicate_user, duplicate_cos from gvm_chains where"
                          " run_id = ? and pruned and sample = 0 limit 1",
                          [run]).fetchone()
        assert row[0] is not None and row[1] >= 0.85


def test_rerun_of_a_phase_is_idempotent(ml100k: Warehouse) -> None:
    run = "gvm-test-3"
    make_answers(ml100k, run, n_users=12)
    items = Catalog(ml100k, "ml-100k", bow)
    for _ in range(2):
        prune_run(ml100k, run, bow, 0.85, "user")
        validate_run(ml100k, run, [FREE], bow, items)
        mine_run(ml100k, run, "ml-100k", bow, method="kmeans", k_min=2, k_max=3,
                 min_cluster_size=100, n_exemplars=2, seed=0)
    with ml100k.read() as con:
        assert con.execute("select count(*) from gvm_recommendations where run_id = ?",
                           [run]).fetchone()[0] == con.execute(
            "select sum(len(items)) from gvm_chains where run_id = ? and status = 'ok'"
            " and not pruned",
            [run]).fetchone()[0] > 0
        verdict = con.execute("select verdict, chosen_cluster from gvm_patterns where"
                              " run_id = ?", [run]).fetchall()
    assert len(verdict) == 1 and verdict[0][1] is None and "minimum 100" in verdict[0][0]


def test_templates_by_name(ml100k: Warehouse) -> None:
    with ml100k.read() as con:
        assert get_template(con, "two-step").steps == (
            "User Interest Mining", "Item Tag Prediction & Recommendation")
        assert len(get_template(con, "five-step").steps) == 5
        assert get_template(con, "paper-sports").path.startswith("Purchase pattern recognition")
        with pytest.raises(FactoryError, match="unknown template 'four-step'"):
            get_template(con, "four-step")
        with pytest.raises(FactoryError, match="no discovered template"):
            get_template(con, "discovered", dataset="ml-100k")
        with pytest.raises(FactoryError, match="needs a dataset"):
            get_template(con, "discovered")


def test_evaluate_templates_counts_failures_as_misses(ml100k: Warehouse) -> None:
    from factory.gvm.phases import evaluate_templates

    run = "gvm-compare-test"
    with ml100k.read() as con:
        seqs = sample_sequences(con, "ml-100k", "loo", 10, seed=1)
        info = item_info(con, "ml-100k")
    store_sequences(ml100k, run, "ml-100k", "loo", seqs)
    good, bad = [], []
    for n, s in enumerate(seqs):
        items = [item_text(info[s.target])] if n < 4 else [item_text(info["1"])]
        g = Generation("A -> B", ["A", "B"], None, items)
        good.append((s.user_id, 0, g, None) if n < 8 else (s.user_id, 0, None, "no <cot_path>"))
        bad.append((s.user_id, 0, Generation("A -> B", ["A", "B"], None,
                                             [item_text(info["1"])]), None))
    store_answers(ml100k, run, "two-step", good)
    store_answers(ml100k, run, "five-step", bad)
    items = Catalog(ml100k, "ml-100k", bow)
    validate_run(ml100k, run, ["two-step", "five-step"], bow, items)
    evals = evaluate_templates(ml100k, run, "ml-100k", {
        "two-step": (["A", "B"], None), "five-step": (["A", "B"], None)}, samples=1)
    two, five = evals
    assert (two.users, two.answered, two.recall) == (10, 8, 0.4)
    assert two.ndcg == pytest.approx(0.4)  # every hit was ranked first
    assert five.recall == 0.0 and five.ci_low == 0.0 and five.ci_high > 0
    with ml100k.read() as con:
        assert con.execute("select count(*) from gvm_evals where run_id = ?",
                           [run]).fetchone()[0] == 2


def test_show_and_plot(ml100k: Warehouse, tmp_path) -> None:
    import io

    from rich.console import Console

    from factory.gvm.report import plot, resolve_run, show
    from factory.runs import finish_run, start_run

    with ml100k.write() as con:
        run = start_run(con, "gvm", "ml-100k", {"dataset": "ml-100k", "users": 40,
                                                "samples": 4, "split": "loo", "seed": 0})
    make_answers(ml100k, run)
    prune_run(ml100k, run, bow, 0.85, "user")
    items = Catalog(ml100k, "ml-100k", bow)
    validate_run(ml100k, run, [FREE], bow, items)
    mine_run(ml100k, run, "ml-100k", bow, method="kmeans", k_min=2, k_max=4,
             min_cluster_size=10, n_exemplars=3, seed=0)
    with ml100k.write() as con:
        finish_run(con, run, "succeeded")            # show without --run: the latest finished
    buffer = io.StringIO()
    with ml100k.read() as con:
        assert resolve_run(con, "ml-100k", None) == run
        with pytest.raises(FactoryError, match="no gvm run 'x'"):
            resolve_run(con, "ml-100k", "x")
        show(con, run, Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert "P*" in text and "Map genres -> Rank classics" in text
    assert "failed 40x: no recommended items" in text and "chosen" in text
    assert plot(ml100k, run, bow, tmp_path / "map.png") == 80
    assert (tmp_path / "map.png").stat().st_size > 1000
    with pytest.raises(FactoryError, match="unknown projection"):
        plot(ml100k, run, bow, tmp_path / "x.png", method="umap")


def test_transfer_change_never_shows_minus_zero() -> None:
    from jobs.gvm_compare import relative_change

    assert relative_change(0.1, 0.1 - 1e-12) == "0.00%"
    assert relative_change(0.2, 0.2) == "0.00%"
    assert relative_change(0.2, 0.25) == "+25.00%"
    assert relative_change(0.2, 0.1) == "-50.00%"
    assert relative_change(0.0, 0.1) == "n/a (native is 0)"


def test_the_map_names_clusters_beside_the_points_in_their_colour_bar_colours() -> None:
    """No label drawn over the points (they hid points under white boxes), one legend entry
    per cluster, every point opaque in its quality's colour-bar colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from factory.gvm.mine import NOISE
    from factory.gvm.report import draw_map

    rng = np.random.default_rng(0)
    xy = rng.normal(size=(30, 2))
    labels = np.array([0] * 10 + [1] * 10 + [NOISE] * 10)
    quality = np.array([0.8] * 10 + [0.1] * 10 + [np.nan] * 10)
    fig = draw_map(xy, labels, quality, {0}, "title")
    ax = fig.axes[0]
    assert not ax.texts
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert names == ["noise", "cluster 0 (P*): n=10, Recall@20 0.80",
                     "cluster 1: n=10, Recall@20 0.10"]
    cmap, vmax = plt.get_cmap("viridis"), 0.8
    for points, q in zip(ax.collections[1:], (0.8, 0.1), strict=True):
        assert np.allclose(points.get_facecolors()[0], to_rgba(cmap(q / vmax)))
    plt.close(fig)
