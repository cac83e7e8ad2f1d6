-- Semantic-ID quality per run (issue 12): how a collision was resolved and per-level spread.
-- collision_rate (012) stays the share of items whose L codes were shared before resolution.
alter table sid_runs add column collisions varchar;       -- strict (TwiSTAR A.2: L tokens,
                                                          -- nearest free last-level code) |
                                                          -- extra-level (TIGER / SCoTER A.1)
alter table sid_runs add column colliding_items bigint;   -- items whose L codes were shared
alter table sid_runs add column moved_items bigint;       -- strict: items moved to a free code
alter table sid_runs add column level_stats json;         -- per level: used, of, largest_share,
                                                          -- entropy_bits, perplexity,
                                                          -- prefix_collision_rate
