-- SCoTER Generate-Validate-Mine (sec. 3.2, Alg. 1). One `factory gvm` run (job_runs.job =
-- 'gvm') samples user sequences, asks the teacher for reasoning chains, scores them, clusters
-- their paths and abstracts a template; `gvm compare` / `gvm transfer` runs score templates
-- with the same tables. Every chain links to its teacher call (llm_calls) and its run.

-- The sequences a run works on: the history shown to the teacher (train part of the split,
-- oldest first) and the held-out validation item it is scored against (never shown, never test).
create table gvm_sequences (
    run_id    varchar not null,
    dataset   varchar not null,
    split     varchar not null,
    user_id   varchar not null,
    history   varchar[] not null,
    target    varchar not null,
    primary key (run_id, user_id)
);

-- One row per teacher answer: free generation (template = 'free', the Fig. 9 prompt) or a
-- named template (compare/transfer). The teacher provenance columns are those of
-- factory.teacher (PROVENANCE_COLUMNS); status 'failed' rows say why in `error`.
create table gvm_chains (
    run_id         varchar not null,
    template       varchar not null,
    user_id        varchar not null,
    sample         integer not null,
    work_key       varchar not null,
    call_key       varchar,                -- llm_calls row of the answer parsed here
    prompt_name    varchar,
    prompt_hash    varchar,
    backend        varchar,
    model          varchar,
    draws          integer,
    cached         boolean,
    status         varchar not null,       -- ok | failed
    error          varchar,
    cot_path       varchar,
    steps          varchar[],
    reason_text    varchar,                -- the <reason> elaboration
    items          varchar[],              -- the recommended descriptions, in order
    warnings       varchar[],              -- what the parser had to tolerate
    pruned         boolean not null default false,
    duplicate_user varchar,                -- pruned: the kept chain it repeats (user, sample;
    duplicate_sample integer,              --   global pruning crosses users)
    duplicate_cos  double,
    hit_rank       integer,                -- rank of the target among the unique mapped items
    score          double,                 -- Recall@20 (0/1) against the validation target
    ndcg           double,                 -- NDCG@20 against the validation target
    cluster        integer,                -- Mine: cluster of the path (-1: HDBSCAN noise)
    primary key (run_id, template, user_id, sample)
);

-- Validate: each recommended description and the catalog item it maps to (top-1 cosine).
create table gvm_recommendations (
    run_id        varchar not null,
    template      varchar not null,
    user_id       varchar not null,
    sample        integer not null,
    rank          integer not null,        -- 1-based, in the teacher's order
    description   varchar not null,
    item_id       varchar not null,
    cosine        double not null,
    primary key (run_id, template, user_id, sample, rank)
);

-- Mine: one row per cluster of paths. quality = mean Score = hits / n; 95% Wilson interval.
create table gvm_clusters (
    run_id     varchar not null,
    dataset    varchar not null,
    cluster    integer not null,
    n          integer not null,
    hits       integer not null,
    quality    double not null,
    ci_low     double not null,
    ci_high    double not null,
    eligible   boolean not null,           -- n >= the run's minimum cluster size
    chosen     boolean not null,           -- P*
    exemplars  varchar[],                  -- distinct paths nearest the centroid, nearest first
    primary key (run_id, cluster)
);

-- Mine outcome per run: how the clusters were made, what was chosen and why, the template.
create table gvm_patterns (
    run_id          varchar primary key,
    dataset         varchar not null,
    method          varchar not null,      -- kmeans | hdbscan
    k               integer not null,
    silhouettes     json,                  -- k -> silhouette coefficient (k-means)
    n_paths         integer not null,
    min_cluster_size integer not null,
    chosen_cluster  integer,
    verdict         varchar not null,      -- one sentence on how well the data supports it
    template        varchar,               -- templates.name of the Optimal CoT Template
    error           varchar                -- why no template was abstracted, when none was
);

-- Template abstraction: the Fig. 10 answer for the chosen cluster, with teacher provenance.
create table gvm_abstractions (
    run_id       varchar not null,
    cluster      integer not null,
    exemplars    varchar[] not null,        -- the paths shown to the teacher
    steps        varchar[],                 -- parsed from its "Best Path"
    work_key     varchar not null,
    call_key     varchar,
    prompt_name  varchar,
    prompt_hash  varchar,
    backend      varchar,
    model        varchar,
    sample       integer,
    draws        integer,
    cached       boolean,
    status       varchar not null,          -- ok | failed
    error        varchar,
    primary key (run_id, cluster)
);

-- Compare / transfer: LLM-as-recommender quality per template (SCoTER Table 11 / Table 3).
create table gvm_evals (
    run_id            varchar not null,
    dataset           varchar not null,    -- where the users come from
    template          varchar not null,
    template_dataset  varchar,             -- where a discovered template was mined
    steps             varchar[] not null,
    users             integer not null,
    answered          integer not null,    -- chains parsed (failed ones count as misses)
    recall            double not null,     -- Recall@20 over all users
    ndcg              double not null,     -- NDCG@20 over all users
    ci_low            double not null,
    ci_high           double not null,
    primary key (run_id, template)
);
