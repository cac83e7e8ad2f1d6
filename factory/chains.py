"""Structured reasoning chains (SCoTER 3.3.1): parse a rationale into exactly K ordered steps.

The Fig. 11 instruction asks for "**Overall Analysis**", then one section per step of the
reasoning pattern, then "**Summary**". A chain is kept only when every template step has
exactly one heading, in template order, with text under it; the K step texts become
c_1..c_K (and later the rows of H_i). Overall Analysis is required and must come first; it
is stored beside the steps but is not one of them. Summary is optional (the paper's own
Fig. 11 output ends with the last step) and, when present, must come last. Anything else is
a rejected verdict with the reason, never a repaired chain.

Headings are recognised at the start of a line in the shapes models write them:
`**Step:** text`, `**Step**: text`, `### Step`, `1. **Step:**`, `Step 2: Step name:`,
`- Step: text`; names match ignoring case, punctuation and a trailing parenthetical.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

OVERALL = "Overall Analysis"
SUMMARY = "Summary"
KEPT, REJECTED = "kept", "rejected"

_PREFIX = re.compile(r"[ \t]*(?:#{1,6}[ \t]*)?(?:[-*+•][ \t]+)?(?:\d{1,2}[.)][ \t]+)?")
_STEP_NO = re.compile(r"^\s*step\s*\d{1,2}\s*[:.)\-–—]\s*", re.I)
_PAREN = re.compile(r"\s*\([^()]*\)\s*$")
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_MAX_LABEL = 150
_JOINERS = {"and", "then", "plus", "with", "step", "steps", "to"} | {str(i) for i in range(10)}


def norm(name: str) -> str:
    """A step name for matching: lower case, '&' as 'and', punctuation as spaces."""
    text = name.lower().replace("&", " and ")
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


@dataclass(frozen=True)
class ParsedChain:
    """A verdict on one rationale; `steps` holds the K step texts, in order, when kept."""

    verdict: str
    reason: str | None
    overall: str | None = None
    steps: tuple[str, ...] = ()
    summary: str | None = None

    @property
    def kept(self) -> bool:
        return self.verdict == KEPT


@dataclass(frozen=True)
class _Section:
    kind: str  # overall | summary | step | merged
    steps: tuple[int, ...]  # template indices (0-based) for step and merged
    start: int  # offset of the heading line
    body: int  # offset where the section's text begins


def _label(line: str) -> tuple[str, int] | None:
    """(label, offset of the text after it) when the line opens like a heading."""
    prefix = _PREFIX.match(line)
    assert prefix is not None  # the pattern matches the empty string
    rest_at = prefix.end()
    step_no = _STEP_NO.match(line[rest_at:])
    if step_no:
        rest_at += step_no.end()
    rest = line[rest_at:]
    for mark in ("**", "__"):
        if rest.startswith(mark):
            close = rest.find(mark, 2)
            if close == -1:
                return None
            after = close + 2
            colon = re.match(r"[ \t]*:", rest[after:])
            if colon:
                after += colon.end()
            return rest[2:close], rest_at + after
    colon = rest.find(":")
    if colon == -1:
        if "#" not in prefix.group(0):
            return None
        return rest, len(line)
    return rest[:colon], rest_at + colon + 1


def _classify(label: str, names: list[str]) -> tuple[str, tuple[int, ...]] | None:
    label = _STEP_NO.sub("", label.strip().strip("*_").strip().rstrip(":").strip())
    if not label or len(label) > _MAX_LABEL:
        return None
    key = norm(_PAREN.sub("", label))
    if key in names:
        return "step", (names.index(key),)
    if key == norm(OVERALL):
        return "overall", ()
    if key == norm(SUMMARY):
        return "summary", ()
    padded = f" {key} "
    inside = [j for j, n in enumerate(names) if f" {n} " in padded]
    # a name found only as part of a longer matched name does not count twice
    inside = [j for j in inside if not any(i != j and names[j] in names[i] for i in inside)]
    if len(inside) < 2:
        return None
    for j in sorted(inside, key=lambda j: -len(names[j])):
        padded = padded.replace(f" {names[j]} ", "  ", 1)
    if set(padded.split()) <= _JOINERS:  # nothing but the names and words joining them
        return "merged", tuple(sorted(inside))
    return None


def _sections(text: str, names: list[str]) -> list[_Section]:
    found = []
    offset = 0
    for line in text.splitlines(keepends=True):
        head = _label(line.rstrip("\r\n"))
        if head is not None:
            kind = _classify(head[0], names)
            if kind is not None:
                found.append(_Section(kind[0], kind[1], offset, offset + head[1]))
        offset += len(line)
    return found


def _clean(body: str) -> str:
    """The section's text; markdown rules and stray emphasis alone count as empty."""
    body = body.strip()
    return body if re.sub(r"[\s*_#\-=]", "", body) else ""


