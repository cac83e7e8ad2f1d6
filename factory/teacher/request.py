"""The canonical request: what is sent, and the content hash that caches it.

The key covers everything that determines an answer and nothing that does not: the
backend-independent model id, the rendered messages, the sampling parameters, the job's
sample index and the parse-retry draw. The backend, URL, key, run and job are not part of it,
so a re-run, a resumed run, another job or another backend serving the same model all hit the
same cache row.
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
        object.__setattr__(req, "key", hashlib.sha256(req.canonical_json().encode()).hexdigest())
        return req

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def canonical(self) -> dict[str, Any]:
        return {"model": self.model, "messages": self.message_dicts(),
                "params": self.param_dict(), "sample": self.sample, "draw": self.draw}

    def canonical_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True, ensure_ascii=False,
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
