"""The canonical request: what is sent, and the content hash that caches it.

The key covers everything that determines an answer and nothing that does not: the
backend-independent model id, the rendered messages, the sampling parameters (logprobs
asked included), the job's sample index and the parse-retry draw. How a sample was asked (on
its own, or as one of the `n` choices of a request for several samples) is not part of it,
nor are the backend, URL, key, run and job, so a re-run, a resumed run, another job or
another backend serving the same model all hit the same cache row.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; None means "the backend's default" and is left out of the key."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    logprobs: int | None = None     # top alternatives per token (0-20); None: no logprobs

    def merged(self, override: Sampling) -> Sampling:
        """These parameters with every non-None field of `override` taking precedence."""
        mine = asdict(self)
        mine.update({k: v for k, v in asdict(override).items() if v is not None})
        return Sampling(**mine)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def derived_seed(seed: int, sample: int, draw: int) -> int:
    """The seed actually sent: the user's seed for the first draw of sample 0, else a new one.

    Without this, a parse-retry draw with a fixed seed would reproduce the malformed answer.
    """
    if sample == 0 and draw == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{sample}:{draw}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class Request:
    model: str
    messages: tuple[tuple[str, str], ...]      # (role, content), hashable
    params: tuple[tuple[str, Any], ...]        # sorted sampling parameters actually sent
    sample: int = 0
    draw: int = 0
    key: str = field(default="", compare=False)
    #: a request for several samples at once (`n`): the samples it stands for, in choice order
    members: tuple[Request, ...] = field(default=(), compare=False)
    #: canonical_json(), made once with the key (it is stored with every answer)
    text: str = field(default="", compare=False, repr=False)

    @classmethod
    def build(cls, model: str, messages: list[dict[str, str]], sampling: Sampling,
              sample: int = 0, draw: int = 0,
              response_format: dict[str, Any] | None = None) -> Request:
        """`response_format`: the OpenAI-compatible structured-output request (a JSON
        schema); it changes the answer, so it is a parameter like the sampling ones."""
        params: dict[str, Any] = sampling.as_dict()
        if "seed" in params:
            params["seed"] = derived_seed(params["seed"], sample, draw)
        if response_format is not None:
            params["response_format"] = response_format
        req = cls(model=model,
                  messages=tuple((m["role"], m["content"]) for m in messages),
                  params=tuple(sorted(params.items())), sample=sample, draw=draw)
        return req._keyed()

    @classmethod
    def group(cls, members: list[Request]) -> Request:
        """One request asking `n` choices for `members` (first draws of one setup that differ
        only in their sample): the first member's request, seed included, with `n`. Its key
        names the request (llm_calls.group_key); each choice is stored under its member's."""
        first = members[0]
        req = cls(model=first.model, messages=first.messages,
                  params=tuple(sorted((*first.params, ("n", len(members))))),
                  sample=first.sample, draw=first.draw, members=tuple(members))
        return req._keyed()

    def _keyed(self) -> Request:
        text = json.dumps(self.canonical(), sort_keys=True, ensure_ascii=False,
                          separators=(",", ":"))
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "key", hashlib.sha256(text.encode()).hexdigest())
        return self

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def canonical(self) -> dict[str, Any]:
        canonical = {"model": self.model, "messages": self.message_dicts(),
                     "params": self.param_dict(), "sample": self.sample, "draw": self.draw}
        if self.members:
            canonical["samples"] = [m.sample for m in self.members]
        return canonical

    def canonical_json(self) -> str:
        return self.text or json.dumps(self.canonical(), sort_keys=True, ensure_ascii=False,
                                       separators=(",", ":"))

    def estimated_input_tokens(self) -> int:
        """A deliberately generous estimate (UTF-8 bytes / 3, plus framing per message)."""
        return sum(len(c.encode("utf-8")) // 3 + 4 for _, c in self.messages) + 2


@dataclass
class Reply:
    """What a backend returns for one successful request."""

    text: str
    finish_reason: str | None
    input_tokens: int | None
    output_tokens: int | None
    raw: str                    # the response body as received (JSON text)
    latency_s: float = 0.0
    reasoning: str | None = None    # message.reasoning_content (a reasoning parser's output)
    #: per answer token: {"token", "logprob", "top_logprobs": [{"token", "logprob"}]}
    logprobs: list[dict[str, Any]] | None = None
    #: every choice of the response, in order, each with its own part of the body (`raw`) and
    #: its share of the tokens (the prompt on the first); empty: the reply is its only choice
    choices: list[Reply] = field(default_factory=list)

    def all_choices(self) -> list[Reply]:
        return self.choices or [self]

    @classmethod
    def of_choices(cls, choices: list[Reply], raw: str) -> Reply:
        """The reply to a whole request: the first choice's answer, the request's tokens
        (the choices' shares summed) and body, and every choice."""
        first = choices[0]
        return cls(first.text, first.finish_reason, _total(c.input_tokens for c in choices),
                   _total(c.output_tokens for c in choices), raw, reasoning=first.reasoning,
                   logprobs=first.logprobs, choices=choices)


def token_at(logprobs: list[dict[str, Any]], text: str, offset: int) -> dict[str, Any] | None:
    """The logprobs entry of the token that covers `text[offset]` (`text`: the content the
    tokens were generated as; an in-process answer is the tokens' text stripped), or None when
    the tokens do not spell it."""
    spelled = "".join(t.get("token") or "" for t in logprobs)
    base = spelled.find(text) if text else -1
    if base < 0:
        return None
    end = 0
    for entry in logprobs:
        end += len(entry.get("token") or "")
        if end > base + offset:
            return entry
    return None


def _total(counts: Any) -> int | None:
    known = [c for c in counts if c is not None]
    return sum(known) if known else None


def split_count(total: int | None, weights: list[float]) -> list[int | None]:
    """`total` (a request's completion tokens) split over its choices in proportion to
    `weights`, in whole tokens that add up to it exactly."""
    if total is None:
        return [None] * len(weights)
    whole = sum(weights)
    if whole <= 0:
        weights, whole = [1.0] * len(weights), float(len(weights))
    shares, done, running = [], 0, 0.0
    for w in weights:
        running += w
        upto = round(total * running / whole)
        shares.append(upto - done)
        done = upto
    return shares


_THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(thinking, answer) of a reply's content: <think>...</think> blocks are thinking; a
    closing </think> with no opening one (the chat template opened the block, as QwQ's and
    DeepSeek-R1's do) makes everything before it thinking; an unclosed <think> leaves no
    answer (the engine's truncation() has already called that cut). Content without a tag
    is returned as it is, at the cost of two substring tests."""
    if "hink>" not in text and "HINK>" not in text:     # <think>, <Think>, <THINK>
        return None, text
    thoughts = [m.strip() for m in _THINK_BLOCK.findall(text)]
    rest = _THINK_BLOCK.sub("", text)
    close = list(_THINK_CLOSE.finditer(rest))
    if close:                           # the template opened the block
        thoughts.insert(0, rest[:close[-1].start()].strip())
        rest = rest[close[-1].end():]
    opened = _THINK_OPEN.search(rest)
    if opened:                          # never closed: all of it is thinking
        thoughts.append(rest[opened.end():].strip())
        rest = rest[:opened.start()]
    thinking = "\n\n".join(t for t in thoughts if t)
    return thinking or None, rest.strip()


def join_reasoning(*parts: str | None) -> str | None:
    """The thinking from several sources (reasoning_content, inline), or None."""
    text = "\n\n".join(p.strip() for p in parts if p and p.strip())
    return text or None
