-- Training (issue 12): every run is ranked under both evaluation protocols (train/metrics.py).
--   full    the whole catalog, history included: SCoTER 4.1 / TwiSTAR 5 (the default)
--   masked  the user's history items excluded from the ranking
-- `valid`/`test` stay the metrics under `protocol`, the one that chose the best epoch.
alter table train_runs add column protocol varchar;
alter table train_runs add column valid_full json;
alter table train_runs add column test_full json;
alter table train_runs add column valid_masked json;
alter table train_runs add column test_masked json;

-- Earlier runs ranked under one protocol only: masked unless run with --no-mask-history.
update train_runs set protocol = case when params->>'mask_history' = 'false' then 'full'
                                     else 'masked' end
 where params is not null;
update train_runs set valid_masked = valid, test_masked = test where protocol = 'masked';
update train_runs set valid_full = valid, test_full = test where protocol = 'full';

-- Semantic IDs exported into a cache's items.parquet (`export cache --sids`): null, or
-- {"run_id", "levels", ...}; item text embeddings are in item_text already.
alter table train_caches add column sid json;
