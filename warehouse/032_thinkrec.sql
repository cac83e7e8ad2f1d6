-- ThinkRec reasoning traces (sec. 3.2.1, App. B.3): a sampled training instance (user, target
-- position), a first turn asking for a prediction with reasoning, then reflect turns that
-- reveal the label until the prediction is right or the limit is hit. Filter rationalised
-- traces with `label_revealed`.
create table thinkrec_traces (
    dataset         varchar not null,
    split           varchar not null,            -- the instance is in this split's train part
    user_id         varchar not null,
    position        integer not null,            -- the target interaction's position
    item_id         varchar not null,            -- the target item
    label           boolean not null,            -- the user's yes/no for the target
    model           varchar not null,
    template        varchar not null,            -- first-turn template name
    template_hash   varchar not null,            -- hash of all templates the trace can use
    history         json not null,               -- [{item_id, label, keywords}] shown, oldest first
    turns           json not null,               -- [{role, content, template, call_key}] in order
    attempts        integer not null,            -- assistant turns that produced an answer
    reflections     integer not null,            -- reflect turns sent (each reveals the label)
    label_revealed  boolean not null,
    prediction      boolean,                     -- the last parsed Yes/No
    explanation     varchar,                     -- the final reasoning, "Yes. ..." / "No. ..."
    verdict         varchar not null,            -- kept | rejected | failed
    reason          varchar,
    call_keys       varchar[],                   -- llm_calls rows, one per assistant turn
    run_id          varchar not null,
    created_at      timestamp not null default current_timestamp,
    primary key (dataset, split, user_id, position, model, template_hash)
);
