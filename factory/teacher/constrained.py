"""Grammar-constrained decoding for the in-process transformers backend (llguidance).

A request whose params carry an OpenAI-style `response_format` (a JSON schema) is decoded
under that schema: at every step the tokens that cannot continue a conforming answer get
-inf. llguidance (the Rust library behind the `guidance` structured-output backend of vLLM,
SGLang and llama.cpp) was chosen because it installs from PyPI as one 3 MB wheel with no
dependencies, reads any fast tokenizer, builds no per-schema index, and adds about 10 ms
per step to a batch of 8 on this project's busy 2-core machine (a small share of SmolLM2's
own step there); xgrammar (vLLM's default) pulls triton onto CPU machines; lm-format-enforcer (pure
Python) and outlines (an index built per schema) were not measured.

Rows of one batch may carry different schemas, or none: each row has its own matcher, and a
row without one generates freely.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from factory.teacher.limits import RequestError

#: no free whitespace between JSON tokens (a small model could emit it until max_tokens);
#: the separators are the ones models see in ordinary JSON
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def schema_of(params: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a request's params ask for, or None; RequestError for a
    response_format other than json_schema (the only one the engine sends)."""
    fmt = params.get("response_format")
    if not fmt:
        return None
    try:
        assert fmt["type"] == "json_schema"
        schema = fmt["json_schema"]["schema"]
        assert isinstance(schema, dict)
    except (AssertionError, KeyError, TypeError):
        raise RequestError(f"response_format {json.dumps(fmt)[:200]}: only "
                           "{type: json_schema, json_schema: {schema: ...}} is supported") from None
    return schema


@functools.lru_cache(maxsize=128)
def _grammar(schema_json: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(schema_json, overrides=JSON_OPTIONS)


def grammar_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of a Hugging Face fast tokenizer (about 0.4 s: keep it per model)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer)


class SchemaMask:
    """A transformers logits processor: row i of the batch stays inside schemas[i] (None:
    free). Called once per step with the ids so far (the prompt is `prompt_len` wide) and the
    next-token scores; a row's matcher consumes the token chosen for it at the last step."""

    def __init__(self, tokenizer: Any, schemas: list[dict[str, Any] | None], prompt_len: int):
        import llguidance

        self.prompt_len = prompt_len
        self.matchers: list[Any] = []
        #: per row, why its schema cannot be used (llguidance's message), else None
        self.errors: list[str | None] = []
        for schema in schemas:
            matcher = error = None
            if schema is not None:
                matcher = llguidance.LLMatcher(tokenizer, _grammar(json.dumps(schema)),
                                               log_level=0)
                if matcher.is_error():
                    matcher, error = None, matcher.get_error()
            self.matchers.append(matcher)
            self.errors.append(error)
        self.done = [m is None for m in self.matchers]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import numpy as np
        import torch

        if input_ids.shape[1] > self.prompt_len:      # the token chosen at the last step
            for row, token in enumerate(input_ids[:, -1].tolist()):
                matcher = self.matchers[row]
                if self.done[row] or matcher is None:
                    continue
                if matcher.is_stopped() or not matcher.consume_token(token):
                    self.done[row] = True     # complete (that token was EOS), or broken
        rows = [r for r, done in enumerate(self.done) if not done]
        if not rows:
            return scores
        vocab = scores.shape[1]       # may exceed the tokenizer's: those ids stay masked
        allowed = np.ones(tuple(scores.shape), dtype=bool)     # free rows: everything
        for row in rows:
            bits = np.unpackbits(np.frombuffer(self.matchers[row].compute_bitmask(), np.uint8),
                                 bitorder="little")
            n = min(vocab, bits.size)
            allowed[row, :n] = bits[:n]
            allowed[row, n:] = False
        # in place over the whole batch: indexing the constrained rows costs 10x more
        scores.masked_fill_(torch.from_numpy(~allowed).to(scores.device), float("-inf"))
        return scores
