"""Quality filters for generated explanations; each gives a verdict with a reason.

TwiSTAR E.1.3 filters low-quality responses ("e.g., length < 30 tokens"). Factory adds the
checks that make a collaborative explanation useless as training text: an empty answer or a
refusal, an answer that names neither item of the pair, and a near-copy of another sample
already kept for the same pair. Every sample gets a row with its verdict, so what was
dropped, and why, stays queryable.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KEPT = "kept"
REJECTED = "rejected"
FAILED = "failed"

#: One token per word, number or punctuation mark: a tokenizer-independent count, so a
#: verdict does not change with the teacher. BPE tokenizers give at least as many tokens
#: for English text, so this never keeps what a model-token count would reject.
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)

_REFUSAL = re.compile(
    r"^\W*(?:i\s*(?:'m| am)\s+(?:sorry|unable|not able)|sorry\b|i\s+(?:can(?:no|')t|cannot|"
    r"apologi[sz]e|do(?:n't| not) have (?:enough|access|any))|as an ai\b|"
    r"unfortunately,? i\b|i\s+won't\b)",
    re.IGNORECASE,
)

_STOPWORDS = frozenset({
    "a", "an", "and", "the", "of", "in", "on", "for", "to", "with", "by", "from", "at", "or",
    "vs", "is", "are", "be", "this", "that", "these", "those", "it", "its", "de", "la", "le",
    "el", "los", "las", "der", "die", "das", "und", "set", "pack", "pcs", "piece", "pieces",
    "edition", "vol", "volume", "new",
})
_YEAR = re.compile(r"\(\s*\d{4}\s*\)")


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def _fold(text: str) -> str:
    """Lower case, accents removed, punctuation to spaces: for name matching."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def _content_words(title: str) -> set[str]:
    return {w for w in _fold(_YEAR.sub(" ", title)).split()
            if len(w) >= 3 and w not in _STOPWORDS and not w.isdigit()}


def names_item(text: str, title: str | None) -> bool:
    """Whether `text` names the item: its whole title, or at least half of its content words
    (so "the Coleman tent" names "Coleman 4-Person Instant Tent"), appear in the text."""
    if not title or not title.strip():
        return False
    folded = f" {_fold(text)} "
    whole = _fold(_YEAR.sub(" ", title))
    if whole and f" {whole} " in folded:
        return True
    words = _content_words(title)
    if not words:
        return False
    present = sum(1 for w in words if f" {w} " in folded)
    return present * 2 >= len(words)


@dataclass(frozen=True)
class Verdict:
    verdict: str
    reason: str | None = None

    @property
    def kept(self) -> bool:
        return self.verdict == KEPT


def judge_text(text: str, title_i: str | None, title_j: str | None,
               min_tokens: int = 30) -> Verdict:
    """The per-sample checks (everything but near-duplicates), first failure wins."""
    stripped = text.strip()
    if not stripped:
        return Verdict(REJECTED, "empty")
    if _REFUSAL.match(stripped):
        return Verdict(REJECTED, "refusal")
    n = count_tokens(stripped)
    if n < min_tokens:
        return Verdict(REJECTED, f"too short: {n} tokens < {min_tokens}")
    if not (names_item(stripped, title_i) or names_item(stripped, title_j)):
        return Verdict(REJECTED, "names neither item")
    return Verdict(KEPT)


def dedupe_samples(verdicts: Sequence[Verdict], vectors: np.ndarray, sample_ids: Sequence[int],
                   threshold: float = 0.95) -> list[Verdict]:
    """Reject a kept sample whose embedding is within `threshold` cosine of an earlier kept
    sample of the same pair (samples in sample-index order, so the first of a cluster stays).

    `vectors` has one row per sample (rows of non-kept samples are ignored); `sample_ids`
    name the samples in the reason."""
    out = list(verdicts)
    if not len(out) == len(vectors) == len(sample_ids):
        raise ValueError("one vector per sample is needed")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms == 0, 1.0, norms)
    kept: list[int] = []
    for k, v in enumerate(out):
        if not v.kept:
            continue
        if kept:
            sims = unit[kept] @ unit[k]
            best = int(np.argmax(sims))
            if sims[best] > threshold:
                out[k] = Verdict(REJECTED, f"near-duplicate of sample {sample_ids[kept[best]]} "
                                           f"(cosine {sims[best]:.3f} > {threshold})")
                continue
        kept.append(k)
    return out
