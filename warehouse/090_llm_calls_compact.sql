-- Compact teacher cache (issue 18): each answer stored once, each prompt stored once.
--
-- `llm_calls` becomes a view over two tables, with the same columns as before (plus
-- `prompt`), so `select request, response from llm_calls` reads what it always read:
--   llm_prompts    one row per distinct rendered `messages` array of canonical requests
--                  (all samples and parse-retry draws of one prompt share it), keyed by the
--                  sha256 of that JSON text; `prompt` is its last message's content.
--   llm_call_rows  one row per key (the cache key is unchanged). `request` is the canonical
--                  request with its "messages" value replaced by the prompt_key string
--                  (NULL prompt_key: a request of another layout, kept whole); `response`
--                  is the raw body without choices[0].message.content when that equals
--                  `text` (content_in_text), so the answer is not stored twice.
-- The view rebuilds `request` byte for byte and puts the content back into `response`
-- (same JSON, the content key last in its message). Write to llm_call_rows (or through
-- factory.teacher.store.write_calls, which splits rows with the macros below).

create macro llm_messages_at(request) as
    case when starts_with(request::varchar, '{"draw":')
              and strpos(request::varchar, ',"model":') > strpos(request::varchar, ',"messages":')
              and strpos(request::varchar, ',"messages":') > 0
         then strpos(request::varchar, ',"messages":') + 12 end;

-- the "messages" JSON text of a canonical request (sorted keys: draw, messages, model, ...;
-- a quote inside a string is escaped, so the first ,"model": ends the messages array)
create macro llm_messages(request) as
    substr(request::varchar, llm_messages_at(request),
           strpos(request::varchar, ',"model":') - llm_messages_at(request));

create macro llm_request_ref(request, prompt_key) as
    case when prompt_key is null then request::varchar
         else left(request::varchar, llm_messages_at(request) - 1) || '"' || prompt_key || '"'
              || substr(request::varchar, strpos(request::varchar, ',"model":')) end;

create macro llm_request(ref, prompt_key, messages) as
    (case when prompt_key is null then ref::varchar
          else replace(ref::varchar, '"messages":"' || prompt_key || '"',
                       '"messages":' || messages::varchar) end)::json;

create macro llm_content_in_text(response, text) as
    coalesce(json_array_length(response, '$.choices') = 1
             and json_extract_string(response, '$.choices[0].message.content') = text, false);

create macro llm_with_content(response, text, content) as
    case when response is null then null
         else json_merge_patch(response, json_object('choices', [json_merge_patch(
             json_extract(response, '$.choices[0]'),
             json_object('message', json_object('content', content)))]))
    end;

create table llm_prompts (
    prompt_key  varchar primary key,                  -- sha256 of `messages` (its JSON text)
    messages    json not null using compression zstd,
    prompt      varchar using compression zstd    -- the last message's content
);

create table llm_call_rows (
    key            varchar primary key,
    model          varchar not null,
    backend        varchar not null,
    sample         integer not null,
    draw           integer not null,
    prompt_key     varchar,                            -- llm_prompts
    request        json not null,                      -- canonical request, messages by key
    status         varchar not null,
    content_in_text boolean not null default false,   -- response lacks the content (in text)
    response       json using compression zstd,
    text           varchar using compression zstd,
    finish_reason  varchar,
    input_tokens   integer,
    output_tokens  integer,
    latency_s      double,
    attempts       integer not null,
    error          varchar,
    cost_usd       double,
    price_version  varchar,
    run_id         varchar,
    created_at     timestamp not null default current_timestamp,
    reasoning      varchar using compression zstd,
    mode           varchar,
    batch_id       varchar,
    group_key      varchar,
    choice         integer,
    logprobs       json using compression zstd
);

-- existing rows: the same split that write_calls does
create temp table _split as
select *, sha256(llm_messages(request)) as prompt_key, llm_content_in_text(response, text) as cit
from llm_calls;

