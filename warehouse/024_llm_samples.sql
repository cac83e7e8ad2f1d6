-- Several samples in one request, and logprobs (issue 17).
--
-- `--n-per-request K` asks up to K samples of one setup (work items that differ only in their
-- sample index) in one request with `n` = K; the provider charges the prompt once. Each choice
-- is still its own row, under the key its sample has when asked alone (so switching between
-- the two ways never pays twice), with the canonical request of that sample. These columns
-- record the request that produced it; NULL for a sample asked on its own. The request's
-- tokens and cost are split over its rows so that they add up: the prompt tokens on choice 0
-- (0 on the others), the completion tokens in proportion to each choice's tokens (its length
-- when the server lists no per-token logprobs). `response` holds the choice's own part of
-- the body (the body with that one choice), not the whole n-choice body n times.
alter table llm_calls add column group_key varchar;   -- key of the n-request (its canonical
                                                      -- request: the first sample's, with n)
alter table llm_calls add column choice integer;      -- index among that request's choices

-- `--logprobs K` (part of the request and its key): per answer token,
-- [{"token", "logprob", "top_logprobs": [{"token", "logprob"}, ... K]}, ...]; NULL when not
-- asked. The choice's `response` leaves them out (they are here).
alter table llm_calls add column logprobs json;
