-- I2I mining (TwiSTAR 4.3, E.1.3) and the 10-candidate I2I evaluation set (TwiSTAR 6.3).
-- Every mining run keeps its pairs in i2i_pairs_all; a run becomes visible when it finishes
-- (a row in i2i_runs). A re-run with the same dataset, split and parameters replaces the
-- earlier run of those parameters, so re-running is idempotent and storage does not grow.
-- The view i2i_pairs shows the latest finished run per dataset.
-- No table here has a primary key on purpose: `factory merge` copies keyed tables only, and a
-- run must never arrive without its pairs. Mining is fast and runs on the main warehouse.

create table i2i_runs (
    run_id       varchar not null,             -- = job_runs.run_id
    dataset      varchar not null,
    split        varchar not null,
    params       json not null,
    params_hash  varchar not null,             -- sha256 of the canonical parameters
    n_pairs      bigint not null,
    n_sources    bigint not null,
    finished_at  timestamp not null default current_timestamp
);

create table i2i_pairs_all (
    dataset     varchar not null,
    run_id      varchar not null,
    split       varchar not null,
    item_i      varchar not null,               -- source item
    item_j      varchar not null,               -- related item (after i, for directed runs)
    support     integer not null,               -- training users whose sequence has the pair
    score       double not null,                -- the run's score (score_kind), rounded to 1e-12
    score_kind  varchar not null,               -- count | penalised | swing | pmi | cond
    rank        integer not null                -- 1 = best partner of item_i in this run
);

create view i2i_latest as
select dataset, arg_max(run_id, finished_at) as run_id from i2i_runs group by dataset;

create view i2i_pairs as
select p.* from i2i_pairs_all p join i2i_latest l using (dataset, run_id);

create table i2i_eval_sets (
    dataset       varchar not null,
    run_id        varchar not null,             -- the i2i-eval job run
    i2i_run_id    varchar not null,             -- the mining run the pairs come from
    item_i        varchar not null,
    item_j        varchar not null,             -- the true related item
    candidates    varchar[] not null,           -- item_j and the distractors, shuffled
    answer_index  integer not null,             -- position of item_j in candidates (0-based)
    seed          integer not null
);
