"""The chain parser: exactly K ordered steps named by the template, or a rejected verdict."""

from __future__ import annotations

import pytest

from factory.chains import KEPT, REJECTED, ParsedChain, norm, parse_chain, render_chain

BEAUTY = ["Analyze sequential purchase history", "Distinguish stable vs. recent interests",
          "Expand via shared item attributes", "Predict high-confidence features",
          "Item Recommendation"]

# SCoTER Fig. 11, the model output verbatim (it ends with the last step, no Summary)
FIG11 = """**Overall Analysis:** The user demonstrates a clear focus on detailed personal grooming. Their behavior suggests a preference for "professional-grade" home beauty solutions, transitioning from expressive decoration to functional care.

**Analyze sequential purchase history:** The sequence begins with vibrant hand aesthetics (Items 1-2), prioritizing visual impact. It then shifts chronologically towards corrective facial skincare (Items 3-4), indicating a move from purely decorative cosmetics to functional, skin-improving formulations.

**Distinguish stable vs. recent interests:** **Stable:** A consistent demand for "Salon-quality/Professional tools" (e.g., OPI brand, 15-color palette). **Recent:** The immediate focus has pivoted to "Skin Health" and "Restoration" (whitening, moisturizing), showing a specific intent to improve skin condition rather than just painting over it.

**Expand via shared item attributes:** We synthesize the *Location* from the stable history (Hands) with the *Function* from the recent history (Therapeutic/Skin Softening). The expansion leads to "Restorative Hand Treatments."

**Predict high-confidence features:** The next item should likely offer: "Thermal/Heating" (for deep treatment), "Moisturizing" (aligning with skincare logic), and "Spa-like efficacy."

**Item Recommendation:** **A professional-grade thermal paraffin wax bath or home spa kit.** *Rationale:* This product category perfectly synthesizes the user's profile. It addresses the "Hand Care" interest established by the OPI purchases but elevates it to the "Treatment/Care" level seen in the recent skincare purchases.
"""  # noqa: E501

THREE = ["User Profile Summary", "User Interest Extraction", "Item Recommendation"]


def chain(*sections: tuple[str, str], fmt: str = "**{}:** {}") -> str:
    return "\n\n".join(fmt.format(h, t) for h, t in sections)


def three(*order: int, overall: bool = True, summary: bool = False) -> str:
    sections = [("Overall Analysis", "Likes sci-fi.")] if overall else []
    sections += [(THREE[j], f"text {j + 1}.") for j in order]
    if summary:
        sections.append(("Summary", "Recommend Alien."))
    return chain(*sections)


def test_fig11_output_is_kept_with_five_steps() -> None:
    parsed = parse_chain(FIG11, BEAUTY)
    assert parsed.verdict == KEPT and parsed.reason is None
    assert len(parsed.steps) == 5
    assert parsed.overall.startswith("The user demonstrates a clear focus")
    assert parsed.steps[0].startswith("The sequence begins with vibrant hand aesthetics")
    assert parsed.steps[1].startswith("**Stable:** A consistent demand")  # inline bold kept
    assert parsed.steps[4].startswith("**A professional-grade thermal paraffin")
    assert parsed.steps[4].endswith("recent skincare purchases.")
    assert parsed.summary is None  # Fig. 11 has none: optional


def test_summary_is_kept_apart_from_the_steps() -> None:
    parsed = parse_chain(three(0, 1, 2, summary=True), THREE)
    assert parsed.kept
    assert parsed.steps == ("text 1.", "text 2.", "text 3.")
    assert parsed.summary == "Recommend Alien."
    assert parsed.overall == "Likes sci-fi."


@pytest.mark.parametrize("fmt", [
    "**{}:** {}",            # Fig. 11
    "**{}**: {}",            # colon outside the bold
    "### {}\n{}",            # markdown heading
    "## {}:\n\n{}",          # heading with colon, text below
    "{}: {}",                # plain
    "- **{}:** {}",          # bullet
    "__{}:__ {}",            # underscore bold
])
def test_heading_shapes(fmt: str) -> None:
    text = chain(("Overall Analysis", "o."), *[(s, f"t{j}.") for j, s in enumerate(THREE)],
                 ("Summary", "s."), fmt=fmt)
    parsed = parse_chain(text, THREE)
    assert parsed.kept, parsed.reason
    assert parsed.steps == ("t0.", "t1.", "t2.")
    assert (parsed.overall, parsed.summary) == ("o.", "s.")


def test_numbered_and_step_prefixed_headings() -> None:
    text = ("**Overall Analysis:** o.\n"
            "1. **User Profile Summary:** a.\n"
            "Step 2: User Interest Extraction: b.\n"
            "**Step 3: Item Recommendation**\nc.\n")
    assert parse_chain(text, THREE).steps == ("a.", "b.", "c.")


