"""Prompt templates: header, strict rendering, content hash, loading from the package."""

from __future__ import annotations

import pytest

from factory.errors import FactoryError
from factory.prompts import load_prompt, parse_prompt, prompt_names

GOOD = """{#
purpose: say hello
output: one line
source: TwiSTAR sec. 4.3,
  continued on a second line
#}
{% block system %}Be kind.{% endblock %}
{% block user %}Hello {{ name }}{% if title %}, {{ title }}{% endif %}.{% endblock %}
"""


def test_render_gives_chat_messages_and_the_header_is_parsed() -> None:
    p = parse_prompt("hello", GOOD)
    assert p.render(name="Ada", title=None) == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello Ada."}]
    assert p.source == "TwiSTAR sec. 4.3, continued on a second line"
    assert (p.purpose, p.output) == ("say hello", "one line")


def test_rendering_is_strict() -> None:
    p = parse_prompt("hello", GOOD)
    with pytest.raises(FactoryError, match="prompt hello: 'name' is undefined"):
        p.render(title="Dr")
    with pytest.raises(FactoryError, match="'title' is undefined"):   # even inside an if
        p.render(name="Ada")


def test_the_hash_is_the_content() -> None:
    a, b = parse_prompt("hello", GOOD), parse_prompt("hello", GOOD.replace("kind", "brief"))
    assert a.hash == parse_prompt("renamed", GOOD).hash and a.hash != b.hash
    assert len(a.hash) == 16


@pytest.mark.parametrize("text, message", [
    ("{% block user %}hi{% endblock %}", "must start with a"),
    ("{#\npurpose: x\noutput: y\n#}{% block user %}hi{% endblock %}", "header lacks source"),
    ("{#\npurpose: x\noutput: y\nsource: z\n#}{% block system %}hi{% endblock %}",
     "needs a {% block user %}"),
    ("{#\npurpose: x\noutput: y\nsource: z\n#}{% block user %}{{ x {% endblock %}", "line"),
    ("{#\npurpose: x\noutput: y\nsource: z\n#}{% block user %}a{% endblock %}"
     "{% block assistant %}b{% endblock %}", "unknown blocks"),
])
def test_bad_templates_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(FactoryError, match="prompt bad: .*" + message.replace("{", r"\{")
                       .replace("}", r"\}")):
        parse_prompt("bad", text)


def test_shipped_prompts_load_from_the_package_and_cite_a_source() -> None:
    assert "describe_item" in prompt_names()
    for name in prompt_names():
        p = load_prompt(name)
        assert p.purpose and p.output and p.source
    messages = load_prompt("describe_item").render(title="Heat", categories=["Crime"],
                                                   year=1995)
    assert "Title: Heat" in messages[-1]["content"] and "Year: 1995" in messages[-1]["content"]
    with pytest.raises(FactoryError, match="unknown prompt 'nope' \\(known: .*describe_item"):
        load_prompt("nope")


def test_a_renderer_fills_rows_exactly_as_render_does() -> None:
    prompt = load_prompt("thinkrec_recommendation")
    fill = prompt.renderer(("history", "target_title"), noun="movie", nouns="movies")
    for history, title in (("none", "Heat"), ('"A" (evaluation: yes)', "{{ x }} 100%")):
        assert fill(history=history, target_title=title) == prompt.render(
            history=history, target_title=title, noun="movie", nouns="movies")
    # a value the template transforms, or uses twice, is rendered in full every time
    shouty = parse_prompt("t", "{# purpose: p\noutput: o\nsource: s #}"
                          "{% block user %}{{ a | upper }} {{ b }} {{ b }}{% endblock %}")
    fill = shouty.renderer(("a", "b"))
    assert fill(a="x", b="y") == [{"role": "user", "content": "X y y"}]
