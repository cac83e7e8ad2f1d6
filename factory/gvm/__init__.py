"""SCoTER Generate-Validate-Mine (sec. 3.2, Alg. 1): the pieces the `gvm` jobs assemble.

parse: read the teacher's Fig. 9/10 answers. validate: map recommended descriptions to
catalog items and score chains by Recall@20. mine: prune near-duplicate paths, cluster the
paths, rate clusters and pick the pattern. Nothing here calls a teacher or the warehouse.
"""
