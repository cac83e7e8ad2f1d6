-- Adds the distillation chains (050) to `traces` (034, 042): teacher chains as job
-- 'distill-teach', student chains as 'distill-generate'. The output is the parsed chain,
-- one "step: text" line per template step; rejected and failed chains keep the raw answer
-- in `response` and say why in `reason`.
alter view traces rename to traces_before_distill;

create view traces as
select * from traces_before_distill
union all by name
select case when d.source = 'teacher' then 'distill-teach' else 'distill-generate' end as job,
       d.dataset, d.user_id || '@' || d.part || ' (' || d.template || ')' as entity,
       null as item_id, null as other_item_id, d.user_id, null as position, d.sample,
       json_extract_string(c.request, '$.messages[#-1].content') as prompt,
       c.text as response,
       case when d.steps is not null then array_to_string(
           [s[1] || ': ' || s[2] for s in list_zip(d.template_steps, d.steps)], chr(10))
       end as output,
       d.verdict, d.reason, d.backend, d.model, d.prompt_name, d.prompt_hash, c.input_tokens,
       c.output_tokens, c.cost_usd, d.draws, d.run_id, d.created_at, d.call_key
from chains d left join llm_calls c on c.key = d.call_key;
