"""The GVM answer parsers (SCoTER Fig. 9 and Fig. 10) on well-formed and broken answers."""

from __future__ import annotations

import pytest

from factory.gvm.parse import ParseFailure, parse_best_path, parse_generation, split_steps


def answer(path: str = "Analyze history -> Find interests -> Recommend items",
           n: int = 20, reason: str = "Step one. Step two. Step three.") -> str:
    items = "\n".join(f"<item>Product {i}: a sturdy tent, 2 person</item>" for i in range(1, n + 1))
    return (f"<cot_path>\n{path}\n</cot_path>\n<reason>\n{reason}\n</reason>\n"
            f"<recommendations>\n{items}\n</recommendations>")


def test_well_formed_answer() -> None:
    g = parse_generation(answer())
    assert g.steps == ["Analyze history", "Find interests", "Recommend items"]
    assert g.cot_path == "Analyze history -> Find interests -> Recommend items"
    assert g.reason == "Step one. Step two. Step three."
    assert len(g.items) == 20 and g.items[0] == "Product 1: a sturdy tent, 2 person"
    assert g.warnings == []


def test_fewer_than_20_items_is_kept_with_a_warning() -> None:
    g = parse_generation(answer(n=7))
    assert len(g.items) == 7
    assert "only 7 of 20 items" in g.warnings


def test_more_items_than_asked_are_cut() -> None:
    g = parse_generation(answer(n=25))
    assert len(g.items) == 20 and g.items[-1].startswith("Product 20")
    assert any("25 items" in w for w in g.warnings)


def test_angle_brackets_in_item_text_are_text() -> None:
    text = answer(n=1).replace(
        "Product 1: a sturdy tent, 2 person",
        "Ultralight bag <2 lbs> for <Brand X> fans, rated >4.5 & <b>bold</b>")
    g = parse_generation(text)
    assert g.items == ["Ultralight bag <2 lbs> for <Brand X> fans, rated >4.5 & <b>bold</b>"]


def test_missing_cot_path_fails() -> None:
    text = answer().split("</cot_path>")[1]
    with pytest.raises(ParseFailure, match="no <cot_path>"):
        parse_generation(text)


def test_missing_items_fail() -> None:
    text = answer().split("<recommendations>")[0]
    with pytest.raises(ParseFailure, match="no recommended items"):
        parse_generation(text)


@pytest.mark.parametrize("text", [None, "", "   \n "])
def test_empty_answer_fails(text: str | None) -> None:
    with pytest.raises(ParseFailure, match="empty answer"):
        parse_generation(text)


def test_single_step_path_fails() -> None:
    with pytest.raises(ParseFailure, match="1 step"):
        parse_generation(answer(path="Recommend what they like"))


def test_missing_reason_is_a_warning() -> None:
    text = answer().replace("<reason>\nStep one. Step two. Step three.\n</reason>", "")
    g = parse_generation(text)
    assert g.reason is None and "no <reason>" in g.warnings


def test_echoed_format_then_real_answer() -> None:
    echo = ("<cot_path>\n[Summarize the core reasoning path here: Step 1 -> Step 2-> ... -> "
            "Item recommendation]\n</cot_path>\n<recommendations>\n<item>Detailed feature "
            "description of product 1, including category, brand, function</item>\n"
            "</recommendations>\n")
    g = parse_generation(echo + answer())
    assert g.steps[0] == "Analyze history" and len(g.items) == 20


def test_repeated_blocks_use_the_last_path_before_the_last_items() -> None:
    draft = answer(path="Draft step -> Draft end", n=3)
    final = answer(path="Final one -> Final two")
    trailing = "\n<cot_path>Rambling -> After the answer</cot_path>"
    g = parse_generation(draft + "\n" + final + trailing)
    assert g.steps == ["Final one", "Final two"]
    assert len(g.items) == 20
    assert any("blocks" in w for w in g.warnings)


def test_nested_tags_are_folded() -> None:
    text = answer().replace("<cot_path>\nAnalyze", "<cot_path><cot_path>Analyze").replace(
        "</cot_path>", "</cot_path></cot_path>")
    g = parse_generation(text)
    assert g.steps == ["Analyze history", "Find interests", "Recommend items"]
    nested_item = "<recommendations><item>Tent <item>with poles</item></item></recommendations>"
    g = parse_generation("<cot_path>A b -> C d</cot_path>" + nested_item)
    assert g.items == ["Tent", "with poles"]


