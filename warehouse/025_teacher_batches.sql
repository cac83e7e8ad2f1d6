-- Provider batch APIs (issue 17): requests sent as one batch instead of one HTTP call each.
--
-- A batch is recorded here before it is created at the provider, and stays pending until its
-- results are in llm_calls (`imported_at` set, in the same transaction as the rows). A pending
-- batch is never submitted again: a re-run (after kill -9, Ctrl-C, SIGTERM while polling)
-- polls it and imports it. Kinds: 'api' (uploaded and created at --teacher-url: files and
-- batches endpoints) and 'file' (written by --batch-file for `vllm run_batch`; imported with
-- --import-batch). Status: the provider's (validating, in_progress, finalizing, completed,
-- failed, expired, cancelling, cancelled), or 'submitting' (recorded, not yet created) and
-- 'written' (a file).
create table teacher_batches (
    batch_id           varchar primary key,   -- ours: <run_id>-b<n>; llm_calls.batch_id
    kind               varchar not null,      -- api | file
    provider_batch_id  varchar,               -- the provider's batch id (api), once created
    input_file_id      varchar,               -- provider file ids (api)
    output_file_id     varchar,
    error_file_id      varchar,
    path               varchar,               -- the input file written (file)
    url                varchar,               -- where it was submitted (credentials removed)
    run_id             varchar not null,      -- the run that submitted it
    job                varchar not null,
    dataset            varchar,
    shard              varchar,               -- --shard i/N of that run
    model              varchar not null,
    status             varchar not null,
    requests           integer not null,      -- lines
    completed          integer,               -- the provider's request counts, last seen
    failed             integer,
    error              varchar,               -- why it failed / expired / was cancelled
    created_at         timestamp not null default current_timestamp,
    finished_at        timestamp,             -- the provider reached a final status
    imported_at        timestamp              -- results stored in llm_calls; NULL: pending
);

-- One row per line of a batch: its custom_id and the llm_calls rows its answer fills, with
-- each one's canonical request, so importing needs nothing from the run that submitted it.
-- `answers[i]` is answered by choice i of the line's response (one per line unless several
-- samples share a request).
create table teacher_batch_lines (
    batch_id   varchar not null,
    custom_id  varchar not null,
    answers    struct(key varchar, request varchar, sample integer, draw integer)[] not null,
    primary key (batch_id, custom_id)
);

-- how each answer was obtained: 'online' (one request) or 'batch'; NULL (rows stored before
-- this column): online. batch_id joins teacher_batches.
alter table llm_calls add column mode varchar;
alter table llm_calls add column batch_id varchar;
