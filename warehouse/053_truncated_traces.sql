-- Truncated answers in `traces` (issue 11): an answer cut short (finish_reason length or
-- content_filter, or a <think> block never closed) has status 'truncated' in the job tables,
-- and the jobs with a verdict column store verdict 'truncated' with the reason naming the
-- budget ("cut at max_tokens=1024; raise --max-tokens"). The branches that derive the
-- verdict from the status (describe-items: 034; gvm and gvm-abstract: 042) said 'failed' for
-- anything not ok; they now pass the status through (failed | truncated), so
-- `select * from traces where verdict = 'truncated'` finds every cut answer. The layering of
-- 042/052 stays: traces = traces_before_distill (traces_text + GVM) + distillation chains.
-- Status columns of the teacher tables now hold ok | failed | truncated.

create or replace view traces_text as
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
       case when d.status = 'ok' then 'kept' else d.status end as verdict, d.error as reason,
       d.backend, d.model, d.prompt_name, d.prompt_hash, c.input_tokens, c.output_tokens,
       c.cost_usd, d.draws, d.run_id, d.created_at, d.call_key
from item_descriptions d left join llm_calls c on c.key = d.call_key;

create or replace view traces_before_distill as
select * from traces_text
union all by name
select 'gvm' as job, s.dataset, g.user_id || ' #' || g.sample || ' (' || g.template || ')'
           as entity,
       null as item_id, null as other_item_id, g.user_id, null as position, g.sample,
       json_extract_string(c.request, '$.messages[#-1].content') as prompt,
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
left join llm_calls c on c.key = g.call_key
union all by name
select 'gvm-abstract' as job, j.dataset, 'cluster ' || a.cluster as entity,
       null as item_id, null as other_item_id, null as user_id, null as position, a.sample,
       json_extract_string(c.request, '$.messages[#-1].content') as prompt,
       c.text as response, array_to_string(a.steps, ' -> ') as output,
       case when a.status = 'ok' then 'kept' else a.status end as verdict, a.error as reason,
       a.backend, a.model, a.prompt_name, a.prompt_hash, c.input_tokens, c.output_tokens,
       c.cost_usd, a.draws, a.run_id, j.started_at as created_at, a.call_key
from gvm_abstractions a
left join job_runs j using (run_id)
left join llm_calls c on c.key = a.call_key;
