-- TwiSTAR collaborative explanations (sec. 4.3, E.1.3): one row per (pair, sample) asked of a
-- teacher, with its quality verdict: kept, rejected (with the filter's reason) or failed (the
-- teacher never gave a usable answer; `error` says why). The triples <i, j, explanation> for
-- fine-tuning are the rows with verdict = 'kept'. Provenance columns as every teacher job's
-- table (factory.teacher.PROVENANCE_COLUMNS); call_key joins llm_calls (raw request/response,
-- tokens, cost). Answers from other models, prompts or sampling settings sit side by side.
create table i2i_explanations (
    dataset      varchar not null,
    item_i       varchar not null,
    item_j       varchar not null,
    pairs_split  varchar not null,               -- split whose train part the pair was mined from
    pairs_run    varchar not null,               -- the mine-i2i run (i2i_runs.run_id)
    pair_score   double,                         -- the pair's mining score, for inspection
    explanation  varchar,                        -- the answer (a reasoning model's <think> removed)
    n_tokens     integer,                        -- its length as the filter counts tokens
    verdict      varchar not null,               -- kept | rejected | failed
    reason       varchar,                        -- why not kept
    work_key     varchar not null,
    call_key     varchar,
    run_id       varchar not null,
    prompt_name  varchar not null,
    prompt_hash  varchar not null,
    backend      varchar not null,
    model        varchar not null,
    sample       integer not null,               -- 0..samples-1: diverse answers per pair
    draws        integer not null,
    cached       boolean not null,
    status       varchar not null,               -- ok | failed (the teacher call)
    error        varchar,
    created_at   timestamp not null default current_timestamp,
    primary key (dataset, item_i, item_j, work_key)
);
