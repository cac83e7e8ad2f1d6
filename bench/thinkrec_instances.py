"""ThinkRec instance building on ML-1M: sample training instances and attach each one's latest
10 earlier interactions with titles, labels and keywords (what `thinkrec` sends the teacher
and `export sft --kind thinkrec` writes), then render the B.2 prompts.

Prints seconds and instances/s for factory's set-based path (one window query for all
instances) and the ratio against the straightforward baseline measured in the same run: one
history query per instance, as research scripts do.

    python bench/thinkrec_instances.py [--variant 1m] [--sample 3000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from factory.datasets.ingest import NormaliseOptions, ingest
from factory.datasets.movielens import load_movielens
from factory.itemtext import HistoryEntry, latest_keywords, load_items, render_history
from factory.prompts import load_prompt
from factory.thinkrec import candidates, load_instances, sample_keys
from factory.warehouse import Warehouse


def baseline(con, dataset, keys, history, items, keywords, prompt) -> int:
    """One query per instance: its latest `history` earlier interactions, then the prompt."""
    n = 0
    for _, user, position in keys:
        rows = con.execute(
            "select item_id, label from split_interactions where dataset = ? and split = 'loo'"
            " and user_id = ? and position < ? order by position desc limit ?",
            [dataset, user, position, history]).fetchall()
        target = con.execute(
            "select item_id from interactions where dataset = ? and user_id = ?"
            " and position = ?", [dataset, user, position]).fetchone()[0]
        entries = [HistoryEntry(i, items[i].title, bool(lab), keywords.get(i))
                   for i, lab in reversed(rows) if i in items and lab is not None]
        prompt.render(history=render_history(entries, features=True),
                      target_title=items[target].title, noun="movie", nouns="movies")
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="1m")
    ap.add_argument("--sample", type=int, default=3000)
    ap.add_argument("--history", type=int, default=10)
    args = ap.parse_args()
    dataset = f"ml-{args.variant}"
    prompt = load_prompt("thinkrec_recommendation")
    with tempfile.TemporaryDirectory() as tmp:
        wh = Warehouse(Path(tmp) / "w.duckdb")
        ingest(wh, dataset, load_movielens(args.variant), NormaliseOptions(label_threshold=3))
        with wh.read() as con:
            items, keywords = load_items(con, dataset), latest_keywords(con, dataset)
            t0 = time.perf_counter()
            keys = sample_keys(candidates(con, dataset, "loo", part="train"), args.sample, 0)
            t_sample = time.perf_counter() - t0
            t0 = time.perf_counter()
            inst = load_instances(con, dataset, "loo", keys, args.history, items, keywords)
            for i in inst:
                prompt.render(history=render_history(i.history, features=True),
                              target_title=items[i.item_id].title, noun="movie",
                              nouns="movies")
            t_set = time.perf_counter() - t0
            t0 = time.perf_counter()
            n_base = baseline(con, dataset, keys, args.history, items, keywords, prompt)
            t_base = time.perf_counter() - t0
    print(f"{dataset}: {len(keys):,} instances sampled in {t_sample:.2f}s")
    print(f"factory (one window query + render): {t_set:.2f}s, {len(inst) / t_set:,.0f} inst/s")
    print(f"baseline (one query per instance):   {t_base:.2f}s, {n_base / t_base:,.0f} inst/s")
    print(f"speed-up: {t_base / t_set:.1f}x")


if __name__ == "__main__":
    main()
