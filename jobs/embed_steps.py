"""`factory embed-steps`: H_i = [e_i1; ...; e_iK] for every kept chain (SCoTER 3.3.1).

Each step text c_ij goes through the shared embedding service (factory.embeddings), so a
text seen before by the same encoder, in any job, is read from the cache, and identical step
texts are encoded once. An encoder reads a bounded number of tokens (all-MiniLM-L6-v2: 256)
and drops the rest of a longer text: the run counts the step texts (and whole chains) that
were cut, in its summary, counts and manifest; `--max-seq-length` raises (or lowers) the
limit. The matrices are written to a cache directory beside the warehouse
(format: factory/step_cache.py) and indexed in `step_embeddings` / `step_caches`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from factory.vocabulary import DatasetOpt

#: sequences embedded and written per block (bounded memory on 100k-sequence runs)
BLOCK = 4096


def embed_steps(
    dataset: str = DatasetOpt,
    chains: str = typer.Option("student:latest", "--chains", help="teacher:<run> or "
                               "student:<run>; a run is an id, a unique prefix of one, or "
                               "latest (the dataset's newest finished distill teach / "
                               "generate run)."),
    encoder: str = typer.Option(None, "--encoder", help="Sentence-transformers model dir or "
                                "name [default: the embedded all-MiniLM-L6-v2]."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 or float32."),
    whole_chain: bool = typer.Option(False, "--whole-chain", help="Also store one embedding "
                                     "of each whole chain (ablation: w/o step-wise "
                                     "embedding)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Encoder batch size."),
    max_seq_length: int = typer.Option(None, "--max-seq-length", min=1, help="Tokens the "
                                       "encoder reads of each text; the rest is cut "
                                       "(counted) [default: the encoder's own, MiniLM 256; "
                                       "its positions allow 512]."),
    out: Path = typer.Option(None, "--out", help="Cache directory [default: "
                             "<warehouse>.files/steps/<run>]."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite --out if it exists."),
) -> None:
    """Embed every reasoning step of a chain set into H_i matrices (K x D per sequence)."""
    from factory.cli import warehouse

    build_step_cache(warehouse(), dataset=dataset, chains=chains, encoder=encoder, dtype=dtype,
                     whole_chain=whole_chain, batch_size=batch_size, out=out, replace=replace,
                     max_seq_length=max_seq_length)


def build_step_cache(wh: Any, *, dataset: str, chains: str, encoder: str | None, dtype: str,
                     whole_chain: bool, batch_size: int, out: Path | None,
                     replace: bool, max_seq_length: int | None = None) -> dict[str, Any]:
    import json

    import numpy as np
    import pyarrow as pa

    from factory.console import summary
    from factory.distill import PARTS, chains_digest, kept_chains, resolve_chains
    from factory.embeddings import Embedder
    from factory.errors import FactoryError
    from factory.runs import finish_run, start_run
    from factory.step_cache import DTYPES, CacheWriter, files_dir, refuse_other_encoder
    from factory.warehouse import require_dataset

    if dtype not in DTYPES:
        raise FactoryError(f"--dtype must be float16 or float32, not {dtype!r}")
    with wh.read() as con:
        require_dataset(con, dataset)
        cs = resolve_chains(con, chains, dataset)
        rows = kept_chains(con, cs.chain_set)
    chains = cs.spec    # the run by its whole id: `latest` changes meaning later
    embedder = Embedder(wh, encoder, batch_size=batch_size, max_seq_length=max_seq_length)
    if out is not None and out.exists() and not replace:
        refuse_other_encoder(out, embedder.encoder_id)
    k = len(cs.steps)
    by_part: dict[str, list[tuple[str, list[str]]]] = {}
    for part, user, steps in rows:
        if len(steps) != k:
            raise FactoryError(f"chain of {part} user {user} has {len(steps)} steps, the "
                               f"template {k}")
        by_part.setdefault(part, []).append((user, steps))
    params = {"dataset": dataset, "chains": chains, "chain_set": cs.chain_set,
              "encoder": embedder.encoder_id, "dtype": dtype, "whole_chain": whole_chain,
              "max_seq_length": embedder.max_seq_length}
    with wh.write() as con:
        run_id = start_run(con, "embed-steps", dataset, params)
    target = Path(out) if out else files_dir(wh.path) / "steps" / run_id
    meta = {"cache_id": run_id, "dataset": dataset, "split": cs.split, "chains": chains,
            "chain_set": cs.chain_set, "chain_source": cs.source, "template": cs.template,
            "template_steps": list(cs.steps), "encoder": embedder.encoder_id,
            "D": embedder.dim, "K": k, "dtype": dtype, "max_seq_length": embedder.max_seq_length,
            "chains_sha256": chains_digest(rows)}
    writer = None
    try:
        writer = CacheWriter(target, meta, replace=replace)
        for part in (p for p in PARTS if p in by_part):
            seqs = by_part[part]
            pw = writer.part(part, [u for u, _ in seqs], with_chain=whole_chain)
            for start in range(0, len(seqs), BLOCK):
                block = seqs[start:start + BLOCK]
                flat = [t for _, steps in block for t in steps]
                h = embedder.embed(flat, label=f"{part} steps").reshape(len(block), k, -1)
                chain = (embedder.embed(["\n\n".join(s) for _, s in block],
                                        label=f"{part} chains") if whole_chain else None)
                pw.write(start, h, chain)
        stats = embedder.stats
        distinct = list(dict.fromkeys(t for _, _, steps in rows for t in steps))
        unique = len(distinct)
        # what the encoder cut: distinct step texts (and whole chains) over its token limit
        truncated = embedder.count_truncated(distinct)
        counts = {"sequences": len(rows), "steps": len(rows) * k, "unique_texts": unique,
                  "texts_seen": stats.seen, "distinct_texts": stats.unique,
                  "cache_hits": stats.cache_hits, "encoded": stats.encoded,
                  "max_seq_length": embedder.max_seq_length, "truncated_steps": truncated}
        if whole_chain:
            counts["truncated_chains"] = embedder.count_truncated(
                list(dict.fromkeys("\n\n".join(steps) for _, _, steps in rows)))
        manifest = writer.commit(counts)
        writer = None
        index = pa.table({
            "cache_id": pa.array([run_id] * len(rows), pa.string()),
            "dataset": pa.array([dataset] * len(rows), pa.string()),
            "split": pa.array([cs.split] * len(rows), pa.string()),
            "part": pa.array([p for p in PARTS for _ in by_part.get(p, [])], pa.string()),
            "user_id": pa.array([u for p in PARTS for u, _ in by_part.get(p, [])], pa.string()),
            "chain_set": pa.array([cs.chain_set] * len(rows), pa.string()),
            "file": pa.array([f"{p}.H.npy" for p in PARTS for _ in by_part.get(p, [])],
                             pa.string()),
            "row": pa.array(np.concatenate([np.arange(len(by_part.get(p, [])), dtype=np.int64)
                                            for p in PARTS])),
        })
        with wh.write() as con:
            con.register("_step_index", index)
            con.execute("insert into step_embeddings select * from _step_index")
            con.unregister("_step_index")
            con.execute(
                "insert into step_caches (cache_id, dataset, split, chains, chain_set,"
                " chain_source, template, template_steps, encoder, dim, k, dtype, dir, rows,"
                " n_steps, n_unique, checksum, manifest) values"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, dataset, cs.split, chains, cs.chain_set, cs.source, cs.template,
                 list(cs.steps), embedder.encoder_id, meta["D"], k, dtype,
                 str(target.resolve()), json.dumps(manifest["rows"]), counts["steps"],
                 unique, manifest["checksum"], json.dumps(manifest)])
            finish_run(con, run_id, "succeeded", counts)
    except BaseException as exc:
        if writer is not None:
            writer.abort()
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        with wh.write() as con:
            finish_run(con, run_id, status, None, str(exc) or type(exc).__name__)
        raise
    rows_out = {
        "sequences": ", ".join(f"{p} {n:,}" for p, n in manifest["rows"].items()),
        "K x D": f"{k} x {meta['D']} {dtype}",
        # one set of definitions: distinct = already cached + encoded now
        "texts seen": f"{counts['steps']:,} step texts"
        + (f" + {len(rows):,} whole chains" if whole_chain else ""),
        "distinct": stats.unique, "already cached": stats.cache_hits,
        "encoded now": stats.encoded,
        f"cut at {counts['max_seq_length']} tokens": truncated_note(counts),
        "directory": str(target), "run": run_id,
    }
    summary(f"step embeddings of {chains} ({dataset})", rows_out,
            f"select part, count(*) from step_embeddings where cache_id = '{run_id}' group by 1")
    if counts["truncated_steps"] or counts.get("truncated_chains"):
        from factory.console import console

        console.print(f"[yellow]the encoder read only the first {counts['max_seq_length']} "
                      "tokens of some texts[/]: raise --max-seq-length (MiniLM allows 512) or "
                      "use an encoder with a longer input")
    return manifest


def truncated_note(counts: dict[str, Any]) -> str:
    """'3 of 120 distinct step texts, 5 of 40 whole chains' (what the encoder cut)."""
    note = f"{counts['truncated_steps']:,} of {counts['unique_texts']:,} distinct step texts"
    if "truncated_chains" in counts:
        note += f", {counts['truncated_chains']:,} of {counts['sequences']:,} whole chains"
    return note


def register(app: typer.Typer) -> None:
    app.command("embed-steps")(embed_steps)
