-- Answers to the RQ3 discrimination task (TwiSTAR sec. 6.3): `factory i2i-eval --score` shows a
-- model item i and the candidates of one i2i_eval_sets row and asks which is most
-- collaboratively similar to i. One row per (set, teacher setup); `correct` is whether the
-- chosen candidate is the true partner j. Provenance columns as every teacher job's table
-- (factory.teacher.PROVENANCE_COLUMNS); call_key joins llm_calls (raw request/response).
-- Answers from different models, prompts, item views or sampling settings sit side by side.
create table i2i_eval_answers (
    dataset       varchar not null,
    eval_run      varchar not null,               -- the i2i-eval run that built the sets
    item_i        varchar not null,
    item_j        varchar not null,               -- the true partner
    answer_index  integer not null,               -- position of item_j in the candidates (0-based)
    n_candidates  integer not null,
    item_view     varchar not null,               -- sid | sid+text | text: how items were shown
    chosen_index  integer,                        -- the model's choice (0-based); NULL when failed
    correct       boolean,                        -- chosen_index = answer_index; NULL when failed
    answer        varchar,                        -- the answer text (a <think> block removed)
    work_key      varchar not null,
    call_key      varchar,
    run_id        varchar not null,               -- the scoring run (job 'i2i-eval-score')
    prompt_name   varchar not null,
    prompt_hash   varchar not null,
    backend       varchar not null,
    model         varchar not null,
    sample        integer not null,
    draws         integer not null,
    cached        boolean not null,
    status        varchar not null,               -- ok | failed | truncated
    error         varchar,
    created_at    timestamp not null default current_timestamp,
    primary key (dataset, eval_run, item_i, item_j, work_key)
);

-- Accuracy per set and teacher setup (failed answers are not scored; `failed` counts them).
create view i2i_eval_accuracy as
select dataset, eval_run, model, prompt_hash, item_view, n_candidates,
       count(correct) as answered, count(*) filter (where correct) as correct,
       count(*) - count(correct) as failed,
       count(*) filter (where correct) / nullif(count(correct), 0) as accuracy
from i2i_eval_answers
group by all;
