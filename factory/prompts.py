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

A template may declare the shape of its answer once, beside it, in `prompts/<name>.answer.json`
(see AnswerShape): `--structured` asks the backend for that JSON, and the shape's `text`
renders it back into the free text the job's parser reads, so the parser stays the judge.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from importlib import resources
from typing import Any

import jinja2
import jinja2.meta

from factory.errors import FactoryError

HEADER_FIELDS = ("purpose", "output", "source")
#: message blocks a template may define, in the order they are sent
ROLES = ("system", "user")
_HEADER = re.compile(r"\A\s*\{#(.*?)#\}", re.S)
_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False
)
ANSWER_SUFFIX = ".answer.json"
#: a schema value that is exactly "{{ expression }}": a bound that follows the request
_BOUND = re.compile(r"\A\{\{(.+)\}\}\Z", re.S)


@dataclass(frozen=True)
class AnswerShape:
    """The JSON an answer takes under `--structured`, and how it reads as free text.

    `prompts/<name>.answer.json` holds `{"schema": <JSON schema>, "text": "<Jinja template>"}`
    (or `{"same_as": "<other prompt>"}`). The schema is an object whose properties are all
    required and closed (what OpenAI's strict mode accepts); a value that is exactly
    "{{ expression }}" is evaluated over the prompt's variables, so a bound can follow the
    request ("maxItems": "{{ n_items }}"). `text` sees the answer's fields and the prompt's
    variables and writes the free text the job's parser reads: the parser stays the judge, and
    an answer that is not JSON or breaks the schema is malformed like any other.
    """

    name: str
    schema_json: str = field(repr=False)      # as in the file, bounds not yet evaluated
    text: str = field(repr=False)

    def schema(self, variables: Mapping[str, Any]) -> dict[str, Any]:
        """The schema with its "{{ ... }}" bounds evaluated over `variables`."""
        raw = json.loads(self.schema_json)
        if "{{" not in self.schema_json:
            return raw
        return _bind(raw, lambda expr: _evaluate(self.name, expr, variables))

    def response_format(self, variables: Mapping[str, Any]) -> dict[str, Any]:
        """The OpenAI-compatible `response_format` of a request with these variables."""
        return {"type": "json_schema", "json_schema": {
            "name": self.name, "schema": self.schema(variables), "strict": True}}

    def as_text(self, answer: str, variables: Mapping[str, Any]) -> str:
        """The free text of a JSON `answer`; MalformedAnswer when it is not JSON or does not
        fit the schema (the engine re-draws it like any answer its parser refuses)."""
        from factory.answers import MalformedAnswer

        try:
            value = json.loads(answer)
        except ValueError as exc:
            raise MalformedAnswer(f"not JSON ({exc.msg} at char {exc.pos})") from None
        schema = self.schema(variables)
        error = next(_validator(json.dumps(schema, sort_keys=True)).iter_errors(value), None)
        if error is not None:
            where = "/".join(map(str, error.absolute_path)) or "the answer"
            raise MalformedAnswer(f"does not fit its schema at {where}: {error.message}"[:300])
        try:
            return _compile(f"{self.name}{ANSWER_SUFFIX}", self.text).render(
                {**variables, **value}).strip()
        except jinja2.UndefinedError as exc:
            raise FactoryError(f"prompt {self.name}{ANSWER_SUFFIX}: {exc.message}") from None


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    import jsonschema

    schema = json.loads(schema_json)
    return jsonschema.validators.validator_for(schema)(schema)


def _bind(value: Any, evaluate: Callable[[str], Any]) -> Any:
    """`value` with every "{{ expression }}" string replaced by evaluate(expression)."""
    if isinstance(value, dict):
        return {k: _bind(v, evaluate) for k, v in value.items()}
    if isinstance(value, list):
        return [_bind(v, evaluate) for v in value]
    if isinstance(value, str) and (m := _BOUND.match(value)):
        return evaluate(m.group(1))
    return value


def _evaluate(name: str, expression: str, variables: Mapping[str, Any]) -> Any:
    try:
        return _ENV.compile_expression(expression)(**variables)
    except jinja2.TemplateError as exc:
        raise FactoryError(f"prompt {name}{ANSWER_SUFFIX}: {{{{{expression}}}}}: "
                           f"{exc}") from None


