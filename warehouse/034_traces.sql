-- `traces`: every piece of teacher-generated text in one place, with its provenance and its
-- verdict, so one query inspects all of it:
--   select * from traces where dataset = 'ml-1m' and job = 'thinkrec' and verdict = 'kept'
-- prompt and response are the raw exchange (llm_calls): for a ThinkRec trace the first turn's
-- prompt and the last answer, with tokens and cost summed over its turns; elsewhere the answer
-- used (tokens and cost of that request; parse-retry draws are in llm_calls). A later
-- migration that adds a generating job replaces this view with one more branch.
create view traces as
with thinkrec_calls as (
    select t.dataset, t.split, t.user_id, t.position, t.work_key,
           sum(c.input_tokens)::bigint as input_tokens,
           sum(c.output_tokens)::bigint as output_tokens,
           sum(c.cost_usd) as cost_usd
    from thinkrec_traces t, unnest(t.call_keys) as k(key)
    left join llm_calls c on c.key = k.key
    group by all
)
select 'explain-i2i' as job, e.dataset, e.item_i || ' -> ' || e.item_j || ' #' || e.sample
           as entity,
       e.item_i as item_id, e.item_j as other_item_id, null::varchar as user_id,
       null::integer as position, e.sample,
       json_extract_string(c.request, '$.messages[#-1].content') as prompt,
       c.text as response, e.explanation as output, e.verdict, e.reason,
       e.backend, e.model, e.prompt_name, e.prompt_hash, c.input_tokens, c.output_tokens,
       c.cost_usd, e.draws, e.run_id, e.created_at, e.call_key
from i2i_explanations e left join llm_calls c on c.key = e.call_key
union all by name
select 'keywords' as job, k.dataset, k.item_id as entity, k.item_id, null as other_item_id,
       null as user_id, null as position, k.sample,
       json_extract_string(c.request, '$.messages[#-1].content') as prompt,
       c.text as response, array_to_string(k.keywords, ', ') as output, k.verdict, k.reason,
       k.backend, k.model, k.prompt_name, k.prompt_hash, c.input_tokens, c.output_tokens,
       c.cost_usd, k.draws, k.run_id, k.created_at, k.call_key
from item_keywords k left join llm_calls c on c.key = k.call_key
union all by name
select 'thinkrec' as job, t.dataset, t.user_id || '@' || t.position as entity,
       t.item_id, null as other_item_id, t.user_id, t.position, 0 as sample,
       json_extract_string(t.turns, '$[0].content') as prompt, c.text as response,
       t.explanation as output, t.verdict, t.reason, t.backend, t.model, t.prompt_name,
       t.prompt_hash, s.input_tokens, s.output_tokens, s.cost_usd, t.draws, t.run_id,
       t.created_at, t.call_keys[-1] as call_key
from thinkrec_traces t
left join thinkrec_calls s using (dataset, split, user_id, position, work_key)
left join llm_calls c on c.key = t.call_keys[-1]
union all by name
select 'describe-items' as job, d.dataset, d.item_id as entity, d.item_id,
       null as other_item_id, null as user_id, null as position, d.sample,
       json_extract_string(c.request, '$.messages[#-1].content') as prompt,
       c.text as response, d.description as output,
       case when d.status = 'ok' then 'kept' else 'failed' end as verdict, d.error as reason,
       d.backend, d.model, d.prompt_name, d.prompt_hash, c.input_tokens, c.output_tokens,
       c.cost_usd, d.draws, d.run_id, d.created_at, d.call_key
from item_descriptions d left join llm_calls c on c.key = d.call_key;
