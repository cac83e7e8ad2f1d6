"""ThinkRec user groups (sec. 3.3): features from train only, k-means, participation, gate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from factory.errors import FactoryError
from factory.usergroups import gate, participation
from factory.warehouse import Warehouse
from jobs.user_groups import run_user_groups


def test_gate_thresholds_eq9_eq10():
    n = 2  # averaged: H > 0.95 log 2; concentrated: max > 0.5 + 0.6/2 = 0.8
    w = np.array([[0.5, 0.5], [0.85, 0.15], [0.7, 0.3], [0.81, 0.19]])
    h, d = gate(w)
    assert d == ["global", "single", "fused", "single"]
    assert h[0] == pytest.approx(math.log(n))
    w4 = np.array([[0.66, 0.12, 0.11, 0.11], [0.6, 0.2, 0.1, 0.1]])  # 0.5 + 0.6/4 = 0.65
    assert gate(w4)[1] == ["single", "fused"]


def test_participation_is_softmax_of_cosine_over_tau():
    f = np.array([[2.0, 0.0]])
    e = np.array([[1.0, 0.0], [0.0, 3.0]])
    w = participation(f, e, tau=0.1)
    expected = np.exp([10.0, 0.0]) / np.exp([10.0, 0.0]).sum()
    assert np.allclose(w, expected)


def test_user_groups_stored_and_consistent(ml100k):
    r = run_user_groups(ml100k, "ml-100k", groups=3, dim=16, seed=1)
    assert r["users"] == 943 and sum(r["per_group"].values()) == 943
    with ml100k.read() as con:
        rows = con.execute(
            "select group_id, weights, entropy, max_weight, gate, expert, len(feature)"
            " from user_groups where dataset = 'ml-100k' and grouping = 'loo-g3'").fetchall()
        experts = con.execute("select group_id, n_users, len(representation)"
                              " from user_group_experts order by 1").fetchall()
        meta = con.execute("select method, counts from user_groupings").fetchone()
    assert len(rows) == 943
    for group_id, w, h, m, g, expert, dim in rows:
        assert 0 <= group_id < 3 and dim == 16
        assert sum(w) == pytest.approx(1.0) and max(w) == pytest.approx(m)
        if g == "global":
            assert h > 0.95 * math.log(3)
        elif g == "single":
            assert m > 0.5 + 0.6 / 3 and expert == int(np.argmax(w))
        else:
            assert expert is None
    assert [n for _, n, _ in experts] == [r["per_group"][g] for g in range(3)]
    assert "SVD" in meta[0] and json.loads(meta[1])["gate"] == r["gate"]
    # deterministic given the seed; an existing name needs --replace
    with pytest.raises(FactoryError, match="--replace"):
        run_user_groups(ml100k, "ml-100k", groups=3, dim=16, seed=1)
    again = run_user_groups(ml100k, "ml-100k", groups=3, dim=16, seed=1, replace=True)
    assert again["per_group"] == r["per_group"] and again["gate"] == r["gate"]


def test_features_ignore_validation_and_test(ml100k):
    """Changing held-out interactions must not change any user's feature."""
    run_user_groups(ml100k, "ml-100k", groups=2, dim=8, name="before")
    with ml100k.write() as con:
        con.execute("update interactions set item_id = (select min(item_id) from items)"
                    " where (user_id, position) in (select user_id, position from split_parts"
                    " where split = 'loo' and part <> 'train')")
    run_user_groups(ml100k, "ml-100k", groups=2, dim=8, name="after")
    with ml100k.read() as con:
        diff = con.execute(
            "select max(list_cosine_similarity(a.feature, b.feature)),"
            " min(list_cosine_similarity(a.feature, b.feature))"
            " from user_groups a join user_groups b using (dataset, user_id)"
            " where a.grouping = 'before' and b.grouping = 'after'").fetchone()
    assert diff[1] > 0.9999


def test_user_groups_bad_input(ml100k, tmp_path):
    with pytest.raises(FactoryError, match="unknown split"):
        run_user_groups(ml100k, "ml-100k", groups=2, split="nope")
    with pytest.raises(FactoryError, match="--dim"):
        run_user_groups(ml100k, "ml-100k", groups=2, dim=5000)
    with pytest.raises(FactoryError, match="unknown dataset"):
        run_user_groups(Warehouse(tmp_path / "empty.duckdb"), "ml-100k", groups=2)
    with ml100k.read() as con:
        assert con.execute("select count(*) from job_runs where job = 'user-groups'"
                           " and status = 'failed'").fetchone()[0] == 1


def test_cli(ml100k):
    import subprocess
    import sys

    args = [sys.executable, "-m", "factory", "--warehouse", str(ml100k.path), "user-groups",
            "--dataset", "ml-100k", "--groups", "2", "--dim", "8"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "gate: global" in first.stderr
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert again.returncode == 1 and len(lines) == 1 and "--replace" in lines[0]
