"""Secrets: read from the environment (or the teacher URL), and scrubbed from anything we store
or print.

A key is never a command-line option (it would show in `ps` and shell history) and never part
of a stored request. The secrets of a run are the key in the environment (FACTORY_TEACHER_API_KEY,
OPENAI_API_KEY) and the credentials carried by the teacher URL: its password (or a lone user
name, as in `https://TOKEN@host`) and its credential query parameters (`?api-key=...`,
`?token=...`, `?sig=...`; harmless ones such as `api-version` stay). `Secrets.redact` removes
each of them in every escaping a body may use (raw; JSON-escaped, `\\/` and `\\uXXXX`
included, at any depth; Python repr; URL-encoded; HTML entities), plus what looks like a
credential without being known: bearer tokens, URL user:password@, credential query
parameters. Answer text gets only the known secrets removed (`redact_values`): a model's
prose about a "ring-bearer" or an example URL is data, not a leak.

The OpenAI backend owns the run's `Secrets` and hands out replies and errors already redacted;
`redact(text, key)` applies the environment's keys, every teacher URL this process has opened
and `key` (one secret, several, or a `Secrets`).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

KEY_ENV = ("FACTORY_TEACHER_API_KEY", "OPENAI_API_KEY")
#: shorter values are placeholders ("EMPTY", "none", "no-key"), not secrets: searching answer
#: text for them would rewrite ordinary words. They are still removed where a credential
#: stands (a bearer token, a URL's password, a credential query parameter).
MIN_SECRET_LEN = 8
MASK = "***"

#: query parameter names that carry credentials (case-insensitive, the last word counts:
#: `x-api-key`, `access_token`, `X-Amz-Signature`, `client_secret`; not `api-version`)
_CREDENTIAL_WORDS = (r"(?:[\w.-]*[-_.])?(?i:api[-_.]?key|apikey|key|token|secret|password|"
                     r"passwd|pwd|signature|sig|auth|authorization|credentials?|"
                     r"session[-_.]?id|sessionid|jwt)")
_CREDENTIAL_NAME = re.compile(_CREDENTIAL_WORDS)
_CREDENTIAL_HINTS = ("key", "token", "secret", "pass", "pwd", "sig", "auth", "credential",
                     "session", "jwt")
_CREDENTIAL_PARAM = re.compile(r"([?&;]" + _CREDENTIAL_WORDS + r"=)[^&\s\"'#<>\\]+")
_BEARER = re.compile(r"(?i)((?<![\w-])bearer(?:\s|%20|\+)+)(?:\\+.|[^\s\"',\\])+")
_USERINFO = re.compile(r"(//)[^/@\s\"'<>]+@")


def api_key() -> str | None:
    """The key sent to the teacher: the first of KEY_ENV that is set."""
    for name in KEY_ENV:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def env_secrets() -> list[str]:
    """Every key in the environment (both may be set; only the first is sent)."""
    return [v for v in (os.environ.get(name, "").strip() for name in KEY_ENV) if v]


def is_credential_param(name: str) -> bool:
    return _CREDENTIAL_NAME.fullmatch(unquote_plus(name)) is not None


def _userinfo(url: str) -> tuple[str | None, str]:
    """(user:password or None, the URL without it). Everything between `//` and the last `@`
    before the query counts, so a password with a raw `/` or `@` is found too."""
    scheme, sep, rest = url.partition("//")
    if not sep:
        return None, url
    head = re.split(r"[?#]", rest, maxsplit=1)[0]
    if "@" not in head:
        return None, url
    at = head.rindex("@")
    if "/" in rest[:at] and ":" not in rest[:at]:          # an `@` in the path: no userinfo
        return None, url
    return rest[:at], scheme + sep + rest[at + 1:]


def url_secrets(url: str | None) -> list[str]:
    """The credentials a URL carries: its password (else a lone user name) and the values of
    its credential query parameters, decoded."""
    if not url:
        return []
    userinfo, rest = _userinfo(url)
    found = []
    if userinfo:
        user, colon, password = userinfo.partition(":")
        found += [unquote(password), password] if colon and password else [unquote(user), user]
    for pair in urlsplit(rest).query.split("&"):
        name, eq, value = pair.partition("=")
        if eq and value and is_credential_param(name):
            found += [unquote_plus(value), value]
    return [s for s in dict.fromkeys(found) if s]


def safe_url(url: str | None) -> str | None:
    """A URL without user:password@ and with credential query parameters masked (it is printed
    and stored in job parameters); other parameters (api-version, ...) stay as written."""
    if not url:
        return url
    parts = urlsplit(_userinfo(url)[1])
    if parts.query:
        pairs = []
        for pair in parts.query.split("&"):
            name, eq, value = pair.partition("=")
            pairs.append(f"{name}={MASK}" if eq and value and is_credential_param(name)
                         else pair)
        parts = parts._replace(query="&".join(pairs))
    return urlunsplit(parts)


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """(base URL without query or fragment, query parameters): an HTTP client appends paths to
    the base, so a query left in it would swallow them (`/v1?k=x` + `chat/completions`)."""
    parts = urlsplit(url)
    query: dict[str, str] = {}
    for pair in parts.query.split("&"):
        name, eq, value = pair.partition("=")
        if name:
            query[unquote_plus(name)] = unquote_plus(value)
    return urlunsplit(parts._replace(query="", fragment="")), query


# -- finding a secret in any escaping ------------------------------------------------------------
def _hex(n: int, width: int) -> str:
    """`n` as `width` hex digits, either case (leading zeros allowed beyond width: no)."""
    return "".join(d if d.isdigit() else f"[{d}{d.upper()}]" for d in f"{n:0{width}x}")


_HTML_NAMED = {"&": "amp", "<": "lt", ">": "gt", '"': "quot", "'": "(?:apos|#39)"}


def _char(c: str) -> str:
    """A regex matching character `c` written raw or escaped (JSON, Python repr, URL, HTML)."""
    cp = ord(c)
    forms = [re.escape(c)]
    if not c.isalnum():                                     # \" \/ \\ \' , at any depth
        forms.append(r"\\\\*" + re.escape(c))
    if cp < 0x10000:                                        # \u0026 (JSON, JS, Go, repr)
        forms.append(r"\\\\*u" + _hex(cp, 4))
    else:                                                   # a surrogate pair in JSON
        hi, lo = 0xD800 + ((cp - 0x10000) >> 10), 0xDC00 + ((cp - 0x10000) & 0x3FF)
        forms.append(r"\\\\*u" + _hex(hi, 4) + r"\\+u" + _hex(lo, 4))
        forms.append(r"\\\\*U" + _hex(cp, 8))
    if cp < 0x100:
        forms.append(r"\\\\*x" + _hex(cp, 2))                 # Python repr
    forms.append("".join("%(?:25)*" + _hex(b, 2) for b in c.encode()))   # URL, twice too
    if c == " ":
        forms.append(r"\+")
    forms.append(f"&#(?:0*{cp}|[xX]0*{_hex(cp, 1)});")      # HTML numeric entities
    if c in _HTML_NAMED:
        forms.append(f"&{_HTML_NAMED[c]};")
    return "(?:" + "|".join(forms) + ")"


class Secrets:
    """The secrets of a run, and the redaction that removes them."""

    def __init__(self, values: Iterable[str] = ()):
        self.values = frozenset(v for v in values if v)
        searched = sorted((v for v in self.values if len(v) >= MIN_SECRET_LEN),
                          key=lambda v: (-len(v), v))
        # one pattern per secret: each then starts with a set of literal characters, which
        # the regex engine scans for quickly (one alternation of all would try every position)
        self._patterns = [re.compile("".join(map(_char, v))) for v in searched]

    @classmethod
    def of_run(cls, key: str | None = None, url: str | None = None) -> Secrets:
        """The environment's keys, `key` and the credentials in `url`; the URL's are also
        remembered for this process, so that `redact()` knows them wherever it is called."""
        remember(url)
        return cls([*env_secrets(), *([key] if key else []), *url_secrets(url)])

    def redact_values(self, text: str | None) -> str | None:
        """`text` with every known secret, in any escaping, replaced by ***."""
        if not text:
            return text
        for pattern in self._patterns:
            text = pattern.sub(MASK, text)
        return text

    def redact(self, text: str | None) -> str | None:
        """redact_values, and whatever stands where a credential stands: bearer tokens, URL
        user:password@, credential query parameters. For errors and response bodies."""
        if not text:
            return text
        text = self.redact_values(text)
        lower = text.lower()                    # cheap tests first: most bodies have none
        if "bearer" in lower:
            text = _BEARER.sub(r"\1" + MASK, text)
        if "@" in text and "//" in text:
            text = _USERINFO.sub(r"\1" + MASK + "@", text)
        if "=" in text and any(word in lower for word in _CREDENTIAL_HINTS):
            text = _CREDENTIAL_PARAM.sub(r"\1" + MASK, text)
        return text


@functools.lru_cache(maxsize=64)
def _compiled(values: frozenset[str]) -> Secrets:
    return Secrets(values)


#: credentials of every teacher URL opened in this process (see Secrets.of_run)
_remembered: set[str] = set()


def remember(url: str | None) -> None:
    _remembered.update(url_secrets(url))


def known_secrets(key: str | Iterable[str] | Secrets | None = None) -> Secrets:
    """The environment's keys, the remembered URL credentials and `key`."""
    if isinstance(key, Secrets):
        extra: Iterable[str] = key.values
    elif isinstance(key, str):
        extra = (key,)
    else:
        extra = key or ()
    return _compiled(frozenset([*env_secrets(), *_remembered, *extra]))


def redact(text: str | None, key: str | Iterable[str] | Secrets | None = None) -> str | None:
    """`text` with every secret this process knows (`known_secrets(key)`) and anything that
    looks like a credential (bearer token, URL user:password@, `?api-key=`) replaced by ***."""
    if not text:
        return text
    return known_secrets(key).redact(text)
