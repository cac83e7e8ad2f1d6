-- ThinkRec item keywords (sec. 3.2.1, App. B.1): up to ten normalised, de-duplicated keywords
-- per item from its metadata. Items without usable text get no row (counted in job_runs).
create table item_keywords (
    dataset        varchar not null,
    item_id        varchar not null,
    model          varchar not null,
    template       varchar not null,
    template_hash  varchar not null,
    prompt         varchar not null,
    keywords       varchar[],                    -- null when failed
    verdict        varchar not null,             -- kept | failed
    reason         varchar,
    call_key       varchar,
    attempts       integer,
    run_id         varchar not null,
    created_at     timestamp not null default current_timestamp,
    primary key (dataset, item_id, model, template_hash)
);
