-- Semantic IDs by residual k-means over item text embeddings (TwiSTAR 3, E.1), with an extra
-- disambiguation level for items whose codes collide (SCoTER A.1). Same run pattern as I2I:
-- a re-run with the same parameters replaces the earlier one; item_sids is the latest run.
-- No primary keys, as in 010: `factory merge` leaves SID runs alone rather than half-copy them.
create table sid_runs (
    run_id          varchar not null,           -- = job_runs.run_id
    dataset         varchar not null,
    encoder         varchar not null,           -- embedding_cache.encoder
    params          json not null,              -- levels, codebook size, text fields, seed, ...
    params_hash     varchar not null,
    n_items         bigint not null,
    n_levels        integer not null,           -- levels + 1 when a disambiguation level exists
    collision_rate  double not null,            -- share of items whose L codes are not unique
    usage           json not null,              -- per level: codes used of K
    finished_at     timestamp not null default current_timestamp
);

create table item_sids_all (
    dataset      varchar not null,
    run_id       varchar not null,
    item_id      varchar not null,
    codes        integer[] not null,             -- one code per level (+ disambiguation code)
    sid          varchar not null,               -- <|sid_begin|><s_a_12><s_b_4><s_c_200><|sid_end|>
    text_sha256  varchar not null                -- the embedded text (embedding_cache key)
);

create table sid_codebooks (
    dataset   varchar not null,
    run_id    varchar not null,
    level     integer not null,                  -- 0-based
    code      integer not null,
    centroid  float[] not null
);

create view sid_latest as
select dataset, arg_max(run_id, finished_at) as run_id from sid_runs group by dataset;

create view item_sids as
select s.* from item_sids_all s join sid_latest l using (dataset, run_id);
