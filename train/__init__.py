"""The compact training module: reads an exported cache (README.md, "Training caches") and
trains SASRec, optionally with SCoTER's order-preserving reasoning fusion.

Stands alone: PyTorch, NumPy and PyArrow only; no DuckDB, no factory, no LLM libraries.
`python -m train --help` lists the options; `train.loop.run(Config(...))` runs in-process.
"""