insert into llm_prompts
select prompt_key, any_value(llm_messages(request))::json,
       json_extract_string(any_value(llm_messages(request)), '$[#-1].content')
from _split where prompt_key is not null group by prompt_key;

insert into llm_call_rows
select key, model, backend, sample, draw, prompt_key, llm_request_ref(request, prompt_key), status,
       cit, case when cit then llm_with_content(response, text, null) else response end, text,
       finish_reason, input_tokens, output_tokens, latency_s, attempts, error, cost_usd,
       price_version, run_id, created_at, reasoning, mode, batch_id, group_key, choice, logprobs
from _split;

drop table _split;
drop table llm_calls;

create view llm_calls as
select c.key, c.model, c.backend, c.sample, c.draw,
       llm_request(c.request, c.prompt_key, p.messages) as request, c.status,
       case when c.content_in_text then llm_with_content(c.response, c.text, c.text)
            else c.response end as response,
       c.text, c.finish_reason, c.input_tokens, c.output_tokens, c.latency_s, c.attempts,
       c.error, c.cost_usd, c.price_version, c.run_id, c.created_at, c.reasoning, c.mode,
       c.batch_id, c.group_key, c.choice, c.logprobs, c.prompt_key,
       coalesce(p.prompt, case when c.prompt_key is null
                then json_extract_string(c.request, '$.messages[#-1].content') end) as prompt
from llm_call_rows c left join llm_prompts p using (prompt_key);

-- traces (034, 042, 052, 053) join llm_call_rows and llm_prompts themselves, not the llm_calls
-- view: a filter on the job's rows then reaches the answers through the primary keys (an
-- index scan of the few keys) instead of joining every stored call. Same views, same columns.
create or replace view traces_text as
with thinkrec_calls as (
    select t.dataset, t.split, t.user_id, t.position, t.work_key,
           sum(c.input_tokens)::bigint as input_tokens,
           sum(c.output_tokens)::bigint as output_tokens,
           sum(c.cost_usd) as cost_usd
    from thinkrec_traces t, unnest(t.call_keys) as k(key)
    left join llm_call_rows c on c.key = k.key
    group by all
)
select 'explain-i2i' as job, e.dataset, e.item_i || ' -> ' || e.item_j || ' #' || e.sample
           as entity,
       e.item_i as item_id, e.item_j as other_item_id, null::varchar as user_id,
       null::integer as position, e.sample,
       coalesce(p.prompt, json_extract_string(c.request, '$.messages[#-1].content')) as prompt,
       c.text as response, e.explanation as output, e.verdict, e.reason,
       e.backend, e.model, e.prompt_name, e.prompt_hash, c.input_tokens, c.output_tokens,
       c.cost_usd, e.draws, e.run_id, e.created_at, e.call_key
from i2i_explanations e left join llm_call_rows c on c.key = e.call_key
left join llm_prompts p on p.prompt_key = c.prompt_key
union all by name
select 'keywords' as job, k.dataset, k.item_id as entity, k.item_id, null as other_item_id,
       null as user_id, null as position, k.sample,
       coalesce(p.prompt, json_extract_string(c.request, '$.messages[#-1].content')) as prompt,
       c.text as response, array_to_string(k.keywords, ', ') as output, k.verdict, k.reason,
       k.backend, k.model, k.prompt_name, k.prompt_hash, c.input_tokens, c.output_tokens,
       c.cost_usd, k.draws, k.run_id, k.created_at, k.call_key
from item_keywords k left join llm_call_rows c on c.key = k.call_key
left join llm_prompts p on p.prompt_key = c.prompt_key
union all by name
select 'thinkrec' as job, t.dataset, t.user_id || '@' || t.position as entity,
       t.item_id, null as other_item_id, t.user_id, t.position, 0 as sample,
       json_extract_string(t.turns, '$[0].content') as prompt, c.text as response,
       t.explanation as output, t.verdict, t.reason, t.backend, t.model, t.prompt_name,
       t.prompt_hash, s.input_tokens, s.output_tokens, s.cost_usd, t.draws, t.run_id,
       t.created_at, t.call_keys[-1] as call_key
