-- Adds the GVM chains and template abstractions to `traces` (view of 034): the earlier view
-- keeps its definition under another name and `traces` becomes it plus the GVM branches.
-- A chain's verdict: kept, rejected (pruned as a near-duplicate path) or failed.
alter view traces rename to traces_text;

create view traces as
select * from traces_text
union all by name
select 'gvm' as job, s.dataset, g.user_id || ' #' || g.sample || ' (' || g.template || ')'
           as entity,
       null as item_id, null as other_item_id, g.user_id, null as position, g.sample,
       json_extract_string(c.request, '$.messages[#-1].content') as prompt,
       c.text as response, g.cot_path as output,
       case when g.status <> 'ok' then 'failed' when g.pruned then 'rejected' else 'kept' end
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
       case when a.status = 'ok' then 'kept' else 'failed' end as verdict, a.error as reason,
       a.backend, a.model, a.prompt_name, a.prompt_hash, c.input_tokens, c.output_tokens,
       c.cost_usd, a.draws, a.run_id, j.started_at as created_at, a.call_key
from gvm_abstractions a
left join job_runs j using (run_id)
left join llm_calls c on c.key = a.call_key;
