-- ThinkRec item keywords (sec. 3.2.1, App. B.1): up to ten normalised, de-duplicated keywords
-- per item from its metadata. Items without usable text get no row (counted in job_runs);
-- a teacher that never answers in the format gives a failed row, never invented keywords.
create table item_keywords (
    dataset      varchar not null,
    item_id      varchar not null,
    keywords     varchar[],                      -- NULL when failed
    verdict      varchar not null,               -- kept | failed
    reason       varchar,
    work_key     varchar not null,
    call_key     varchar,
    run_id       varchar not null,
    prompt_name  varchar not null,
    prompt_hash  varchar not null,
    backend      varchar not null,
    model        varchar not null,
    sample       integer not null,
    draws        integer not null,
    cached       boolean not null,
    status       varchar not null,
    error        varchar,
    created_at   timestamp not null default current_timestamp,
    primary key (dataset, item_id, work_key)
);
