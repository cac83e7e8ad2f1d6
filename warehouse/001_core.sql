-- Core schema: datasets, items, users, interactions, splits, job runs.
-- Migration numbers are reserved by area so parallel work never collides:
-- 001-009 core, 010-019 I2I/SIDs/embeddings, 020-029 teacher, 030-039 explanations/traces,
-- 040-049 GVM, 050-059 distillation/caches, 060-069 training.

create table job_runs (
    run_id        varchar primary key,
    job           varchar not null,
    dataset       varchar,
    params        json,
    status        varchar not null,          -- running | succeeded | failed | interrupted
    started_at    timestamp not null default current_timestamp,
    finished_at   timestamp,
    code_version  varchar,
    counts        json,                       -- job-specific tallies (rows written, skipped, ...)
    error         varchar
);

create table datasets (
    name            varchar primary key,
    source          varchar not null,         -- movielens-100k | movielens-1m | amazon-2014 | ...
    params          json,                     -- what the user asked for (files, columns, options)
    normalisation   json,                     -- what was done: duplicates removed, k-core rounds, ...
    n_users         bigint,
    n_items         bigint,
    n_interactions  bigint,
    run_id          varchar,
    created_at      timestamp not null default current_timestamp
);

create table items (
    dataset      varchar not null,
    item_id      varchar not null,
    title        varchar,
    categories   varchar[],
    brand        varchar,
    description  varchar,
    price        double,
    attrs        json,                        -- anything else the source carries (year, genres, ...)
    primary key (dataset, item_id)
);

create table users (
    dataset  varchar not null,
    user_id  varchar not null,
    attrs    json,
    primary key (dataset, user_id)
);

-- One row per kept interaction, in each user's chronological order (position 0 = oldest).
-- Ties in time keep the order of the source file, so the order is stable across runs.
create table interactions (
    dataset   varchar not null,
    user_id   varchar not null,
    item_id   varchar not null,
    ts        bigint,                          -- unix seconds
    rating    double,
    label     boolean,                         -- rating > the dataset's label threshold (ThinkRec 4.1)
    position  integer not null
);

-- Splits are data: each named split assigns every interaction it uses to train/valid/test.
create table splits (
    dataset     varchar not null,
    name        varchar not null,
    kind        varchar not null,              -- loo | temporal
    params      json,
    counts      json,
    created_at  timestamp not null default current_timestamp,
    primary key (dataset, name)
);

create table split_parts (
    dataset   varchar not null,
    split     varchar not null,
    user_id   varchar not null,
    position  integer not null,
    part      varchar not null                 -- train | valid | test
);

create view split_interactions as
select s.split, s.part, i.*
from split_parts s
join interactions i using (dataset, user_id, position);
