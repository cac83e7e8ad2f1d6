-- Structured distillation (SCoTER 3.3.1, Alg. 2 steps 1-2): reasoning chains written by the
-- teacher (training sequences) and by the distilled student (every split), parsed into the
-- template's K ordered steps; and the registry of fine-tuned students.

-- One row per (chain set, sequence). A chain set is one generation setup: source, model,
-- prompt, template, sampling, dataset, split, history length. Resumed runs and the shards of
-- one run share it, so their rows land on the same keys. A sequence is one leave-one-out row:
-- part 'train' = the train items except the last (target: the last train item), 'valid' =
-- all train items, 'test' = train + valid items. `history` is what the prompt showed (item
-- ids, oldest first); the target is never shown.
create table chains (
    chain_set      varchar not null,         -- teacher-<hash> | student-<hash>
    dataset        varchar not null,
    split          varchar not null,
    part           varchar not null,         -- train | valid | test
    user_id        varchar not null,
    source         varchar not null,         -- teacher | student
    template       varchar not null,         -- template name (factory.templates)
    template_steps varchar[] not null,       -- the K step names, in order
    history        varchar[] not null,
    verdict        varchar not null,         -- kept | rejected | failed
    reason         varchar,                  -- why rejected (the parser) or failed (the call)
    overall        varchar,                  -- Overall Analysis (kept chains)
    steps          varchar[],                -- c_1..c_K (kept chains), in template order
    summary        varchar,                  -- Summary, when the chain has one
    -- provenance, as every teacher job stores it (factory.teacher.PROVENANCE_COLUMNS)
    work_key       varchar not null,
    call_key       varchar,                  -- llm_calls row of the answer that was parsed
    run_id         varchar not null,
    prompt_name    varchar not null,
    prompt_hash    varchar not null,
    backend        varchar not null,
    model          varchar not null,         -- teacher model id, or the student's model id
    sample         integer not null,
    draws          integer not null,
    cached         boolean not null,
    status         varchar not null,         -- ok | failed (the engine's view)
    error          varchar,
    created_at     timestamp not null default current_timestamp,
    primary key (chain_set, part, user_id)
);

-- c_{i,j} of every kept chain, one row per step; step_index runs 1..K in template order.
create view chain_steps as
select chain_set, run_id, dataset, split, part, user_id, source, template, model,
       unnest(range(1, len(steps) + 1)) as step_index,
       unnest(template_steps) as step_name,
       unnest(steps) as step_text
from chains
where verdict = 'kept';

-- The model registry: one row per successful `distill student` run. The adapter directory's
-- parent also holds loss.json, loss.png and student.json (a copy of this row).
create table student_models (
    run_id          varchar primary key,     -- the job_runs row of the training
    dataset         varchar not null,
    split           varchar not null,
    chain_set       varchar not null,        -- the teacher chains it learnt from (kept ones)
    template        varchar not null,
    template_steps  varchar[] not null,
    prompt_name     varchar not null,
    prompt_hash     varchar not null,
    max_history     integer not null,        -- history items shown per prompt
    base            varchar not null,        -- as given: smollm2, a directory, a model name
    base_location   varchar not null,        -- what from_pretrained loaded
    base_gguf       varchar,                 -- the GGUF file inside base_location, if any
    model_id        varchar not null,        -- the student's id in request keys (llm_calls)
    adapter_dir     varchar not null,
    adapter_sha256  varchar not null,
    lora            json not null,           -- r, alpha, dropout, target modules
    training        json not null,           -- epochs, max_steps, batch, lr, max_length, seed, device
    n_chains        integer not null,        -- kept teacher chains
    n_train         integer not null,        -- examples trained on
    n_too_long      integer not null,        -- left out: longer than max_length tokens
    steps           integer not null,        -- optimizer steps
    loss_curve      double[] not null,       -- training loss per optimizer step
    final_loss      double,
    loss_plot       varchar,                 -- PNG of the loss curve
    created_at      timestamp not null default current_timestamp
);
