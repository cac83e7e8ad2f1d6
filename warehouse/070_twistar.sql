-- TwiSTAR's second stage (issue 16): M_fast's candidates, hard samples, planner pseudo-labels.
-- 070-079: TwiSTAR second stage. No primary keys (as 010/012): each job replaces its rows of
-- a dataset (and candidate source kind) in one transaction.

-- One row per imported candidate set: the newest of each (dataset, source_kind).
create table twistar_candidate_sets (
    dataset      varchar not null,
    source_kind  varchar not null,   -- train (a `factory train --predict` run) | file
    source       varchar not null,   -- the train run id, or the file's absolute path
    path         varchar not null,   -- the Parquet file read
    sha256       varchar not null,   -- of that file
    split        varchar not null,   -- the dataset split whose rows the candidates rank
    model        varchar,            -- what produced them: backbone[+fusion], or --model
    trained_on   varchar not null,   -- parts the model trained on: train | none (4.4 leakage)
    k            integer not null,   -- every list has exactly k items
    rows         json not null,      -- {"train": N, "valid": N, "test": N}
    run_id       varchar not null,   -- the `twistar-candidates` job run
    created_at   timestamp not null default current_timestamp
);

-- One row per (part, user) of the split: M_fast's top k, best first (lists, not one row per
-- item: every consumer reads a whole list, and list_position gives the hit rank).
create table twistar_candidates (
    dataset          varchar not null,
    source_kind      varchar not null,
    part             varchar not null,   -- train | valid | test
    user_id          varchar not null,
    target_position  integer not null,   -- interactions.position of the target
    target_item_id   varchar not null,
    item_ids         varchar[] not null, -- best first, k of them
    scores           float[],            -- aligned with item_ids; null when the file had none
    hit_rank         integer             -- 1-based rank of the target in item_ids, null: absent
);

-- Sequences whose target is not in M_fast's top k2 (TwiSTAR 4.3, E.1.3): M_slow's GRPO set.
create table twistar_hard_samples (
    dataset          varchar not null,
    source_kind      varchar not null,
    k2               integer not null,
    part             varchar not null,
    user_id          varchar not null,
    target_position  integer not null,
    target_item_id   varchar not null,
    hit_rank         integer,            -- > k2, or null (not in the top k)
    run_id           varchar not null
);

-- Planner pseudo-labels (4.4, App. B Alg. 1 lines 3-8): path by the target's hit rank,
-- a seeded share of Path-1 rows flipped to Path 2 or 3; label = the tool-call JSON.
create table twistar_planner_labels (
    dataset          varchar not null,
    source_kind      varchar not null,
    trained_on       varchar not null,   -- of the candidate model: never the label's part
    part             varchar not null,
    user_id          varchar not null,
    target_position  integer not null,
    target_item_id   varchar not null,
    hit_rank         integer,
    k1               integer not null,
    k2               integer not null,
    original_path    integer not null,   -- 1 | 2 | 3 by the hit rank
    path             integer not null,   -- after the flip
    flipped          boolean not null,
    label            varchar not null,   -- {"tool_calls": [{"name", "arguments", "call"}]}
    seed             integer not null,
    run_id           varchar not null
);