def parse_answer_shape(name: str, text: str, prompt_text: str,
                       load: Callable[[str], str] | None = None) -> AnswerShape:
    """Check an answer file (its JSON, its schema, its template) and build the AnswerShape.
    `load(other)` reads another prompt's answer file, for `same_as`."""
    where = f"prompt {name}{ANSWER_SUFFIX}"
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise FactoryError(f"{where}: not JSON ({exc})") from None
    if isinstance(spec, dict) and set(spec) == {"same_as"} and load is not None:
        other = spec["same_as"]
        return replace(parse_answer_shape(other, load(other), prompt_text), name=name)
    if not (isinstance(spec, dict) and isinstance(spec.get("schema"), dict)
            and isinstance(spec.get("text"), str)):
        raise FactoryError(f'{where}: expected {{"schema": {{...}}, "text": "..."}} or '
                           '{"same_as": "<prompt>"}')
    schema = spec["schema"]
    props = schema.get("properties")
    if (schema.get("type") != "object" or not isinstance(props, dict) or not props
            or sorted(schema.get("required", [])) != sorted(props)
            or schema.get("additionalProperties") is not False):
        raise FactoryError(f"{where}: the schema must be an object whose properties are all "
                           "required, with additionalProperties false (strict mode)")
    import jsonschema

    try:        # bounds are 1 here: only the structure is checked
        jsonschema.validators.validator_for(schema).check_schema(_bind(schema, lambda _: 1))
    except jsonschema.SchemaError as exc:
        raise FactoryError(f"{where}: invalid JSON schema: {exc.message}") from None
    clash = set(props) & jinja2.meta.find_undeclared_variables(_ENV.parse(prompt_text))
    if clash:
        raise FactoryError(f"{where}: answer fields {sorted(clash)} shadow the prompt's "
                           "variables of the same name in `text`; rename them")
    _compile(f"{name}{ANSWER_SUFFIX}", spec["text"])
    # the file's order is kept: a constrained decoder writes the properties in that order
    return AnswerShape(name, json.dumps(schema), spec["text"])


@dataclass(frozen=True)
class Prompt:
    """A loaded template: its header fields, its content hash, and a strict renderer."""

    name: str
    hash: str
    purpose: str
    output: str
    source: str
    text: str = field(repr=False)
    #: the declared shape of the answer (prompts/<name>.answer.json), if any
    answer: AnswerShape | None = field(default=None, repr=False)

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


def parse_prompt(name: str, text: str, answer: str | None = None,
                 load_answer: Callable[[str], str] | None = None) -> Prompt:
    """Check the header and the blocks of a template's text (and its answer file's text,
    `answer`) and build the Prompt."""
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
    shape = (parse_answer_shape(name, answer, text, load_answer) if answer is not None
             else None)
    return Prompt(name=name, hash=digest, text=text, answer=shape, **header)


def load_prompt(name: str) -> Prompt:
    """The template `prompts/<name>.j2` from the installed `prompts` package, with its
    answer shape `prompts/<name>.answer.json` when there is one."""
    path = resources.files("prompts").joinpath(f"{name}.j2")
    if not path.is_file():
        known = ", ".join(prompt_names()) or "none"
        raise FactoryError(f"unknown prompt {name!r} (known: {known})")
    answer = resources.files("prompts").joinpath(f"{name}{ANSWER_SUFFIX}")
    return parse_prompt(name, path.read_text(encoding="utf-8"),
                        answer.read_text(encoding="utf-8") if answer.is_file() else None,
                        _answer_file)


def _answer_file(name: str) -> str:
    path = resources.files("prompts").joinpath(f"{name}{ANSWER_SUFFIX}")
    if not path.is_file():
        raise FactoryError(f"same_as: prompt {name!r} has no {name}{ANSWER_SUFFIX}")
    return path.read_text(encoding="utf-8")


def prompt_names() -> list[str]:
    return sorted(
        e.name[:-3] for e in resources.files("prompts").iterdir() if e.name.endswith(".j2")
    )
