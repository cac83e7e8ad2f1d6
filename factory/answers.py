"""Parsers for teacher answers: ThinkRec keyword lists and Yes/No predictions with reasoning.

A parser either returns the structured answer or raises `MalformedAnswer` with a short reason;
the teacher layer then asks again with a new sample index (parse-and-retry), and a request
that never parses is recorded as failed. Nothing here invents a default answer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any


class MalformedAnswer(ValueError):
    """The teacher's text does not have the format the prompt asked for."""


_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_OPEN_THINK = re.compile(r"^\s*<think>(.*)$", re.DOTALL | re.IGNORECASE)


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) for reasoning models that wrap their thoughts in <think> tags.

    An unterminated <think> (the model ran out of tokens while thinking) leaves no answer.
    """
    thoughts = [m.strip() for m in _THINK.findall(text)]
    rest = _THINK.sub("", text)
    m = _OPEN_THINK.match(rest)
    if m:
        thoughts.append(m.group(1).strip())
        rest = ""
    return "\n\n".join(t for t in thoughts if t), rest.strip()


# -- keywords (ThinkRec B.1) -------------------------------------------------------------------
MAX_KEYWORDS = 10
_KW_PREFIX = re.compile(r"^\s*(?:here are[^:\n]*:|the keywords? (?:are|is)\s*:?|keywords?\s*:)",
                        re.IGNORECASE)
_KW_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\d+[.)]|\(\d+\))\s*")
_KW_SPLIT = re.compile(r"[,;\n\uff0c\u3001]")
_KW_EDGE = re.compile(r"^[\s\"'`*_#.:()\[\]{}]+|[\s\"'`*_#.:()\[\]{}]+$")
_MAX_KEYWORD_WORDS = 6


def normalise_keyword(raw: str) -> str:
    """Lower case, bullets/quotes/markdown stripped, inner whitespace collapsed."""
    kw = _KW_BULLET.sub("", raw)
    kw = _KW_EDGE.sub("", kw)
    return " ".join(kw.lower().split())


def parse_keywords(text: str, limit: int = MAX_KEYWORDS) -> list[str]:
    """Up to `limit` distinct normalised keywords from a comma-separated answer.

    Accepts commas, semicolons or one keyword per line, a leading "Keywords:" and list
    bullets. Entries longer than a short phrase are sentences, not keywords, and are dropped;
    an answer with no keyword at all is malformed.
    """
    _, answer = split_thinking(text)
    answer = _KW_PREFIX.sub("", answer.strip())
    seen: dict[str, None] = {}
    for piece in _KW_SPLIT.split(answer):
        kw = normalise_keyword(_KW_PREFIX.sub("", piece))
        if not any(ch.isalnum() for ch in kw) or len(kw.split()) > _MAX_KEYWORD_WORDS:
            continue
        seen.setdefault(kw, None)
    if not seen:
        raise MalformedAnswer("no keywords in the answer")
    return list(seen)[:limit]


# -- Yes/No predictions (ThinkRec B.2, B.3) -----------------------------------------------------
_LEAD = re.compile(r"^[\s>#*_\"'`\[(]*(?:(?:final\s+)?(?:answer|prediction)\s*[:\-]\s*"
                   r"[\s*_\"'`]*)?(yes|no)\b", re.IGNORECASE)
_STATED = re.compile(r"(?:final\s+answer|answer|prediction|verdict)\s*(?:is|:|-)\s*"
                     r"[\s*_\"'`]*(yes|no)\b", re.IGNORECASE)
_LEAD_CLEAN = re.compile(r"^[\s>#*_\"'`\[(]*(?:(?:final\s+)?(?:answer|prediction)\s*[:\-]\s*"
                         r"[\s*_\"'`]*)?(?:yes|no)\b[\s*_\"'`\])]*[.,:;!\-\u2014]*\s*",
                         re.IGNORECASE)


@dataclass(frozen=True)
class Prediction:
    """A parsed Yes/No answer: the decision and the reasoning that supports it."""

    answer: bool
    reasoning: str
    #: where the Yes/No word the decision was read from starts, counted back from the end of
    #: the answer (the answer ends the teacher's content; the thinking comes before it)
    from_end: int | None = field(default=None, compare=False)

    @property
    def label(self) -> str:
        return "Yes" if self.answer else "No"

    def as_text(self) -> str:
        """The trace in ThinkRec's training form: the decision first, then the reasoning."""
        return f"{self.label}. {self.reasoning}"


def parse_yes_no(text: str, reasoning: str | None = None) -> Prediction:
    """The decision a ThinkRec answer begins with (or states explicitly), and its reasoning.

    The decision is the leading Yes/No of the answer (after any <think> block); failing that,
    an explicit "answer/prediction: Yes|No" that is the only one stated. The reasoning is the
    thinking when the teacher is a reasoning model (`reasoning`: what the teacher layer
    separated from the answer, its reasoning_content or <think> blocks; or a <think> block
    still in `text`), else the answer without its leading decision. An answer with no
    decision, conflicting decisions or no reasoning is malformed.
    """
    thinking, answer = split_thinking(text)
    if reasoning and reasoning.strip():
        thinking = "\n\n".join(t for t in (reasoning.strip(), thinking) if t)
    if not answer:
        raise MalformedAnswer("no answer after the reasoning" if thinking else "empty answer")
    lead = _LEAD.match(answer)
    body = _LEAD_CLEAN.sub("", answer, count=1).strip() if lead else answer
    found = list(_STATED.finditer(body))
    stated = {m.group(1).lower() for m in found}
    if lead:
        stated.add(lead.group(1).lower())
    if len(stated) != 1:
        raise MalformedAnswer("conflicting Yes/No decisions" if stated
                              else "does not begin with Yes or No")
    decision = stated.pop() == "yes"
    reasoning = thinking or body
    if not reasoning:
        raise MalformedAnswer("a decision without reasoning")
    at = lead.start(1) if lead else found[0].start(1)     # without a lead, body is answer
    return Prediction(decision, reasoning, from_end=len(answer) - at)


def decision_probability(text: str, logprobs: list[dict[str, Any]] | None,
                         prediction: Prediction) -> float | None:
    """The probability the teacher gave the token its Yes/No decision was read from: `text`
    is its content as received, `logprobs` that content's tokens (--logprobs). None without
    logprobs, or when the tokens do not spell the content."""
    from factory.teacher.request import token_at

    if not logprobs or prediction.from_end is None:
        return None
    at = len(text.rstrip()) - prediction.from_end
    word = prediction.label.lower()
    if at < 0 or text[at:at + len(word)].lower() != word:
        return None
    token = token_at(logprobs, text, at)
    return math.exp(token["logprob"]) if token and token.get("logprob") is not None else None