from thinkrec_traces t
left join thinkrec_calls s using (dataset, split, user_id, position, work_key)
left join llm_call_rows c on c.key = t.call_keys[-1]
union all by name
select 'describe-items' as job, d.dataset, d.item_id as entity, d.item_id,
       null as other_item_id, null as user_id, null as position, d.sample,
       coalesce(p.prompt, json_extract_string(c.request, '$.messages[#-1].content')) as prompt,
       c.text as response, d.description as output,
       case when d.status = 'ok' then 'kept' else d.status end as verdict, d.error as reason,
       d.backend, d.model, d.prompt_name, d.prompt_hash, c.input_tokens, c.output_tokens,
       c.cost_usd, d.draws, d.run_id, d.created_at, d.call_key
from item_descriptions d left join llm_call_rows c on c.key = d.call_key
left join llm_prompts p on p.prompt_key = c.prompt_key;

create or replace view traces_before_distill as
select * from traces_text
union all by name
select 'gvm' as job, s.dataset, g.user_id || ' #' || g.sample || ' (' || g.template || ')'
           as entity,
       null as item_id, null as other_item_id, g.user_id, null as position, g.sample,
       coalesce(p.prompt, json_extract_string(c.request, '$.messages[#-1].content')) as prompt,
       c.text as response, g.cot_path as output,
       case when g.status <> 'ok' then g.status when g.pruned then 'rejected' else 'kept' end
           as verdict,
       case when g.status <> 'ok' then g.error
            when g.pruned then 'near-duplicate path of ' || g.duplicate_user || ' #'
                 || g.duplicate_sample || ' (cos ' || round(g.duplicate_cos, 3) || ')'
       end as reason,
       g.backend, g.model, g.prompt_name, g.prompt_hash, c.input_tokens, c.output_tokens,
       c.cost_usd, g.draws, g.run_id, j.started_at as created_at, g.call_key
from gvm_chains g
join gvm_sequences s using (run_id, user_id)
left join job_runs j using (run_id)
left join llm_call_rows c on c.key = g.call_key
left join llm_prompts p on p.prompt_key = c.prompt_key
union all by name
select 'gvm-abstract' as job, j.dataset, 'cluster ' || a.cluster as entity,
       null as item_id, null as other_item_id, null as user_id, null as position, a.sample,
       coalesce(p.prompt, json_extract_string(c.request, '$.messages[#-1].content')) as prompt,
       c.text as response, array_to_string(a.steps, ' -> ') as output,
       case when a.status = 'ok' then 'kept' else a.status end as verdict, a.error as reason,
       a.backend, a.model, a.prompt_name, a.prompt_hash, c.input_tokens, c.output_tokens,
       c.cost_usd, a.draws, a.run_id, j.started_at as created_at, a.call_key
from gvm_abstractions a
left join job_runs j using (run_id)
left join llm_call_rows c on c.key = a.call_key
left join llm_prompts p on p.prompt_key = c.prompt_key;

create or replace view traces as
select * from traces_before_distill
union all by name
select case when d.source = 'teacher' then 'distill-teach' else 'distill-generate' end as job,
       d.dataset, d.user_id || '@' || d.part || ' (' || d.template || ')' as entity,
       null as item_id, null as other_item_id, d.user_id, null as position, d.sample,
       coalesce(p.prompt, json_extract_string(c.request, '$.messages[#-1].content')) as prompt,
       c.text as response,
       case when d.steps is not null then array_to_string(
           [s[1] || ': ' || s[2] for s in list_zip(d.template_steps, d.steps)], chr(10))
       end as output,
       d.verdict, d.reason, d.backend, d.model, d.prompt_name, d.prompt_hash, c.input_tokens,
       c.output_tokens, c.cost_usd, d.draws, d.run_id, d.created_at, d.call_key
from chains d left join llm_call_rows c on c.key = d.call_key
left join llm_prompts p on p.prompt_key = c.prompt_key;
