-- Step-wise embedding caches (SCoTER 3.3.1, Alg. 2 lines 13-18): the H_i matrices live in
-- files beside the warehouse (factory/step_cache.py has the format); these tables say where.

-- One row per `embed-steps` run: the cache directory and its manifest.
create table step_caches (
    cache_id        varchar primary key,     -- the embed-steps run
    dataset         varchar not null,
    split           varchar not null,
    chains          varchar not null,        -- as asked: teacher:<run> | student:<run>
    chain_set       varchar not null,        -- the chain set embedded (chains.chain_set)
    chain_source    varchar not null,        -- teacher | student
    template        varchar not null,
    template_steps  varchar[] not null,
    encoder         varchar not null,
    dim             integer not null,        -- D
    k               integer not null,        -- K
    dtype           varchar not null,        -- float16 | float32
    dir             varchar not null,        -- absolute path of the cache directory
    rows            json not null,           -- {"train": n, "valid": n, "test": n}
    n_steps         bigint not null,         -- step texts embedded (rows x K)
    n_unique        bigint not null,         -- distinct step texts
    checksum        varchar not null,        -- over every file's SHA-256 (manifest.json)
    manifest        json not null,
    created_at      timestamp not null default current_timestamp
);

-- Which row of which file holds H_i for a sequence (dataset, split, part, user) of a chain set.
create table step_embeddings (
    cache_id   varchar not null,
    dataset    varchar not null,
    split      varchar not null,
    part       varchar not null,
    user_id    varchar not null,
    chain_set  varchar not null,
    file       varchar not null,             -- e.g. train.H.npy inside the cache directory
    "row"      bigint not null,
    primary key (cache_id, part, user_id)
);
