-- A reasoning model's thinking, stored apart from its answer (issue 12). It arrives either in
-- `message.reasoning_content` (vLLM's reasoning parsers, DeepSeek's API; `reasoning` on some
-- servers) or inline in the content as <think>...</think> (or only a closing </think> when
-- the chat template opened the block). `text` stays the content as received; `reasoning`
-- holds the thinking from either source (both, joined by a blank line, if a server sends
-- both); NULL when the model did not think. Parsers get the answer without the thinking.
alter table llm_calls add column reasoning varchar;

-- answers stored before this column: their inline thinking, so SQL over old rows agrees
update llm_calls
set reasoning = nullif(trim(regexp_extract(text, '(?is)<think>(.*?)</think>', 1),
                            ' ' || chr(9) || chr(10) || chr(13)), '')
where status = 'ok' and text ilike '%<think>%</think>%';
