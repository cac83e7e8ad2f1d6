"""Parsers for teacher answers and the explanation quality filters (no teacher needed)."""

from __future__ import annotations

import numpy as np
import pytest

from factory.answers import MalformedAnswer, parse_keywords, parse_yes_no, split_thinking
from factory.quality import (
    KEPT,
    REJECTED,
    Verdict,
    count_tokens,
    dedupe_samples,
    judge_text,
    names_item,
)


# -- keywords -----------------------------------------------------------------------------------
def test_keywords_normalised_deduplicated_and_capped():
    text = ("Keywords: Science Fiction, space travel; *Robots*, science   fiction, \"AI\",\n"
            "1. Dystopia\n2) Time Travel, heroism, friendship, war, aliens, family, music, art")
    kws = parse_keywords(text)
    assert kws == ["science fiction", "space travel", "robots", "ai", "dystopia",
                   "time travel", "heroism", "friendship", "war", "aliens"]
    assert len(kws) == 10


def test_keywords_drop_sentences_and_thinking():
    text = "<think>they want keywords</think>comedy, This movie is about a family that moves, drama"
    assert parse_keywords(text) == ["comedy", "drama"]


@pytest.mark.parametrize("bad", ["", "   ", "Keywords:", "<think>hmm</think>", "~~~#%$@~~~",
                                 "This is a long sentence about the item with no keyword list"])
def test_keywords_malformed(bad):
    with pytest.raises(MalformedAnswer):
        parse_keywords(bad)


# -- yes / no -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,answer,reasoning", [
    ("Yes. The user likes thrillers.", True, "The user likes thrillers."),
    ("**No**, because they dislike horror.", False, "because they dislike horror."),
    ("yes - fits the sci-fi pattern", True, "fits the sci-fi pattern"),
    ("Answer: No. Too slow-paced.", False, "Too slow-paced."),
    ("The user enjoys comedies and this is one.\nFinal answer: Yes", True,
     "The user enjoys comedies and this is one.\nFinal answer: Yes"),
    ("<think>Sci-fi fan, so likely yes.</think>\nYes", True, "Sci-fi fan, so likely yes."),
])
def test_yes_no_parsed(text, answer, reasoning):
    p = parse_yes_no(text)
    assert p.answer is answer
    assert p.reasoning == reasoning
    assert p.as_text().startswith("Yes. " if answer else "No. ")


@pytest.mark.parametrize("bad,why", [
    ("", "empty"),
    ("Maybe, hard to say.", "does not begin"),
    ("Answer: yes. On reflection, my final answer: no", "conflicting"),
    ("Yes.", "without reasoning"),
    ("<think>still thinking when the tokens ran out", "no answer"),
    ("Yesterday the user watched a comedy.", "does not begin"),
])
def test_yes_no_malformed(bad, why):
    with pytest.raises(MalformedAnswer, match=why):
        parse_yes_no(bad)


def test_split_thinking():
    assert split_thinking("<think> a </think> b") == ("a", "b")
    assert split_thinking("plain") == ("", "plain")


# -- explanation filters ------------------------------------------------------------------------
LONG = ("Users who buy the Coleman Instant Tent often also buy a sleeping bag because both are "
        "needed for a first camping trip, and people who set up a tent quickly want to sleep "
        "comfortably in it the same night.")


def test_token_count_counts_words_and_punctuation():
    assert count_tokens("Hello, world!") == 4


def test_names_item_whole_title_or_half_its_words():
    assert names_item("I loved Toy Story as a kid", "Toy Story (1995)")
    assert names_item(LONG, "Coleman 4-Person Instant Tent")
    assert not names_item("A film about toys", "Toy Story (1995)")
    assert not names_item("anything", None)


def test_judge_text_verdicts():
    assert judge_text(LONG, "Coleman Instant Tent", "Sleeping Bag") == Verdict(KEPT)
    assert judge_text("  ", "a", "b").reason == "empty"
    assert judge_text("I'm sorry, but I cannot help with that request. " * 5, "x",
                      "y").reason == "refusal"
    short = judge_text("The Coleman tent and a bag go together.", "Coleman Tent", "Bag")
    assert short.verdict == REJECTED and short.reason.startswith("too short: 9 tokens")
    assert judge_text(LONG, "Garmin Watch", "Kayak Paddle").reason == "names neither item"
    assert judge_text(LONG, "Garmin Watch", "Kayak Paddle", min_tokens=5).reason == \
        "names neither item"


def test_dedupe_keeps_first_of_near_duplicates():
    vecs = np.array([[1.0, 0.0], [0.99, 0.05], [0.0, 1.0], [1.0, 0.0]])
    verdicts = [Verdict(KEPT), Verdict(KEPT), Verdict(KEPT), Verdict(REJECTED, "empty")]
    out = dedupe_samples(verdicts, vecs, [0, 1, 2, 3], threshold=0.95)
    assert out[0].kept and out[2].kept
    assert out[1].verdict == REJECTED and out[1].reason.startswith("near-duplicate of sample 0")
    assert out[3].reason == "empty"
    with pytest.raises(ValueError):
        dedupe_samples(verdicts, vecs[:2], [0, 1, 2, 3])