def test_names_match_ignoring_case_punctuation_and_a_parenthetical() -> None:
    steps = ["Item Tag Prediction & Recommendation", "Outdoor/Athletic interest mapping"]
    text = ("**overall analysis:** o.\n\n**OUTDOOR ATHLETIC INTEREST MAPPING:** nope\n")
    assert not parse_chain(text, steps).kept
    text = ("**Overall Analysis:** o.\n\n**Item tag prediction and recommendation (Items 1-3):**"
            " a.\n\n**Outdoor / athletic interest mapping:** b.")
    parsed = parse_chain(text, steps)
    assert parsed.kept and parsed.steps == ("a.", "b.")
    assert norm("Stable vs. recent") == "stable vs recent"


def test_multiline_step_text_and_preamble() -> None:
    text = ("Sure! Here is the structured rationale.\n\n**Overall Analysis:** o.\n\n"
            "**User Profile Summary:**\nline one\n\nline two\n- a bullet: with colon\n"
            "**User Interest Extraction:** b\n**Item Recommendation:** c")
    parsed = parse_chain(text, THREE)
    assert parsed.kept
    assert parsed.steps[0] == "line one\n\nline two\n- a bullet: with colon"


def test_think_block_is_dropped() -> None:
    text = "<think>\n**User Profile Summary:** draft\n</think>\n" + three(0, 1, 2)
    assert parse_chain(text, THREE).steps == ("text 1.", "text 2.", "text 3.")
    unfinished = "<think>\nI am still thinking about **User Profile Summary:**"
    assert parse_chain(unfinished, THREE).reason == (
        "reasoning not finished (<think> without </think>)")


@pytest.mark.parametrize("text, reason", [
    (None, "empty answer"),
    ("   \n", "empty answer"),
    (three(0, 2), "missing step 2 'User Interest Extraction'"),
    (three(), "missing step 1 'User Profile Summary', step 2 'User Interest Extraction', "
              "step 3 'Item Recommendation'"),
    (three(0, 1, 1, 2), "step 2 'User Interest Extraction' appears 2 times"),
    (three(1, 0, 2), "steps out of order: step 2 'User Interest Extraction' comes before "
                     "step 1 'User Profile Summary'"),
    (three(0, 2, 1), "steps out of order: step 3 'Item Recommendation' comes before "
                     "step 2 'User Interest Extraction'"),
    (three(0, 1, 2, overall=False), "missing Overall Analysis"),
    (chain((THREE[0], "a"), ("Overall Analysis", "o"), (THREE[1], "b"), (THREE[2], "c")),
     "Overall Analysis comes after step 1 'User Profile Summary'"),
    (chain(("Overall Analysis", "o"), (THREE[0], "a"), ("Summary", "s"), (THREE[1], "b"),
           (THREE[2], "c")), "Summary comes before step 3 'Item Recommendation'"),
    (three(0, 1, 2, summary=True) + "\n\n**Summary:** again",
     "Summary appears 2 times"),
    (three(0, 1, 2) + "\n\n**Overall Analysis:** again", "Overall Analysis appears 2 times"),
    (chain(("Overall Analysis", "o"), ("User Profile Summary & User Interest Extraction", "ab"),
           (THREE[2], "c")),
     "step 1 'User Profile Summary' and step 2 'User Interest Extraction' merged under one "
     "heading"),
    (chain(("Overall Analysis", "o"), (THREE[0], ""), (THREE[1], "b"), (THREE[2], "c")),
     "step 1 'User Profile Summary' is empty"),
    (chain(("Overall Analysis", ""), (THREE[0], "a"), (THREE[1], "b"), (THREE[2], "c")),
     "Overall Analysis is empty"),
    ("The user likes movies. I recommend Alien.", "missing step 1 'User Profile Summary', "
     "step 2 'User Interest Extraction', step 3 'Item Recommendation'"),
])
def test_rejections_say_why(text: str | None, reason: str) -> None:
    parsed = parse_chain(text, THREE)
    assert parsed.verdict == REJECTED
    assert parsed.reason == reason
    assert parsed.steps == ()


def test_sentence_naming_two_steps_is_text_not_a_merged_heading() -> None:
    text = three(0, 1, 2).replace(
        "text 2.", "text 2.\nWe moved from user profile summary to item recommendation: fine.")
    parsed = parse_chain(text, THREE)
    assert parsed.kept, parsed.reason


def test_merged_steps_with_a_slash_and_numbers() -> None:
    text = chain(("Overall Analysis", "o"), ("Steps 1-2: User Profile Summary / User Interest"
                                             " Extraction", "ab"), (THREE[2], "c"))
    assert "merged under one heading" in parse_chain(text, THREE).reason


def test_five_step_template_where_one_name_contains_another() -> None:
    steps = ["Recommendation", "Item Recommendation"]
    text = chain(("Overall Analysis", "o"), ("Recommendation", "a"),
                 ("Item Recommendation", "b"))
    assert parse_chain(text, steps).steps == ("a", "b")


def test_render_round_trips() -> None:
    parsed = parse_chain(FIG11, BEAUTY)
    again = parse_chain(render_chain(BEAUTY, parsed), BEAUTY)
    assert again == parsed
    with_summary = parse_chain(three(0, 1, 2, summary=True), THREE)
    assert parse_chain(render_chain(THREE, with_summary), THREE) == with_summary
    with pytest.raises(ValueError):
        render_chain(THREE, ParsedChain(REJECTED, "x"))
