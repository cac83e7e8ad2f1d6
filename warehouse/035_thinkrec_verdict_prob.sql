-- ThinkRec verdict confidence (issue 17): with `--logprobs K` the teacher's per-token logprobs
-- are stored (llm_calls.logprobs); the probability it gave the token its Yes/No decision was
-- read from is kept beside the prediction. NULL without --logprobs, for failed turns, and
-- when the server's tokens do not spell the answer. The `traces` view lists its columns by
-- name, so it is unchanged; its call_key joins llm_calls.logprobs.
alter table thinkrec_turns add column verdict_prob double;    -- of this turn's Yes/No token
alter table thinkrec_traces add column verdict_prob double;   -- of the last turn's
