"""Parsers for the teacher's answers in Generate-Validate-Mine (SCoTER Fig. 9 and Fig. 10).

Teachers follow formats loosely: tags go missing, repeat, nest or come out of order, a
reasoning model drafts the whole answer inside <think> first, and item descriptions contain
angle brackets of their own ("<5 lbs", "<Brand X>"). The parser therefore recognises only
the tags it knows, treats every other angle bracket as text, and either returns what it
found (with warnings saying what it had to tolerate) or raises ParseFailure with a one-line
reason. It never fills anything in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KNOWN_TAGS = ("cot_path", "reason", "recommendations", "item", "think")
_TAG = re.compile(r"<\s*(/?)\s*(" + "|".join(KNOWN_TAGS) + r")\s*>", re.IGNORECASE)
_ARROW = re.compile(r"\s*(?:-{1,2}>|=>|→|⟶|⇒|—>|–>)\s*")
_STEP_PREFIX = re.compile(r"^(?:step\s*\d+\s*[:.)-]\s*|\d+\s*[.)]\s+)", re.IGNORECASE)
_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+\s*[.)])\s+(.*\S)\s*$")
_PLACEHOLDER_PATH = re.compile(
    r"summarize the core reasoning path|^\s*step\s*1\s*->\s*step\s*2", re.IGNORECASE
)
_PLACEHOLDER_ITEM = re.compile(r"^detailed feature description of product\b", re.IGNORECASE)
_PLACEHOLDER_STEP = re.compile(r"^(?:step\s*(?:\d+|k|n)|\.\.\.|…)$", re.IGNORECASE)
_BEST_PATH = re.compile(r"best\s+path\b[^\n:]*:", re.IGNORECASE)
_TAGGED_PATH = re.compile(r"[\s*_`\[]*<\s*cot_path\s*>(.*?)(?:<\s*/\s*cot_path\s*>|\n\s*\n|$)",
                          re.IGNORECASE | re.DOTALL)
_STRIP = " \t\r\n*_`\"'[]{}.;:"


class ParseFailure(ValueError):  # noqa: N818 - a verdict, not a crash
    """The answer cannot be used; the message is the one-line reason stored with the row."""


@dataclass(frozen=True)
class Generation:
    """One parsed Fig. 9 answer."""

    cot_path: str
    steps: list[str]
    reason: str | None
    items: list[str]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Tag:
    start: int
    end: int
    name: str
    closing: bool


@dataclass(frozen=True)
class _Block:
    start: int  # where the opening tag starts
    content: str
    closed: bool


def _tags(text: str) -> list[_Tag]:
    return [_Tag(m.start(), m.end(), m.group(2).lower(), bool(m.group(1)))
            for m in _TAG.finditer(text)]


def _strip_known_tags(text: str) -> str:
    return _TAG.sub(" ", text)


def _drop_thinking(text: str, warnings: list[str]) -> str:
    """Remove <think> drafts; an answer that never leaves <think> has no answer."""
    lower = text.lower()
    if "</think>" in lower and "<think>" not in lower:
        warnings.append("answer began inside <think>; used the text after </think>")
        return text[lower.rindex("</think>") + len("</think>"):]
    out, pos = [], 0
    for m in re.finditer(r"<\s*think\s*>", text, re.IGNORECASE):
        if m.start() < pos:
            continue
        out.append(text[pos:m.start()])
        close = re.compile(r"<\s*/\s*think\s*>", re.IGNORECASE).search(text, m.end())
        if close is None:
            rest = "".join(out)
            if not _TAG.search(rest):
                raise ParseFailure("answer cut off inside <think>")
            warnings.append("unclosed <think>; used the text before it")
            return rest
        pos = close.end()
    out.append(text[pos:])
    return "".join(out)


def _blocks(text: str, tags: list[_Tag], name: str, stop: tuple[str, ...]) -> list[_Block]:
    """Every <name> block. An unclosed block ends at the next opening tag named in `stop`;
    a nested block of the same name is folded into the outer one."""
    found: list[_Block] = []
    consumed = 0
    for i, tag in enumerate(tags):
        if tag.name != name or tag.closing or tag.start < consumed:
            continue
        end, after, closed = len(text), len(text), False
        for later in tags[i + 1:]:
            if later.name == name and later.closing:
                end, after, closed = later.start, later.end, True
                break
            if later.name in stop and not later.closing:
                end = after = later.start
                break
        found.append(_Block(tag.start, text[tag.end:end], closed))
        consumed = after
    return found


def _clean(text: str) -> str:
    return " ".join(_strip_known_tags(text).split()).strip()


def split_steps(path: str) -> list[str]:
    """`A -> B -> C` into ["A", "B", "C"]; numbering, brackets and markdown removed."""
    steps = []
    for part in _ARROW.split(" ".join(path.split())):
        step = _STEP_PREFIX.sub("", part.strip(_STRIP)).strip(_STRIP)
        if step:
            steps.append(step)
    return steps


def _items_from(block: str) -> tuple[list[str], bool]:
    """Items of a <recommendations> block: its <item> tags, else its list lines."""
    tags = _tags(block)
    if any(t.name == "item" for t in tags):
        raw = [b.content for b in _blocks(block, tags, "item", ("item", "recommendations"))]
        return [c for c in map(_clean, raw) if c and not _PLACEHOLDER_ITEM.match(c)], False
    lines = [m.group(1) for m in map(_LIST_LINE.match, block.splitlines()) if m]
    return [c for c in map(_clean, lines) if c and not _PLACEHOLDER_ITEM.match(c)], True


def parse_generation(text: str | None, n_items: int = 20, max_step_words: int = 8) -> Generation:
    """Parse a Fig. 9 answer into path, steps, elaboration and up to `n_items` items.

    Repeated blocks: the last recommendations block with items wins, and the last real
    (non-placeholder) <cot_path> before it, so an echoed format or an early draft loses.
    """
    if text is None or not text.strip():
        raise ParseFailure("empty answer")
    warnings: list[str] = []
    text = _drop_thinking(text, warnings)
    tags = _tags(text)

    recs = [(b, *_items_from(b.content)) for b in
            _blocks(text, tags, "recommendations", ("cot_path", "reason", "recommendations"))]
    recs = [r for r in recs if r[1]]
    if recs:
        rec_block, items, from_lines = recs[-1]
        if len(recs) > 1:
            warnings.append(f"{len(recs)} <recommendations> blocks; used the last")
        if from_lines:
            warnings.append("no <item> tags; read the list lines of <recommendations>")
        anchor = rec_block.start
    else:
        loose = _blocks(text, tags, "item", ("item", "recommendations", "cot_path", "reason"))
        items = [c for c in (_clean(b.content) for b in loose)
                 if c and not _PLACEHOLDER_ITEM.match(c)]
        if items:
            warnings.append("no <recommendations> block; used <item> tags found elsewhere")
        anchor = len(text)
    if not items:
        raise ParseFailure("no recommended items")

    paths = [(b, _clean(b.content)) for b in
             _blocks(text, tags, "cot_path", ("cot_path", "reason", "recommendations", "item"))]
    if any(_TAG.search(b.content) for b, _ in paths):
        warnings.append("nested tags inside <cot_path>")
    real = [(b, p) for b, p in paths if p and not _PLACEHOLDER_PATH.search(p)]
    if not real:
        raise ParseFailure("no <cot_path>" if not paths else "<cot_path> holds no path")
    before = [(b, p) for b, p in real if b.start < anchor]
    path_block, cot_path = (before or real)[-1]
    if len(real) > 1:
        warnings.append(f"{len(real)} <cot_path> blocks; used the one before the items")
    if not before:
        warnings.append("out of order: <cot_path> after the recommendations")
    if not path_block.closed:
        warnings.append("unclosed <cot_path>")
    steps = split_steps(cot_path)
    if len(steps) < 2:
        raise ParseFailure(f"<cot_path> has {len(steps)} step(s); at least 2 are required")
    long = [i + 1 for i, s in enumerate(steps) if len(s.split()) > max_step_words]
    if long:
        warnings.append(f"steps {long} longer than {max_step_words} words")

    reasons = [(b, _clean(b.content)) for b in
               _blocks(text, tags, "reason", ("cot_path", "reason", "recommendations", "item"))]
    reasons = [(b, r) for b, r in reasons if r]
    reason = None
    if not reasons:
        warnings.append("no <reason>")
    else:
        after = [(b, r) for b, r in reasons if path_block.start < b.start < anchor]
        block, reason = (after or reasons)[-1]
        if not after:
            warnings.append("out of order: <reason> not between <cot_path> and the items")

    if len(items) > n_items:
        warnings.append(f"{len(items)} items; kept the first {n_items}")
        items = items[:n_items]
    elif len(items) < n_items:
        warnings.append(f"only {len(items)} of {n_items} items")
    return Generation(" -> ".join(steps), steps, reason, items, warnings)


def parse_best_path(text: str | None) -> list[str]:
    """The steps of the "Best Path" line of a Fig. 10 answer (the Optimal CoT Template).

    The label may carry markdown and the path may sit on the next line or inside
    <cot_path>; an echo of the prompt's own "[Step1 -> Step2 -> ...]" is skipped.
    """
    if text is None or not text.strip():
        raise ParseFailure("empty answer")
    text = _drop_thinking(text, [])
    candidates = []
    for m in _BEST_PATH.finditer(text):
        rest = text[m.end():]
        tagged = _TAGGED_PATH.match(rest)
        if tagged:
            line = tagged.group(1)
        else:
            lines = [ln for ln in rest.splitlines() if ln.strip(_STRIP)]
            if not lines:
                continue
            line = lines[0]
        steps = split_steps(_clean(line))
        if len(steps) >= 2 and not any(_PLACEHOLDER_STEP.match(s) for s in steps):
            candidates.append(steps)
    if not candidates:
        raise ParseFailure("no 'Best Path' with at least 2 steps in the answer")
    return candidates[-1]
