-- Output of the `describe-items` demonstration job: one sentence per item and teacher setup.
-- The provenance columns (work_key ... error) are the ones every teacher job's table carries
-- (factory.teacher.PROVENANCE_COLUMNS); call_key joins llm_calls for the raw request/response.
create table item_descriptions (
    dataset      varchar not null,
    item_id      varchar not null,
    description  varchar,                  -- NULL when status = 'failed'; never a default
    work_key     varchar not null,         -- llm_calls key of the first draw: the teacher setup
    call_key     varchar,                  -- llm_calls key of the answer used (or last tried)
    run_id       varchar not null,
    prompt_name  varchar not null,
    prompt_hash  varchar not null,
    backend      varchar not null,
    model        varchar not null,
    sample       integer not null,
    draws        integer not null,         -- answers drawn (parse retries + 1)
    cached       boolean not null,         -- true when no request was sent for this row
    status       varchar not null,         -- ok | failed
    error        varchar,
    created_at   timestamp not null default current_timestamp,
    primary key (dataset, item_id, work_key)
);
