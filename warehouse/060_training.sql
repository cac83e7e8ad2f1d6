-- Training (issue 8): exported caches and training runs.

-- One row per exported cache directory (format: README.md, "Training caches").
create table train_caches (
    path        varchar primary key,          -- absolute path of the cache directory
    dataset     varchar not null,
    split       varchar not null,
    max_len     integer not null,
    n_items     integer not null,
    rows        json,                          -- {"train": N, "valid": N, "test": N}
    item_text   json,                          -- null, or {"encoder", "dim"}
    steps       json,                          -- null, or {"K", "D", "dtype", "encoder", ...}
    manifest    json not null,
    run_id      varchar,                       -- the export's job_runs row
    created_at  timestamp not null default current_timestamp
);

-- One row per `factory train` run; the job_runs row with the same run_id has the code version.
create table train_runs (
    run_id            varchar primary key,
    dataset           varchar not null,
    split             varchar not null,
    cache_path        varchar not null,
    backbone          varchar not null,
    fusion            varchar not null,        -- none | scoter
    ablate            varchar[],               -- SCoTER Table 4 ablations
    params            json,                    -- the full training configuration
    status            varchar not null,        -- running | succeeded | failed | interrupted
    valid             json,                    -- recall@5/10/20, ndcg@5/10/20 at the best epoch
    test              json,
    best_epoch        integer,
    epochs_run        integer,
    seconds_per_epoch double,
    out_dir           varchar,                 -- metrics.json, curves.png
    error             varchar,
    started_at        timestamp not null default current_timestamp,
    finished_at       timestamp
);
