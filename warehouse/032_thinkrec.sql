-- ThinkRec reasoning traces (sec. 3.2.1, App. B.3). A sampled training instance (user, target
-- position) gets a first turn asking for a prediction with reasoning; while the Yes/No answer
-- disagrees with the label, a reflect turn reveals the label and asks again, up to a limit.

-- Every teacher turn, as the teacher engine stores it (one row per request chain).
create table thinkrec_turns (
    dataset      varchar not null,
    split        varchar not null,
    user_id      varchar not null,
    position     integer not null,
    turn         integer not null,               -- 0 = first turn, r = r-th reflection
    variant      integer,                        -- reflect variant of B.3 (1-3); NULL for turn 0
    prediction   boolean,                        -- parsed Yes/No; NULL when failed
    reasoning    varchar,
    correct      boolean,
    work_key     varchar not null,
    call_key     varchar,
    run_id       varchar not null,
    prompt_name  varchar not null,
    prompt_hash  varchar not null,
    backend      varchar not null,
    model        varchar not null,
    sample       integer not null,
    draws        integer not null,
    cached       boolean not null,
    status       varchar not null,
    error        varchar,
    created_at   timestamp not null default current_timestamp,
    primary key (dataset, split, user_id, position, work_key)
);

-- One row per instance and teacher setup: the whole conversation and how it ended. Filter
-- rationalised traces (the label was revealed before the answer was right) with
-- `label_revealed`.
create table thinkrec_traces (
    dataset         varchar not null,
    split           varchar not null,            -- the instance is in this split's train part
    user_id         varchar not null,
    position        integer not null,            -- the target interaction's position
    item_id         varchar not null,            -- the target item
    label           boolean not null,            -- the user's yes/no for the target
    history         json not null,               -- [{item_id, title, label, keywords}], oldest first
    turns           json not null,               -- [{role, content, ...}] in order
    attempts        integer not null,            -- assistant turns that gave a parsed answer
    reflections     integer not null,            -- reflect turns sent (each reveals the label)
    label_revealed  boolean not null,
    prediction      boolean,                     -- the last parsed Yes/No
    explanation     varchar,                     -- the final reasoning, "Yes. ..." / "No. ..."
    verdict         varchar not null,            -- kept | rejected | failed
    reason          varchar,
    work_key        varchar not null,            -- the first turn's: identifies the teacher setup
    call_keys       varchar[] not null,          -- llm_calls rows of the turns, in order
    run_id          varchar not null,
    prompt_name     varchar not null,            -- first-turn template
    prompt_hash     varchar not null,
    reflect_hash    varchar not null,            -- reflect template's hash
    backend         varchar not null,
    model           varchar not null,
    draws           integer not null,            -- answers drawn over all turns (parse retries)
    status          varchar not null,            -- ok | failed (a teacher call failed)
    created_at      timestamp not null default current_timestamp,
    primary key (dataset, split, user_id, position, work_key)
);
