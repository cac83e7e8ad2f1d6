-- TwiSTAR collaborative explanations (sec. 4.3, E.1.3): one row per (pair, sample) asked of a
-- teacher, kept or rejected with a reason, or failed (the teacher never gave a usable answer).
-- The triples <i, j, explanation> used for fine-tuning are the rows with verdict = 'kept'.
create table i2i_explanations (
    dataset        varchar not null,
    item_i         varchar not null,
    item_j         varchar not null,
    sample_index   integer not null,             -- 0..samples-1: diverse samples per pair
    model          varchar not null,             -- teacher model id
    template       varchar not null,             -- prompt template name
    template_hash  varchar not null,             -- its content hash (the prompt's version)
    pairs_split    varchar,                      -- split the pair was mined from (train part)
    pair_score     double,                       -- the pair's mining score, for inspection
    prompt         varchar not null,             -- the rendered instruction
    explanation    varchar,                      -- the answer (reasoning-model <think> removed)
    n_tokens       integer,                      -- length as the filter measured it
    verdict        varchar not null,             -- kept | rejected | failed
    reason         varchar,                      -- why not kept
    call_key       varchar,                      -- llm_calls row of the answer
    attempts       integer,                      -- teacher attempts (parse-and-retry included)
    run_id         varchar not null,
    created_at     timestamp not null default current_timestamp,
    primary key (dataset, item_i, item_j, sample_index, model, template_hash)
);