def _quote(j: int, steps: Sequence[str]) -> str:
    return f"step {j + 1} {steps[j]!r}"


def parse_chain(text: str | None, steps: Sequence[str]) -> ParsedChain:
    """Split a rationale into Overall Analysis, the K template steps and Summary."""

    def reject(reason: str) -> ParsedChain:
        return ParsedChain(REJECTED, reason)

    if not steps:
        raise ValueError("a template needs at least one step")
    if text is None or not text.strip():
        return reject("empty answer")
    if re.search(r"<think>", text, re.I) and not re.search(r"</think>", text, re.I):
        return reject("reasoning not finished (<think> without </think>)")
    text = _THINK.sub("", text)
    names = [norm(s) for s in steps]
    sections = _sections(text, names)

    merged = [s for s in sections if s.kind == "merged"]
    if merged:
        a, b = merged[0].steps[:2]
        return reject(f"{_quote(a, steps)} and {_quote(b, steps)} merged under one heading")
    by_step: dict[int, list[_Section]] = {j: [] for j in range(len(steps))}
    for s in sections:
        if s.kind == "step":
            by_step[s.steps[0]].append(s)
    missing = [j for j, found in by_step.items() if not found]
    if missing:
        listed = ", ".join(_quote(j, steps) for j in missing)
        return reject(f"missing {listed}")
    repeated = [j for j, found in by_step.items() if len(found) > 1]
    if repeated:
        j = repeated[0]
        return reject(f"{_quote(j, steps)} appears {len(by_step[j])} times")
    overall = [s for s in sections if s.kind == "overall"]
    summary = [s for s in sections if s.kind == "summary"]
    if not overall:
        return reject(f"missing {OVERALL}")
    for kind, found in ((OVERALL, overall), (SUMMARY, summary)):
        if len(found) > 1:
            return reject(f"{kind} appears {len(found)} times")
    order = [by_step[j][0] for j in range(len(steps))]
    for j in range(1, len(steps)):
        if order[j].start < order[j - 1].start:
            return reject(f"steps out of order: {_quote(j, steps)} comes before "
                          f"{_quote(j - 1, steps)}")
    if overall[0].start > order[0].start:
        return reject(f"{OVERALL} comes after {_quote(0, steps)}")
    if summary and summary[0].start < order[-1].start:
        return reject(f"{SUMMARY} comes before {_quote(len(steps) - 1, steps)}")

    bounds = sorted(sections, key=lambda s: s.start)
    ends = {id(s): (bounds[i + 1].start if i + 1 < len(bounds) else len(text))
            for i, s in enumerate(bounds)}

    def body(s: _Section) -> str:
        return _clean(text[s.body:ends[id(s)]])

    step_texts = tuple(body(s) for s in order)
    for j, t in enumerate(step_texts):
        if not t:
            return reject(f"{_quote(j, steps)} is empty")
    overall_text = body(overall[0])
    if not overall_text:
        return reject(f"{OVERALL} is empty")
    summary_text = body(summary[0]) if summary else None
    return ParsedChain(KEPT, None, overall_text, step_texts, summary_text or None)


def render_chain(steps: Sequence[str], chain: ParsedChain) -> str:
    """A kept chain in the Fig. 11 format: what the student is trained to write."""
    if not chain.kept:
        raise ValueError("only kept chains can be rendered")
    parts = [f"**{OVERALL}:** {chain.overall}"]
    parts += [f"**{name}:** {text}" for name, text in zip(steps, chain.steps, strict=True)]
    if chain.summary:
        parts.append(f"**{SUMMARY}:** {chain.summary}")
    return "\n\n".join(parts)
