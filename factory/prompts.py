"""Prompt templates: Jinja files in the `prompts` package, each with a header, strictly rendered.

A template is `prompts/<name>.j2`. It starts with a Jinja comment holding its header, then
one block per chat message (`system` optional, `user` required)::

    {#
    purpose: one-sentence description of a catalogue item
    output: a single plain sentence, no preamble
    source: TwiSTAR sec. 4.3 (or "demonstration" when no paper prescribes it)
    #}
    {% block system %}You write short, factual catalogue descriptions.{% endblock %}
    {% block user %}Describe {{ title }} in one sentence.{% endblock %}

Rendering uses StrictUndefined: a variable the caller did not pass is an error, never an
empty string. The template's version is the hash of its file content, so every stored answer
says exactly which wording produced it. Templates are read with importlib.resources, so they
work the same from a checkout and from an installed wheel.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from importlib import resources
from typing import Any

import jinja2

from factory.errors import FactoryError

HEADER_FIELDS = ("purpose", "output", "source")
#: message blocks a template may define, in the order they are sent
ROLES = ("system", "user")
_HEADER = re.compile(r"\A\s*\{#(.*?)#\}", re.S)
_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False
)


@dataclass(frozen=True)
class Prompt:
    """A loaded template: its header fields, its content hash, and a strict renderer."""

    name: str
    hash: str
    purpose: str
    output: str
    source: str
    text: str = field(repr=False)

    def render(self, **variables: Any) -> list[dict[str, str]]:
        """Chat messages ({role, content}) for these variables; missing ones raise FactoryError."""
        template = _compile(self.name, self.text)
        try:
            ctx = template.new_context(dict(variables))
            messages = []
            for role in ROLES:
                block = template.blocks.get(role)
                if block is None:
                    continue
                content = "".join(block(ctx)).strip()
                if content:
                    messages.append({"role": role, "content": content})
        except jinja2.UndefinedError as exc:
            raise FactoryError(f"prompt {self.name}: {exc.message}") from None
        return messages


    def renderer(self, names: tuple[str, ...], **constants: Any
                 ) -> Callable[..., list[dict[str, str]]]:
        """`render` for many rows that differ only in the variables `names`: the template is
        rendered once with a marker per name, and each row puts its values in (setting up a
        jinja context per row costs more than the rest of a 100k-row export). Used only when
        every marker comes through the template untouched, exactly once; otherwise (a filter,
        a test or a loop on one of them) each row is rendered in full."""
        marks = {n: f"\x00{n}\x00" for n in names}
        full = partial(self.render, **constants)
        try:
            skeleton = self.render(**constants, **marks)
        except FactoryError:
            return full
        joined = "".join(m["content"] for m in skeleton)
        if any(joined.count(mark) != 1 for mark in marks.values()):
            return full

        def fill(**values: Any) -> list[dict[str, str]]:
            out = []
            for m in skeleton:
                content = m["content"]
                for n, mark in marks.items():
                    if mark in content:
                        content = content.replace(mark, str(values[n]))
                out.append({"role": m["role"], "content": content})
            return out

        return fill


@lru_cache(maxsize=64)
def _compile(name: str, text: str) -> jinja2.Template:
    try:
        return _ENV.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise FactoryError(f"prompt {name}: line {exc.lineno}: {exc.message}") from None


def parse_prompt(name: str, text: str) -> Prompt:
    """Check the header and the blocks of a template's text and build the Prompt."""
    m = _HEADER.match(text)
    if not m:
        raise FactoryError(f"prompt {name}: must start with a {{# ... #}} header "
                           f"naming {', '.join(HEADER_FIELDS)}")
    header: dict[str, str] = {}
    key = None
    for line in m.group(1).strip().splitlines():
        k, sep, v = line.partition(":")
        if sep and k.strip() in HEADER_FIELDS:
            key = k.strip()
            header[key] = v.strip()
        elif key and line.strip():          # continuation line of the previous field
            header[key] += " " + line.strip()
    missing = [f for f in HEADER_FIELDS if not header.get(f)]
    if missing:
        raise FactoryError(f"prompt {name}: header lacks {', '.join(missing)}")
    template = _compile(name, text)
    if "user" not in template.blocks:
        raise FactoryError(f"prompt {name}: needs a {{% block user %}}")
    unknown = set(template.blocks) - set(ROLES)
    if unknown:
        raise FactoryError(f"prompt {name}: unknown blocks {sorted(unknown)} "
                           f"(allowed: {', '.join(ROLES)})")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return Prompt(name=name, hash=digest, text=text, **header)


def load_prompt(name: str) -> Prompt:
    """The template `prompts/<name>.j2` from the installed `prompts` package."""
    path = resources.files("prompts").joinpath(f"{name}.j2")
    if not path.is_file():
        known = ", ".join(prompt_names()) or "none"
        raise FactoryError(f"unknown prompt {name!r} (known: {known})")
    return parse_prompt(name, path.read_text(encoding="utf-8"))


def prompt_names() -> list[str]:
    return sorted(
        e.name[:-3] for e in resources.files("prompts").iterdir() if e.name.endswith(".j2")
    )
