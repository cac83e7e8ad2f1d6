-- ThinkRec user groups and expert gate (sec. 3.3, eq. 8-10). A grouping is a named run over a
-- split's train part: collaborative user features, k-means groups, expert representations
-- (group means), each user's participation weights and gate decision.
create table user_groupings (
    dataset             varchar not null,
    name                varchar not null,
    split               varchar not null,
    method              varchar not null,        -- how the user features were learned
    dim                 integer not null,
    n_groups            integer not null,
    tau                 double not null,
    seed                integer not null,
    explained_variance  double,
    counts              json,                    -- users per gate decision, per group
    run_id              varchar not null,
    created_at          timestamp not null default current_timestamp,
    primary key (dataset, name)
);

create table user_group_experts (
    dataset         varchar not null,
    grouping        varchar not null,
    group_id        integer not null,
    n_users         integer not null,
    representation  double[] not null,           -- mean user feature of the group (eq. 8)
    primary key (dataset, grouping, group_id)
);

create table user_groups (
    dataset     varchar not null,
    grouping    varchar not null,
    user_id     varchar not null,
    group_id    integer not null,                -- k-means cluster (its data trains expert group_id)
    weights     double[] not null,               -- participation softmax(cos / tau) (eq. 8)
    entropy     double not null,                 -- H(w) (eq. 9)
    max_weight  double not null,
    gate        varchar not null,                -- global | single | fused (eq. 10)
    expert      integer,                         -- argmax w when gate = 'single'
    feature     float[] not null,                -- the user's L2-normalised latent feature
    primary key (dataset, grouping, user_id)
);
