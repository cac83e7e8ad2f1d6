-- Teacher access: the content-addressed request cache, and teacher provenance on job runs.

-- One row per distinct teacher request (key = sha256 of the canonical request: model id,
-- rendered messages, sampling parameters, sample index, parse-retry draw). A row with
-- status 'ok' is an answer that is never requested again (unless --refresh); a failed row is
-- retried by the next run and replaced when it succeeds. An 'ok' row is never replaced by a
-- failure. API keys are never stored: `request` is the canonical request, not the HTTP call.
create table llm_calls (
    key            varchar primary key,
    model          varchar not null,      -- backend-independent model id
    backend        varchar not null,      -- openai | transformers | vllm (the one that answered)
    sample         integer not null,      -- the job's sample index
    draw           integer not null,      -- parse-retry draw (0 = first answer)
    request        json not null,         -- canonical request: model, messages, params, sample, draw
    status         varchar not null,      -- ok | failed
    response       json,                  -- raw response body (or error body when failed)
    text           varchar,               -- the answer's content
    finish_reason  varchar,
    input_tokens   integer,
    output_tokens  integer,
    latency_s      double,                -- of the successful attempt; all attempts when failed
    attempts       integer not null,      -- HTTP attempts (retries included)
    error          varchar,
    cost_usd       double,                -- NULL when the model has no price
    price_version  varchar,               -- version of the price table the cost came from
    run_id         varchar,               -- the run that made the request
    created_at     timestamp not null default current_timestamp
);

alter table job_runs add column prompt_name varchar;   -- template name(s), comma-separated
alter table job_runs add column prompt_hash varchar;   -- their content hashes, same order
alter table job_runs add column backend varchar;
alter table job_runs add column model varchar;