def test_out_of_order_blocks_are_accepted_with_warnings() -> None:
    items = "<recommendations><item>Tent</item><item>Stove</item></recommendations>"
    text = f"<reason>Because.</reason>{items}<cot_path>Look -> Pick</cot_path>"
    g = parse_generation(text)
    assert g.steps == ["Look", "Pick"] and g.items == ["Tent", "Stove"]
    assert g.reason == "Because."
    assert any("out of order" in w for w in g.warnings)


def test_unclosed_tags_end_at_the_next_block() -> None:
    text = ("<cot_path>Analyze -> Recommend\n<reason>Because.\n"
            "<recommendations>\n<item>Tent\n<item>Stove\n")
    g = parse_generation(text)
    assert g.steps == ["Analyze", "Recommend"]
    assert g.reason == "Because."
    assert g.items == ["Tent", "Stove"]
    assert "unclosed <cot_path>" in g.warnings


def test_list_lines_when_item_tags_are_missing() -> None:
    text = ("<cot_path>A -> B</cot_path><recommendations>\n1. Tent for two\n2) Camping stove\n"
            "- Head lamp\n</recommendations>")
    g = parse_generation(text)
    assert g.items == ["Tent for two", "Camping stove", "Head lamp"]
    assert any("list lines" in w for w in g.warnings)


def test_case_spacing_and_loose_items() -> None:
    text = "< COT_PATH >A → B ⇒ C</cot_path >\n<Item>Tent</ITEM><item> Stove </item>"
    g = parse_generation(text)
    assert g.steps == ["A", "B", "C"] and g.items == ["Tent", "Stove"]
    assert any("no <recommendations>" in w for w in g.warnings)


def test_thinking_is_dropped() -> None:
    g = parse_generation("<think>maybe <cot_path>X -> Y</cot_path></think>" + answer())
    assert g.steps[0] == "Analyze history"
    g = parse_generation("drafting... <cot_path>X -> Y</cot_path></think>" + answer())
    assert g.steps[0] == "Analyze history"
    with pytest.raises(ParseFailure, match="inside <think>"):
        parse_generation("<think>still thinking about <b>")


def test_long_steps_are_flagged() -> None:
    g = parse_generation(answer(path="one two three four five six seven eight nine -> ten"))
    assert any("longer than 8 words" in w for w in g.warnings)


def test_split_steps_strips_numbering_and_markdown() -> None:
    assert split_steps("[Step 1: **Analyze** -> 2. Match --> Step3) Recommend.]") == [
        "Analyze", "Match", "Recommend"]
    assert split_steps("Analyze -> ... -> Recommend (top items)") == [
        "Analyze", "Recommend (top items)"]


FIG10 = """### 1. Pattern Summary
- **Core Logic:** Users buy gear in sets.
### 3. Optimized Paths
- **Best Path (each step ≤ 8 words):** [Purchase pattern recognition -> Outdoor \
interest mapping -> Complementary gear expansion -> Item Recommendation]
- **Improvement Logic:** clearer.
"""


def test_best_path() -> None:
    assert parse_best_path(FIG10) == ["Purchase pattern recognition", "Outdoor interest mapping",
                                      "Complementary gear expansion", "Item Recommendation"]


def test_best_path_variants() -> None:
    echo = ("- Best Path (each step <= 8 words): [Step1 -> Step2 -> ... -> Stepk -> "
            "Item Recommendation]\n")
    assert parse_best_path(echo + FIG10)[0] == "Purchase pattern recognition"
    next_line = "Best Path:\n\n  <cot_path>Analyze -> Recommend</cot_path>\n"
    assert parse_best_path(next_line) == ["Analyze", "Recommend"]
    assert parse_best_path("**Best path**: A → B → C.") == ["A", "B", "C"]


@pytest.mark.parametrize("text", ["", "no label here: A -> B", "Best Path: Recommend items",
                                  "Best Path: [Step1 -> Step2 -> ... -> Stepk]"])
def test_best_path_failures(text: str) -> None:
    with pytest.raises(ParseFailure):
        parse_best_path(text)
